"""Serving: ``qatlm export --for RUNTIME`` picks what that runtime loads for the grid, or refuses in one line; the
hints after ``quantize`` / in ``info`` / in the model card name only exports that load; and the exports run in the
runtimes themselves: vLLM's CPU build (its own virtualenv, ``QATLM_VLLM_PYTHON``; `.ci/run` builds it) and
llama.cpp (llama-cpp-python, in qatlm's environment).

Where a runtime is not installed its tests skip, except under ``QATLM_RUNTIMES=required`` (set by `.ci/run`), where
a missing runtime fails: a check that CI does not run is not a check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qatlm.cli import main
from qatlm.errors import QatlmError
from qatlm.export.runtimes import route, runtime_name
from qatlm.quant.grid import QuantSpec
from tiny import check_one_clear_line, need_llama_cpp, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "bench" / "runtime_worker.py"
REQUIRED = os.environ.get("QATLM_RUNTIMES") == "required"
# a small Llama whose every width is a multiple of 32 (vLLM's and llama.cpp's kernels), with a trained byte-level BPE
SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.08,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
PROMPT = "the cat sat on the mat and"


def vllm_python() -> str:
    py = os.environ.get("QATLM_VLLM_PYTHON", "")
    if not py or not Path(py).is_file():
        if REQUIRED:
            pytest.fail("QATLM_RUNTIMES=required but QATLM_VLLM_PYTHON names no python (qatlm install vllm builds one)")
        pytest.skip("vLLM CPU virtualenv not built (qatlm install vllm; QATLM_VLLM_PYTHON=VENV/bin/python)")
    return py


def run_worker(python: str, job: dict, tmp_path: Path) -> dict:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([python, str(WORKER), str(path)], capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"worker gave no result (exit {p.returncode}): {p.stderr[-2000:]}"
    return json.loads(lines[-1][7:])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers

    folder = tmp_path_factory.mktemp("served") / "fp"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SHAPE), dtype=torch.float32)
    model.save_pretrained(folder)
    tiny_tokenizer(512).save_pretrained(folder)
    return folder


def quantize(model_dir: Path, out: Path, *grid: str) -> Path:
    if not out.is_dir():
        assert main(["quantize", "--model", str(model_dir), "--method", "rtn", "--out", str(out), "--device", "cpu", *grid]) == 0
    return out


def qatlm_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """qatlm's own logits (float32: the figures qatlm reports) for one sequence."""
    from qatlm.model.checkpoint import load_quantized

    with torch.no_grad():
        return load_quantized(folder, dtype=torch.float32)(input_ids=torch.tensor([ids])).logits[0].double()


