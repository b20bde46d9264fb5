"""The main job: `qatlm demo` quantizes with RTN and a QAT recipe, evaluates both against full precision and
writes a report with the table, the chart and the training curves (tiny model, a few steps, offline)."""

import json

import pytest
from tiny import tiny_model, tiny_tokenizer

from qatlm.cli import main


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    from qatlm.data import assets

    monkeypatch.setattr(assets, "fetch_all", lambda cache_dir=None: None)  # no network in tests
    monkeypatch.setenv("QATLM_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "tiny-llama"
    tiny_model("llama", num_hidden_layers=2).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the cat sat on the mat number {i} and a man is sitting on a roof" for i in range(800)))
    return d, text


@pytest.mark.parametrize("method,curve_panels", [("block-ap", "block"), ("efficientqat", "e2e")])
def test_demo_writes_the_qat_row_and_its_training_curves(offline, tmp_path, capsys, method, curve_panels):
    d, text = offline
    out = tmp_path / "demo"
    argv = ["demo", "--model", d, "--out", out, "--method", method, "--bits", "2", "--group-size", "32", "--calib", text,
            "--calib-samples", "8", "--calib-seqlen", "32", "--val-samples", "2", "--epochs", "2", "--heldout", text,
            "--seqlen", "32", "--ppl-windows", "8", "--tasks", "none"]
    assert main([str(x) for x in argv]) == 0
    err = capsys.readouterr().err
    assert "step 1/7" in err and "min left" in err  # overall progress with a time estimate
    rows = json.loads((out / "report.json").read_text())
    assert [r["recipe"] for r in rows] == ["fp", "rtn", method]
    assert all(r["setting"] == "w2g32" for r in rows[1:])
    md = (out / "report.md").read_text()
    assert f"{method} w2g32" in md and "![training curves](training_curves.png)" in md
    assert (out / "training_curves.png").stat().st_size > 10_000 and (out / "report.png").stat().st_size > 10_000
    summary = json.loads((out / f"tiny-llama-{method}-w2g32" / "training_summary.json").read_text())
    blocks = summary["block_ap"]["blocks"]
    assert len(blocks) == 2 and all(b["trained_rel_error"] <= b["rtn_rel_error"] for b in blocks)
    if curve_panels == "e2e":
        assert summary["e2e_qp"]["steps"] > 0
    assert not list(out.glob(".*"))  # no work folders left


def test_zero_shot_cells_carry_their_standard_error():
    from qatlm.eval.report import markdown_table

    row = {"label": "m", "recipe": "rtn", "setting": "w4g128", "size_on_disk_mib": 1.0, "bits_per_weight": 4.2, "heldout_ppl": 10.0,
           "zeroshot": {"piqa": {"acc": 0.6}}, "zeroshot_avg": 0.6, "zeroshot_limit": 100}
    # binomial standard error sqrt(p(1-p)/n), computed by hand: sqrt(0.24/100) = 0.049
    assert "0.600 ±0.049" in markdown_table([row])
