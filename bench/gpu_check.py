"""One prepared check of every qatlm path on a lent GPU, in one process (about 8 minutes on an H100/H200).

    bash bench/gpu_wheels.sh                      # here, once: the packages the GPU image lacks, as wheels in .whl/
    python bench/gpu_check.py                     # there: writes bench/results/gpu_check.{md,json}
    python bench/gpu_check.py --dry-run --out D   # the same code on the CPU at tiny shapes (CI runs it)

On the device tool: ``carry: [".whl"]`` and the command ``python3 -m pip install -q --no-index --no-deps --target
/tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT``.
Nothing but code travels: every model is built there with random weights, every text is generated.

1. **The command line on the device**: ``quantize`` with block-ap, efficientqat, dl-qat, a K-quant grid and a
   tiny MoE, ``train`` (e2e-qp), ``eval``, and every export, on a SmolLM2-shaped model (30 blocks, width 576):
   block streaming, 16-bit activation caches, the pinned-memory prefetch thread, E2E-QP's packed backward,
   DL-QAT's 16-bit base, K-quant grids and experts all run on CUDA. One GPU: data-parallel launches are not run.
2. **A 7B-shaped block** (hidden 4096, intermediate 11008, 32 heads) at 2 x 2048 tokens: ms per Block-AP step
   (fake-quant w2g64, fp32 master weights, bf16 autocast, ``RelativeAdamW``), the same block's plain bf16
   forward + backward, a bare bf16 matmul's rate, all in this process; peak device memory of the step against
   the figure ``bench/blockap_gpu_estimate.py`` computes for it; one E2E-QP step on a 7B-shaped 2-block packed
   model against ``bench/e2e_gpu_estimate.py``'s figure; the projected 7B Block-AP time at the paper's budget.
3. **The compiled step** (``--compile-step``: torch.compile of fake-quant + block + loss): its loss against the
   eager step's on the same weights and batch, and its time.

Targets (a GPU run only): Block-AP step >= 40 % of the bf16 matmul rate and <= 1.3x the plain block's forward +
backward; projected 7B Block-AP at 4096 x 2048 tokens, 2 epochs <= 1 h; measured peak memory within 15 % of the
computed one. A dry run reports the same rows on the CPU and judges no target.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import random
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the estimators beside this file
GIB = 2**30

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0)
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
MOE = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=512, num_experts=4, num_experts_per_tok=2,
           moe_intermediate_size=256, shared_expert_intermediate_size=512)
BLOCK_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
BLOCK_TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
WORDS = ("the cat sat on a mat and looked at the door while a man was sitting on the roof of his house in the "
         "rain with water running down the tiles to the garden where children played near old trees").split()


# --- building what the checks run on -----------------------------------------------------------------------------


def synthetic_text(path: Path, n_words: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) + ("." if rng.random() < 0.08 else "") for _ in range(n_words)))
    return path


def build_tokenizer(text: Path, vocab: int):
    """A byte-level BPE trained on the generated text (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text.read_text()[i:i + 2000] for i in range(0, 200_000, 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_random_model(folder: Path, config_cls: str, shape: dict, tokenizer, seed: int = 0) -> Path:
    import transformers

    config = getattr(transformers, config_cls)(pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- 1. the command line on the device ---------------------------------------------------------------------------


def cli_runs(work: Path, device: str, dry: bool) -> list[dict]:
    text = synthetic_text(work / "text.txt", 60_000)
    tok = build_tokenizer(text, 320 if dry else 2048)
    dense = save_random_model(work / "model-dense", "LlamaConfig", TINY if dry else SMOLLM2, tok)
    moe = save_random_model(work / "model-moe", "Qwen2MoeConfig", MOE, build_tokenizer(text, 320))
    seq = "64" if dry else "256"
    calib = ["--calib", str(text), "--calib-samples", "8", "--calib-seqlen", seq, "--val-samples", "2"]
    q = lambda model, out, *a: ["quantize", "--model", str(model), "--out", str(work / out), "--device", device, *a]  # noqa: E731
    runs = [
        ("quantize block-ap w2g64", q(dense, "bap", "--method", "block-ap", "--bits", "2", "--group-size", "64", "--v1-zeros",
                                       "--epochs", "1", *calib)),
        ("quantize efficientqat w2g64", q(dense, "eqat", "--method", "efficientqat", "--bits", "2", "--group-size", "64",
                                           "--epochs", "1", *calib, "--e2e-samples", "8", "--e2e-batch-size", "4")),
        ("quantize dl-qat w4g128", q(dense, "dlqat", "--method", "dl-qat", "--bits", "4", "--group-size", "128", *calib,
                                      "--batch-size", "4")),
        ("quantize block-ap --grid q2_k", q(dense, "q2k", "--method", "block-ap", "--grid", "q2_k", "--epochs", "1", *calib)),
        ("quantize block-ap MoE w4g64", q(moe, "moe", "--method", "block-ap", "--bits", "4", "--group-size", "64",
                                           "--epochs", "1", *calib)),
        ("train e2e-qp", ["train", "--from", str(work / "bap"), "--out", str(work / "bap-e2e"), "--device", device, "--data",
                          str(text), "--samples", "8", "--seqlen", seq, "--val-samples", "2", "--batch-size", "4"]),
        ("eval", ["eval", str(work / "bap"), "--heldout", str(text), "--seqlen", seq, "--ppl-windows", "4", "--tasks", "none",
                  "--device", device]),
    ]
    for fmt in ("gptq", "gptq-v1", "gguf", "compressed-tensors"):
        runs.append((f"export {fmt}", ["export", str(work / "bap"), "--format", fmt, "--out", str(work / f"bap-{fmt}")]))
    runs.append(("export gguf (q2_k)", ["export", str(work / "q2k"), "--format", "gguf", "--out", str(work / "q2k-gguf")]))
    return [run_cli(name, argv) for name, argv in runs]


def run_cli(name: str, argv: list[str]) -> dict:
    """``qatlm ARGV`` in this process (the CUDA context is shared): exit code, time, the last line it printed."""
    from qatlm.cli import main

    err = io.StringIO()
    t = time.time()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except Exception:  # noqa: BLE001 - a crash is what this check is for: record it, go on
        code, tb = 1, traceback.format_exc()
        err.write(tb)
    lines = [ln for ln in err.getvalue().replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] if code else []
    last = (errors or lines or [""])[-1]
    print(f"  {name}: exit {code} in {time.time() - t:.1f}s", flush=True)
    return {"name": name, "argv": " ".join(argv), "exit": code, "seconds": round(time.time() - t, 1), "last_line": last[-300:]}


# --- 2. a 7B-shaped block, and the compiled step --------------------------------------------------------------


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, warm: int, reps: int) -> float:
    """Seconds per call of ``fn`` (the mean of ``reps`` calls after ``warm`` untimed ones)."""
    for _ in range(warm):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / reps


def matmul_rate(device: str, dry: bool) -> float:
    n = 512 if dry else 8192
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    return 2 * n**3 / timed(lambda: a @ b, device, 3, 10)


def one_layer_model(shape: dict, seqlen: int, device: str, dtype):
    """A 1-block Llama of this shape on the device, its block and the block's keyword arguments (rotary, mask)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qatlm.model.arch import capture_layer_inputs, find_parts

    config = LlamaConfig(num_hidden_layers=1, vocab_size=320, max_position_embeddings=seqlen, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    parts = find_parts(model)
    _, kwargs = capture_layer_inputs(model, torch.randint(3, 320, (1, seqlen), device=device), parts)
    return parts.layers[0], kwargs[0]


def block_ap_step(shape: dict, batch: int, seqlen: int, device: str, compile_step: bool, dry: bool) -> dict:
    """ms per Block-AP step of one block through qatlm's own training code, and its peak device memory."""
    from qatlm.methods.block_ap import BlockAPConfig
    from qatlm.methods.block_ap.block import BlockContext, block_fake_quant, block_step_loss, select_trained
    from qatlm.methods.block_ap.optim import RelativeAdamW
    from qatlm.methods.block_ap.sharding import Shard
    from qatlm.train.loop import JsonLog

    block, kw = one_layer_model(shape, seqlen, device, torch.float32)
    cfg = BlockAPConfig(bits=2, group_size=64, batch_size=batch, compile_step=compile_step)
    fq = block_fake_quant(block, cfg.spec, "model.layers.0")
    trained = select_trained(block, fq, cfg)
    ctx = BlockContext(cfg, torch.device(device), Shard(batch, 0, batch), batch, 0, JsonLog(), False, 1)
    loss_fn = block_step_loss(block, kw, torch.ones(batch, dtype=torch.float64), trained.all, ctx)
    opt = RelativeAdamW([{"params": trained.scales + trained.zeros, "lr": 1e-4},
                         {"params": trained.weights + trained.norms, "lr": 1e-5}], trained.units, weight_decay=0.0)
    cache = torch.float32 if device == "cpu" else torch.bfloat16  # the activation caches' dtype
    x = torch.randn(batch, seqlen, shape["hidden_size"], device=device, dtype=cache)
    y = (x.float() + 0.05 * torch.randn_like(x, dtype=torch.float32)).to(cache)
    idx = torch.arange(batch)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn((idx, x, y))
        opt.step()
    other = _allocated(device) - sum(p.numel() * p.element_size() for p in block.parameters())
    _reset_peak(device)
    sec = timed(step, device, 1 if dry else 3, 2 if dry else 10)
    n_lin = sum(m.in_features * m.out_features for m in fq.values())
    return {"ms": 1e3 * sec, "flops": 6.0 * n_lin * batch * seqlen, "peak_gib": _peak_gib(device, other), "params_m": n_lin / 1e6}


def plain_step(shape: dict, batch: int, seqlen: int, device: str, dry: bool) -> dict:
    """The same block unquantized, bf16 weights (fp32 on CPU): forward + backward of a squared error."""
    from qatlm.model.arch import run_layer

    dt = torch.float32 if device == "cpu" else torch.bfloat16
    block, kw = one_layer_model(shape, seqlen, device, dt)
    x = torch.randn(batch, seqlen, shape["hidden_size"], device=device, dtype=dt)

    def step():
        for p in block.parameters():
            p.grad = None
        run_layer(block, x, kw).float().pow(2).mean().backward()
    return {"ms": 1e3 * timed(step, device, 1 if dry else 3, 2 if dry else 10)}


def compiled_equals_eager(shape: dict, batch: int, seqlen: int, device: str) -> dict:
    """The compiled step's loss and gradient norm against the eager step's, same weights, same batch."""
    from qatlm.methods.block_ap.block import block_fake_quant, compiled_forward_loss, forward_loss
    from qatlm.quant.grid import QuantSpec

    block, kw = one_layer_model(shape, seqlen, device, torch.float32)
    block_fake_quant(block, QuantSpec(2, 64), "model.layers.0")
    for p in block.parameters():
        p.requires_grad_(True)
    x = torch.randn(batch, seqlen, shape["hidden_size"], device=device)
    y = x + 0.05 * torch.randn_like(x)
    out = {}
    for name, fn in (("eager", forward_loss), ("compiled", compiled_forward_loss())):
        for p in block.parameters():
            p.grad = None
        loss = fn(block, x, y, kw, "mse", device != "cpu")
        loss.backward()
        grads = [p.grad.float().pow(2).sum() for p in block.parameters() if p.grad is not None]
        out[name] = (float(loss.detach()), float(torch.stack(grads).sum().sqrt()))
    (le, ge), (lc, gc) = out["eager"], out["compiled"]
    return {"loss_eager": le, "loss_compiled": lc, "loss_rel_diff": abs(lc / le - 1), "grad_norm_rel_diff": abs(gc / ge - 1)}


def _allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0


def _reset_peak(device: str):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str, other: int = 0) -> float | None:
    return round((torch.cuda.max_memory_allocated() - other) / GIB, 3) if device.startswith("cuda") else None


def e2e_step(shape: dict, seqlen: int, device: str, dry: bool) -> dict:
    """One E2E-QP step (step sizes of a w2g64 packed model, bf16 autocast, gradient checkpointing) on 1 x seqlen."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import qatlm
    from qatlm.methods.e2e_qp import E2EQPConfig, scale_trainable

    dt = torch.float32 if device == "cpu" else torch.bfloat16
    config = LlamaConfig(num_hidden_layers=2, vocab_size=320 if dry else 32000, max_position_embeddings=seqlen, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    qatlm.quantize(model, qatlm.RTNConfig(2, 64), progress=False)
    trainable = scale_trainable(model, E2EQPConfig(), total_steps=10)
    enable = getattr(model, "activation_checkpointing_enable", None)  # (transformers >= 5.x; the old name warns)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(trainable.groups, weight_decay=0.0)
    ids = torch.randint(0, config.vocab_size, (1, seqlen), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
    _reset_peak(device)
    return {"ms": 1e3 * timed(step, device, 1 if dry else 2, 1 if dry else 5), "peak_gib": _peak_gib(device)}


def computed_peaks(dry: bool, batch: int, seqlen: int) -> dict:
    """What the CPU-side estimators say for the same shapes (GiB)."""
    import blockap_gpu_estimate
    import e2e_gpu_estimate

    shape = BLOCK_TINY if dry else BLOCK_7B
    bap = blockap_gpu_estimate.measure(shape, 2, 64, batch, seqlen, 8)
    e2e = e2e_gpu_estimate.estimate("2 blocks", {**shape, "num_hidden_layers": 2, "vocab_size": 320 if dry else 32000}, 1, seqlen)
    return {"block_ap_train_step_gib": bap["phases_gib"]["train step"], "e2e_qp_peak_gib": e2e["peak_estimate_gib"]}


def block_section(device: str, dry: bool) -> dict:
    shape, batch, seqlen = (BLOCK_TINY, 2, 64) if dry else (BLOCK_7B, 2, 2048)
    rate = matmul_rate(device, dry)
    eager = block_ap_step(shape, batch, seqlen, device, False, dry)
    compiled = block_ap_step(shape, batch, seqlen, device, True, dry)
    plain = plain_step(shape, batch, seqlen, device, dry)
    e2e = e2e_step(shape, 256 if dry else 2048, device, dry)
    comp = computed_peaks(dry, batch, seqlen)
    best = min(eager["ms"], compiled["ms"])
    paper_steps = 32 * (4096 // 2) * 2  # 32 blocks x (4096 samples / batch 2) x 2 epochs
    # chain passes: per block, the fp target and the quantized chain over 4096 samples, ~1/3 of a forward + backward each
    chain_s = 32 * 2 * (4096 / batch) * plain["ms"] / 3 / 1e3
    return {
        "shape": f"hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, {shape['num_attention_heads']} heads, "
                 f"{batch}x{seqlen} tokens",
        "matmul_tflops": rate / 1e12, "block_ap_ms": eager["ms"], "block_ap_compiled_ms": compiled["ms"], "plain_fwd_bwd_ms": plain["ms"],
        "block_ap_fraction_of_matmul": eager["flops"] / (eager["ms"] / 1e3) / rate,
        "compiled_fraction_of_matmul": compiled["flops"] / (compiled["ms"] / 1e3) / rate,
        "block_ap_over_plain": best / plain["ms"], "e2e_qp_2block_ms": e2e["ms"],
        "projected_7b_block_ap_hours": (paper_steps * best / 1e3 + chain_s) / 3600 if not dry else None,
        "peak_block_ap_gib": eager["peak_gib"], "computed_block_ap_gib": comp["block_ap_train_step_gib"],
        "peak_e2e_qp_gib": e2e["peak_gib"], "computed_e2e_qp_gib": comp["e2e_qp_peak_gib"],
        "compiled_vs_eager": compiled_equals_eager(shape, batch, seqlen, device),
    }


# --- the report ----------------------------------------------------------------------------------------------------


def targets(b: dict) -> dict:
    """Each target of a GPU run: (measured, wanted, met)."""
    def within(peak, computed):
        return None if peak is None else abs(peak / computed - 1)
    rows = {
        "Block-AP step >= 40 % of the bf16 matmul rate": (max(b["block_ap_fraction_of_matmul"], b["compiled_fraction_of_matmul"]), 0.40, ">="),
        "Block-AP step <= 1.3x the plain block's forward + backward": (b["block_ap_over_plain"], 1.3, "<="),
        "projected 7B Block-AP (4096 x 2048 tokens, 2 epochs) <= 1 h": (b["projected_7b_block_ap_hours"], 1.0, "<="),
        "Block-AP peak memory within 15 % of the computed": (within(b["peak_block_ap_gib"], b["computed_block_ap_gib"]), 0.15, "<="),
        "E2E-QP peak memory within 15 % of the computed": (within(b["peak_e2e_qp_gib"], b["computed_e2e_qp_gib"]), 0.15, "<="),
    }
    return {k: {"measured": v, "wanted": f"{op} {w}", "met": None if v is None else (v >= w if op == ">=" else v <= w)}
            for k, (v, w, op) in rows.items()}


def write_report(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_dry_run" if res["dry_run"] else "gpu_check"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# qatlm GPU check: {res['device']}" + (" (dry run: tiny shapes on the CPU, no target judged)" if res["dry_run"] else ""),
             "", f"torch {res['torch']}, {res['seconds']:.0f} s in all. Command: `{res['command']}`", "",
             "## The command line on the device", "", "| run | exit | s | last line |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['exit']} | {r['seconds']} | {r['last_line'].replace('|', '/')[:160]} |" for r in res.get("cli", [])]
    b = res.get("block")
    if b:
        lines += ["", f"## One block ({b['shape']})", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v if not isinstance(v, float) else round(v, 4)} |" for k, v in b.items() if k not in ("shape", "compiled_vs_eager")]
        lines += [f"| compiled vs eager | {json.dumps({k: round(v, 8) for k, v in b['compiled_vs_eager'].items()})} |"]
    if res.get("targets"):
        lines += ["", "## Targets", "", "| target | measured | wanted | met |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['measured'] if v['measured'] is None else round(v['measured'], 3)} | {v['wanted']} | {v['met']} |"
                  for k, v in res["targets"].items()]
    lines += ["", *[f"- error in {k}: {v}" for k, v in res.get("errors", {}).items()]]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny shapes")
    ap.add_argument("--out", default=None, help="folder for gpu_check.{md,json} (default bench/results; a dry run: a temporary one)")
    a = ap.parse_args(argv)
    device = "cpu" if a.dry_run else "cuda"
    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --dry-run, or on the lent GPU machine")
    out = Path(a.out) if a.out else (HERE / "results" if not a.dry_run else Path(tempfile.mkdtemp()))
    t0 = time.time()
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.machine()})", "dry_run": a.dry_run,
           "torch": torch.__version__, "command": "python bench/gpu_check.py" + (" --dry-run" if a.dry_run else ""), "errors": {}}
    with tempfile.TemporaryDirectory() as work:
        for key, fn in (("cli", lambda: cli_runs(Path(work), device, a.dry_run)), ("block", lambda: block_section(device, a.dry_run))):
            print(f"[gpu_check] {key} ...", flush=True)
            try:
                res[key] = fn()
            except Exception:  # noqa: BLE001 - one broken section must not hide the others' figures
                res["errors"][key] = traceback.format_exc()[-2000:]
                print(res["errors"][key], file=sys.stderr)
    if "block" in res and not a.dry_run:
        res["targets"] = targets(res["block"])
    res["seconds"] = time.time() - t0
    write_report(res, out)
    print(f"[gpu_check] wrote {out} in {res['seconds']:.0f}s", flush=True)
    failed = [r["name"] for r in res.get("cli", []) if r["exit"] != 0]
    return 1 if res["errors"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())