def job_for(folder: Path, runtime: str, tok_dir: Path | None = None) -> dict:
    from qatlm.model.checkpoint import load_tokenizer

    tok = load_tokenizer(tok_dir or folder)
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    window = torch.randint(3, 512, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    return {"runtime": runtime, "model": str(folder), "prompt": prompt, "new_tokens": 32, "windows": [window],
            "threads": 2, "logprobs": True}


def check_served(got: dict, src: Path, job: dict, tol: float):
    """The runtime computed qatlm's model: every greedy token it chose is qatlm's greedy choice at that point (read from
    qatlm's logits over the runtime's own continuation), up to a tie within ``tol``; and its log-probabilities of a
    window's next tokens equal qatlm's within ``tol`` nats."""
    assert "error" not in got, got.get("error")
    prompt, new = job["prompt"], got["greedy"]
    assert len(new) == job["new_tokens"]
    logits = qatlm_logits(src, prompt + new)
    steps = logits[len(prompt) - 1:-1]
    gaps = steps.max(-1).values - steps.gather(1, torch.tensor(new)[:, None])[:, 0]
    assert gaps.max().item() <= tol, f"the runtime chose tokens qatlm ranks {gaps.max().item():.3g} below its own choice"
    assert (gaps == 0).float().mean().item() >= 0.75  # most choices exactly qatlm's, not only near-ties
    window = job["windows"][0]
    ref = torch.log_softmax(qatlm_logits(src, window), -1)[:-1].gather(1, torch.tensor(window[1:])[:, None])[:, 0]
    diff = (torch.tensor(got["token_logprobs"][0], dtype=torch.float64) - ref).abs().max().item()
    assert diff < tol, f"log-probabilities differ from qatlm's by up to {diff:.3g} (tolerance {tol})"


# --- the routes, without any runtime ------------------------------------------------------------------------------


def test_routes_name_what_each_runtime_loads():
    asym4, sym4, w3 = QuantSpec(4, 64), QuantSpec(4, 64, sym=True), QuantSpec(3, 128)
    assert route("vllm", asym4, [576, 1536]).format == "compressed-tensors"
    assert route("vllm", asym4, [576]).dtype == "float16"  # vLLM's dtype=auto would serve a float32 config in bf16
    assert route("vllm", sym4, [576]).format == "compressed-tensors"
    assert route("vllm", QuantSpec(8, 64), [576]).format is None  # the CPU build: 4-bit codes only
    assert route("vllm", w3, [576]).format is None and "3-bit" in route("vllm", w3, [576]).why
    ragged = route("vllm", QuantSpec(4, 128), [576, 1536])
    assert ragged.format == "compressed-tensors" and ragged.regroup == 64 and "128 does not divide 576" in ragged.why
    assert route("vllm", QuantSpec(4, 128), [144]).format is None  # no multiple of 32 divides 128 and 144
    assert route("vllm", QuantSpec(format="q4_k")).format is None
    assert route("llama.cpp", w3).format == "gguf" and "q3_k" in route("llama.cpp", w3).why
    assert route("llama.cpp", QuantSpec(8, 64)).format is None and route("llama.cpp", QuantSpec(8, 64, sym=True)).format == "gguf"
    assert route("llama.cpp", QuantSpec(format="q3_k")).format == "gguf"
    assert route("transformers", w3, [576]).format == "gptq" and route("transformers", QuantSpec(format="q2_k")).format == "gguf"
    assert route("transformers", QuantSpec(4, 128), [576]).regroup == 64  # gptqmodel refuses a short last group
    assert route("transformers", QuantSpec(4, 128), [144]).format == "gguf"
    from qatlm.export.runtimes import MOE_WIDTH

    moe = [MOE_WIDTH, 256]  # measured: vLLM's CPU build and transformers refuse quantized experts, llama.cpp runs them
    assert route("vllm", asym4, moe).format is None and route("transformers", asym4, moe).format is None
    assert route("llama.cpp", asym4, moe).format == "gguf"
    assert runtime_name("LLAMA.CPP") == "llama.cpp" and runtime_name("gguf") == "llama.cpp"
    with pytest.raises(QatlmError, match="unknown runtime 'tgi'"):
        runtime_name("tgi")


def test_export_for_vllm_writes_float16_compressed_tensors(model_dir, tmp_path, capsys):
    src = quantize(model_dir, tmp_path / "q", "--bits", "4", "--group-size", "64")
    assert main(["export", str(src), "--for", "vllm", "--out", str(tmp_path / "v")]) == 0
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized" and cfg["dtype"] == "float16"
    rep = json.loads((tmp_path / "v" / "export_report.json").read_text())
    assert rep["for"] == "vllm" and rep["format"] == "compressed-tensors" and rep["largest_activation"] < 2 ** 15
    assert "as compressed-tensors" in capsys.readouterr().err
    assert main(["export", str(src), "--for", "llama.cpp", "--out", str(tmp_path / "l")]) == 0
    assert len(list((tmp_path / "l").glob("*.gguf"))) == 1


@pytest.mark.parametrize("argv,message", [
    (["export", "{src}", "--for", "vllm", "--out", "{tmp}/o"], "vLLM has no kernel for 3-bit weights; use --for llama.cpp"),
    (["export", "{src}", "--for", "vllm", "--format", "gptq", "--out", "{tmp}/o"], "--format FORMAT or --for RUNTIME"),
    (["export", "{src}", "--out", "{tmp}/o"], "--format FORMAT or --for RUNTIME"),
    (["export", "{src}", "--for", "tgi", "--out", "{tmp}/o"], "unknown runtime 'tgi'"),
])
def test_export_for_refuses_in_one_line(model_dir, tmp_path_factory, argv, message, capsys, monkeypatch):
    src = quantize(model_dir, tmp_path_factory.getbasetemp() / "w3", "--bits", "3", "--group-size", "64")
    capsys.readouterr()
    check_one_clear_line(argv, message, src, tmp_path_factory.mktemp("o"), capsys, monkeypatch)


def ragged_model(tmp_path, hidden: int, heads: int) -> Path:
    import transformers

    fp = tmp_path / f"fp{hidden}"
    shape = {**SHAPE, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_attention_heads": heads, "num_key_value_heads": heads}
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**shape)).save_pretrained(fp)
    tiny_tokenizer(512).save_pretrained(fp)
    return fp


