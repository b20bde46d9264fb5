"""bench/gpu_check.py, the check prepared for a lent GPU, runs end to end here in its dry-run form (the same code on
the CPU at tiny shapes): every command-line path exits 0, every block figure is measured, the compiled step equals
the eager one, and the report is written. Without a GPU its real form refuses in one line."""

import json

import pytest
from tiny import bench_module


@pytest.fixture()
def gpu_check():
    with bench_module("gpu_check") as module:
        yield module


def test_the_dry_run_runs_every_path_and_writes_the_report(gpu_check, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert res["dry_run"] and not res["errors"]
    names = [r["name"] for r in res["cli"]]
    for want in ("quantize block-ap w2g64", "quantize efficientqat w2g64", "quantize dl-qat w4g128", "quantize block-ap --grid q2_k",
                 "quantize block-ap MoE w4g64", "train e2e-qp", "eval", "export gptq", "export gptq-v1", "export gguf",
                 "export compressed-tensors", "export gguf (q2_k)"):
        assert want in names
    assert all(r["exit"] == 0 for r in res["cli"]), [r for r in res["cli"] if r["exit"]]
    b = res["block"]
    for key in ("matmul_tflops", "block_ap_ms", "block_ap_compiled_ms", "plain_fwd_bwd_ms", "e2e_qp_2block_ms",
                "computed_block_ap_gib", "computed_e2e_qp_gib"):
        assert b[key] > 0, key
    assert b["compiled_vs_eager"]["loss_rel_diff"] < 1e-5 and b["compiled_vs_eager"]["grad_norm_rel_diff"] < 1e-4
    assert "targets" not in res  # a dry run judges no target
    md = (tmp_path / "gpu_check_dry_run.md").read_text()
    assert "dry run" in md and "| export gguf (q2_k) | 0 |" in md


def test_the_targets_are_judged_from_the_figures(gpu_check):
    b = {"block_ap_fraction_of_matmul": 0.3, "compiled_fraction_of_matmul": 0.45, "block_ap_over_plain": 1.4,
         "projected_7b_block_ap_hours": 0.8, "peak_block_ap_gib": 5.0, "computed_block_ap_gib": 4.0,
         "peak_e2e_qp_gib": 5.1, "computed_e2e_qp_gib": 5.0}
    t = gpu_check.targets(b)
    met = {k.split(" ")[0] + " " + k.split(" ")[-1]: v["met"] for k, v in t.items()}
    assert list(met.values()) == [True, False, True, False, True]  # 45 % >= 40 %; 1.4 > 1.3; 0.8 h; 25 % off; 2 % off


def test_without_a_gpu_the_real_check_refuses_in_one_line(gpu_check, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here"):
        gpu_check.main([])
