"""Block-AP training-step throughput against the matmul rate, per setting, in one quiet process.

    python bench/throughput.py --settings w2g64,w3g128,w4g128

For each setting: one SmolLM2 decoder block (layer --layer) with every linear fake-quantized, trained
exactly as Block-AP trains it (batch 2 x 512 tokens, MSE, AdamW on weights + step sizes + zero points,
gradient clipping, through qatlm.train.loop.train_epochs); the step time is the mean of --steps steps after two warm-up steps.
Counted FLOPs: the linears' forward + backward (6 x weights x tokens), attention is not counted.
The reference is bench/run.py's matmul_flops on the same linear shapes (best of 3 timings per shape).
Writes bench/results/throughput.{md,json}; figures vary with the machine's load, tests never read them.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RESULTS, device_name, matmul_flops, parse_setting  # noqa: E402


def step_profile(block, kwargs, fq, device, steps: int, tokens: int):
    """Mean seconds of one Block-AP optimisation step (qatlm's own training loop, as Block-AP calls it),
    and the share of a step spent in matmuls / attention (profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from qatlm.methods.block_ap import block_loss
    from qatlm.model.arch import run_layer
    from qatlm.train.loop import train_epochs

    for p in block.parameters():
        p.requires_grad_(False)
    params = [p for m in fq.values() for p in (m.weight, m.scale, m.zero)]
    for p in params:
        p.requires_grad_(True)
    hidden = next(iter(fq.values())).in_features
    x, y = torch.randn(2, tokens // 2, hidden, device=device), torch.randn(2, tokens // 2, hidden, device=device)

    def run(n):
        return train_epochs([{"params": params, "lr": 1e-5}], lambda _: block_loss(run_layer(block, x, kwargs), y),
                            lambda e: range(n), 1, n, clip=1.0, recover=False)

    run(2)  # warm up
    res = run(steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(3)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    share = {"matmul": sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / total,
             "attention": sum(e.self_cpu_time_total for e in ev if "attention" in e.key) / total}
    share["other"] = 1 - share["matmul"] - share["attention"]
    return res.step_seconds / res.steps, share


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="w2g64,w3g128,w4g128")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()

    import torch

    from qatlm.data.assets import MODEL_NAME, default_model_dir
    from qatlm.methods.block_ap.block import block_fake_quant
    from qatlm.model.arch import capture_layer_inputs, find_parts
    from qatlm.model.checkpoint import load_fp_model
    from qatlm.quant.grid import QuantSpec

    torch.manual_seed(0)
    model = load_fp_model(default_model_dir())
    parts = find_parts(model)
    tokens = 2 * 512
    _, kwargs = capture_layer_inputs(model, torch.randint(0, 1000, (1, 512)), parts)
    rows = []
    for setting in a.settings.split(","):
        bits, group = parse_setting(setting)
        block = copy.deepcopy(parts.layers[a.layer]).float()
        fq = block_fake_quant(block, QuantSpec(bits, group), f"layer{a.layer}")
        shapes = [(m.out_features, m.in_features) for m in fq.values()]
        flops = 6.0 * sum(o * i for o, i in shapes) * tokens
        t, share = step_profile(block, kwargs[a.layer], fq, "cpu", a.steps, tokens)
        mm = matmul_flops(shapes, tokens)
        rows.append({"model": MODEL_NAME, "setting": setting, "layer": a.layer, "step_ms": t * 1e3, "train_gflops": flops / t / 1e9,
                     "matmul_gflops": mm / 1e9, "fraction": flops / t / mm, "time_share": share, "device": device_name()})
        r = rows[-1]
        print(f"{setting}: {r['step_ms']:.0f} ms/step, {r['train_gflops']:.0f} of {r['matmul_gflops']:.0f} GFLOP/s = {r['fraction']:.0%}; "
              f"time in matmul {share['matmul']:.0%}, attention {share['attention']:.0%}, other {share['other']:.0%}", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| setting | step ms | train GFLOP/s | matmul GFLOP/s | fraction | time: matmul / attention / other | device |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["time_share"]
        lines.append(f"| {r['setting']} | {r['step_ms']:.0f} | {r['train_gflops']:.0f} | {r['matmul_gflops']:.0f} | {r['fraction']:.0%} | "
                     f"{s['matmul']:.0%} / {s['attention']:.0%} / {s['other']:.0%} | {r['device']} |")
    lines.append(f"\nOne Block-AP step on SmolLM2 layer {a.layer} (batch 2 x 512, fp32); counted FLOPs: the linears only; "
                 "reference: best-of-3 matmul rate on the same shapes. 'other' = fake quantization, AdamW, norms, copies.\n")
    (RESULTS / "throughput.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