def test_a_short_last_group_is_split_into_groups_the_kernels_take(tmp_path):
    """Width 192 at group 128 (a last group of 64): --for vllm / transformers write groups of 64, each 128-group's step
    size and zero point repeated: the same weights (the GPTQ reload gives identical logits), and kernels that load it."""
    from qatlm.model.checkpoint import load_quantized

    src = quantize(ragged_model(tmp_path, 192, 3), tmp_path / "q", "--bits", "4", "--group-size", "128")
    assert main(["export", str(src), "--for", "transformers", "--out", str(tmp_path / "t")]) == 0
    rep = json.loads((tmp_path / "t" / "export_report.json").read_text())
    assert rep["regrouped"] == {"from": 128, "to": 64} and rep["reload_max_logit_diff"] == 0.0
    assert json.loads((tmp_path / "t" / "config.json").read_text())["quantization_config"]["group_size"] == 64
    ids = torch.randint(3, 512, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "t")(ids).logits, load_quantized(src)(ids).logits, rtol=0, atol=0)
    assert main(["export", str(src), "--for", "vllm", "--out", str(tmp_path / "v")]) == 0
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["group_size"] == 64


def test_export_for_vllm_refuses_a_group_no_kernel_size_divides(tmp_path, capsys, monkeypatch):
    src = quantize(ragged_model(tmp_path, 144, 4), tmp_path / "q", "--bits", "4", "--group-size", "128")
    capsys.readouterr()
    check_one_clear_line(["export", "{src}", "--for", "vllm", "--out", "{tmp}/o"], "128 does not divide 144",
                         src, tmp_path, capsys, monkeypatch)


def test_hints_after_an_asymmetric_quantize_never_name_gptq_for_vllm(model_dir, tmp_path, capsys):
    from qatlm.export.card import CARD

    src = quantize(model_dir, tmp_path / "q", "--bits", "4", "--group-size", "64")
    out = capsys.readouterr().out
    vllm = [ln for ln in out.splitlines() if "vLLM" in ln]
    assert vllm and all("--for vllm" in ln and "gptq" not in ln for ln in vllm), vllm
    card = (src / CARD).read_text()
    assert "--for vllm" in card and "vllm serve DIR` (symmetric" not in card
    assert main(["info", str(quantize(model_dir, tmp_path / "w3", "--bits", "3", "--group-size", "64"))]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "vLLM" in ln)
    assert "none (vLLM has no kernel for 3-bit weights" in line


# --- in the runtimes themselves ------------------------------------------------------------------------------------


def test_vllm_serves_the_asymmetric_4bit_export_as_qatlm_computes_it(model_dir, tmp_path):
    """vLLM with its default settings (dtype=auto: the declared float16) makes qatlm's greedy choices and, within
    0.02 nats, qatlm's log-probabilities on 95 tokens."""
    py = vllm_python()
    src = quantize(model_dir, tmp_path / "q", "--bits", "4", "--group-size", "64")
    assert main(["export", str(src), "--for", "vllm", "--out", str(tmp_path / "v")]) == 0
    job = job_for(tmp_path / "v", "vllm")
    got = run_worker(py, job, tmp_path)
    assert got["dtype"] == "float16"
    check_served(got, src, job, tol=0.02)


def test_vllm_serves_a_mixed_4bit_model_with_one_config_group_per_grid(model_dir, tmp_path):
    """Layers on 4-bit grids in groups of 32, 64 and 128, the projections vLLM fuses (q/k/v, gate/up) on one grid each:
    ``--for vllm`` writes one compressed-tensors config group per grid, and vLLM computes qatlm's model from it."""
    from qatlm import QuantSpec, RTNConfig, quantize as quantize_api
    from qatlm.model.checkpoint import load_fp_model, load_tokenizer

    py = vllm_python()
    layers = tuple((f"model.layers.{b}.{n}", t) for b in range(2) for n, t in
                   (("self_attn.o_proj", "w4g32"), ("mlp.down_proj", "w4g128"), ("mlp.gate_proj", "w4g32"), ("mlp.up_proj", "w4g32")))
    spec = QuantSpec(4, 64, layers=layers)
    assert route("vllm", spec, [128, 256]).format == "compressed-tensors"
    quantize_api(load_fp_model(model_dir), RTNConfig(grid=spec), tokenizer=load_tokenizer(model_dir), out=tmp_path / "q", progress=False)
    assert main(["export", str(tmp_path / "q"), "--for", "vllm", "--out", str(tmp_path / "v")]) == 0
    groups = json.loads((tmp_path / "v" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 3
    job = job_for(tmp_path / "v", "vllm")
    check_served(run_worker(py, job, tmp_path), tmp_path / "q", job, tol=0.02)


def test_export_for_vllm_refuses_a_mix_that_splits_the_projections_it_fuses():
    """vLLM loads q/k/v (and gate/up) as one layer with one scheme: its weight loader fails on a checkpoint that gives
    them different grids (measured), so the route refuses and names the pair."""
    spec = QuantSpec(4, 64, layers=(("model.layers.1.self_attn.k_proj", "w4g32"),))
    r = route("vllm", spec, [128, 256])
    assert r.format is None and "q_proj w4g64, k_proj w4g32, v_proj w4g64 in model.layers.1.self_attn" in r.why
    assert route("llama.cpp", spec, [128, 256]).format == "gguf"
    tied = QuantSpec(4, 64, layers=tuple((f"model.layers.1.mlp.{m}", "w4g32") for m in ("gate_proj", "up_proj")))
    assert route("vllm", tied, [128, 256]).format == "compressed-tensors"


def test_a_mix_of_llama_cpp_types_routes_to_gguf_for_every_runtime_that_reads_gguf():
    """A --grid k mix (K types plus Q4_0 / Q8_0 layers) exports to GGUF only: transformers gets its GGUF reader for the
    whole checkpoint, not a format per layer; vLLM, which has no K-quant kernel, is refused."""
    spec = QuantSpec(format="k", target_bpw=5.0, layers=(("model.layers.0.mlp.down_proj", "q4_k"),
                                                         ("model.layers.0.self_attn.q_proj", "w8g32-sym")))
    assert route("transformers", spec, [256, 512]).format == "gguf"
    assert route("llama.cpp", spec, [256, 512]).format == "gguf"
    assert route("vllm", spec, [256, 512]).format is None


def test_vllm_loads_the_symmetric_4bit_gptq_export(model_dir, tmp_path):
    py = vllm_python()
    src = quantize(model_dir, tmp_path / "q", "--bits", "4", "--group-size", "64", "--sym")
    assert main(["export", str(src), "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    job = job_for(tmp_path / "g", "vllm")
    check_served(run_worker(py, job, tmp_path), src, job, tol=0.02)


def test_llama_cpp_serves_the_export_for_llama_cpp(model_dir, tmp_path):
    """llama.cpp quantizes activations to 8 bits in its matmuls: a looser tolerance, 0.05 nats."""
    need_llama_cpp()
    src = quantize(model_dir, tmp_path / "q", "--bits", "4", "--group-size", "64", "--sym")
    assert main(["export", str(src), "--for", "llama.cpp", "--out", str(tmp_path / "l")]) == 0
    gguf = next((tmp_path / "l").glob("*.gguf"))
    job = job_for(gguf, "llama.cpp", tok_dir=src)
    check_served(run_worker(sys.executable, job, tmp_path), src, job, tol=0.05)


def test_activations_near_fp16s_limit_declare_bfloat16_and_keep_the_weights(model_dir, tmp_path, monkeypatch, capsys):
    import qatlm.export as export

    monkeypatch.setattr(export, "FP16_LIMIT", 1e-3)  # every model is "near the limit"
    src = quantize(model_dir, tmp_path / "q", "--bits", "4", "--group-size", "64")
    assert main(["export", str(src), "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    rep = json.loads((tmp_path / "g" / "export_report.json").read_text())
    assert rep["dtype"] == "bfloat16" and rep["reload_max_logit_diff"] == 0.0 and "declared bfloat16" in capsys.readouterr().err
