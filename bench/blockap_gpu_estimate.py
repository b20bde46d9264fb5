"""Block-AP's GPU memory for a 7B-shaped and a 70B-shaped decoder block, counted on the CPU (no GPU needed).

    python bench/blockap_gpu_estimate.py            # Llama-2-7B and -70B block shapes, w2g64, batch 2 x 2048 tokens

No GPU was lent to the session that wrote this, so these figures are not ``torch.cuda.max_memory_allocated``.
They are the tensor bytes qatlm's own Block-AP code allocates, counted by torch's ``MemTracker``
(``torch.distributed._tools.mem_tracker``: every storage an op creates, live until freed) while the code runs
under ``FakeTensorMode`` (shapes and dtypes, no data, no compute), in the precision a GPU run uses: the block
held in bf16 for the chain passes, fp32 master weights + bf16 autocast for training (CPU autocast stands in for
CUDA's). One process, one block on the device at a time, activation caches in host memory (as qatlm runs it);
the guard's and the loop's restore points are kept in host memory too. Phases measured, each on its own:

* chain: the fp block (bf16) on ``chain_batch`` (8) samples, no gradients — the target and quantized-chain passes;
* train step: the fake-quantized block (fp32 master weights, step sizes, zero points, norms) forward + backward on
  one batch under bf16 autocast, then ``RelativeAdamW``'s step (gradients, two moments, its copy of the weights);
* validation: the fake-quantized block in fp32 on ``chain_batch`` samples, no gradients.

peak = the largest phase (+ the embeddings and head a whole 7B run keeps on the device). Not counted: the CUDA context (~0.5 GB), allocator fragmentation (often 5-15 %), and
GPU attention kernels that keep less than CPU's. A ``check`` row runs a small block both with real tensors and
fake ones: the two counts must agree. Figures go to ``bench/results/blockap_gpu_estimate.{json,md}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GIB = 2**30
SHAPES = {  # the targets of issue #14 (paper: 8.5 GB for 7B, 29.9 GB for 70B, on one A100-80GB)
    # name: (block shape, target GB, resident bytes): a whole 7B run also keeps the embeddings and the LM head on the
    # device (bf16, vocabulary 32000, untied), read once for the layer-0 inputs; the 70B target is one block's training
    "llama-2-7b": (dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32), 10.0,
                   2 * 32000 * 4096 * 2),
    "llama-2-70b block": (dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8), 32.0, 0),
}


def _block(shape: dict, dtype, fake: bool):
    """A Llama decoder layer of this shape; with ``fake`` its tensors are fake (under the active FakeTensorMode)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = LlamaConfig(num_hidden_layers=1, **shape)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, 0)
    g = torch.Generator().manual_seed(0)
    for mod in layer.modules():
        for n, t in list(mod._parameters.items()):
            if t is not None:
                v = torch.empty(t.shape, dtype=dtype) if fake else (torch.randn(t.shape, generator=g) * 0.02).to(dtype)
                mod._parameters[n] = torch.nn.Parameter(v)
    return layer, cfg


def _inputs(cfg, batch: int, seqlen: int, fake: bool, dtype=torch.float32):
    """Hidden states in, targets, and the layer's keyword arguments (rotary cos/sin in the model's dtype, as
    the model computes them; causal attention without a mask tensor, as SDPA runs it)."""
    hd = cfg.hidden_size // cfg.num_attention_heads
    make = torch.empty if fake else torch.randn
    cos_sin = (make(1, seqlen, hd).to(dtype), make(1, seqlen, hd).to(dtype))
    kw = {"position_embeddings": cos_sin, "attention_mask": None, "position_ids": torch.arange(seqlen)[None]}
    return make(batch, seqlen, cfg.hidden_size), make(batch, seqlen, cfg.hidden_size), kw


def _tracked(fn, modules=(), optimizers=()) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    if modules or optimizers:
        mt.track_external(*modules, *optimizers)
    with mt:
        fn()
    peak = mt.get_tracker_snapshot("peak")
    dev = next(iter(peak.values()))
    return {str(k).split(".")[-1].lower(): v for k, v in dev.items()}


def measure(shape: dict, bits: int, group: int, batch: int, seqlen: int, chain_batch: int, fake: bool = True) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qatlm.methods.block_ap import RelativeAdamW, block_loss
    from qatlm.model.arch import quant_targets, replace_module, run_layer
    from qatlm.quant.grid import QuantSpec
    from qatlm.quant.linear import FakeQuantLinear

    spec = QuantSpec(bits, group)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else torch.autocast("cpu", enabled=False)
    out = {}
    with mode:
        # chain passes: the fp block in the GPU's compute dtype
        block, cfg = _block(shape, torch.bfloat16, fake)
        x8, _, kw8 = _inputs(cfg, chain_batch, seqlen, fake, torch.bfloat16)

        def chain():
            with torch.no_grad():
                run_layer(block, x8.to(torch.bfloat16), kw8)
        out["chain"] = _tracked(chain, [block])
        # training: fp32 master weights, fake-quantized linears (RTN start), norms trained as the reference does
        block, cfg = _block(shape, torch.float32, fake)
        fq = {}
        for name, lin in quant_targets(block).items():
            fq[name] = FakeQuantLinear(lin, spec)
            replace_module(block, name, fq[name])
        units = {}
        for m in fq.values():
            units[m.weight] = units[m.scale] = (m.scale.detach().float() * spec.qmax, spec)
        trained = [p for p in block.parameters() if p.requires_grad]
        opt = RelativeAdamW([{"params": trained, "lr": 1e-4}], units, weight_decay=0.0)
        x, y, kw = _inputs(cfg, batch, seqlen, fake)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                o = run_layer(block, x, kw)
            block_loss(o, y, "mse", "sum").backward()
            opt.step()
            # (zero_grad comes before the next step's forward in the loop: the gradients are still alive here)
        out["train step"] = _tracked(step, [block], [opt])
        opt.zero_grad(set_to_none=True)

        x8 = x8.float()

        def val():
            with torch.no_grad():
                run_layer(block, x8, kw)
        out["validation"] = _tracked(val, [block], [opt])
        n_params = sum(p.numel() for p in block.parameters())
    return {"phases_gib": {k: round(v["total"] / GIB, 3) for k, v in out.items()},
            "train_step_parts_gib": {k: round(v / GIB, 3) for k, v in out["train step"].items() if v and k != "total"},
            "block_params_m": round(n_params / 1e6, 1), "peak_gib": round(max(v["total"] for v in out.values()) / GIB, 3)}


def main():
    rows = []
    small = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8)
    real = measure(small, 2, 64, 2, 256, 8, fake=False)
    fake = measure(small, 2, 64, 2, 256, 8, fake=True)
    rows.append({"run": "check: hidden 512 block, 2x256 tokens, real tensors vs fake", "real_phases_gib": real["phases_gib"],
                 "fake_phases_gib": fake["phases_gib"], "agree": real["phases_gib"] == fake["phases_gib"]})
    for name, (shape, target, resident) in SHAPES.items():
        r = measure(shape, 2, 64, 2, 2048, 8)
        peak = r["peak_gib"] * GIB + resident
        rows.append({"run": f"{name}, w2g64, batch 2x2048", **r, "resident_gib": round(resident / GIB, 3), "target_gb": target,
                     "peak_gb": round(peak / 1e9, 2), "met": peak / 1e9 <= target})
        print(json.dumps(rows[-1]))
    (HERE / "results" / "blockap_gpu_estimate.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| run | chain GiB | train step GiB (parts) | validation GiB | embeddings + head GiB | peak GB (target) | met |",
             "|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        p = r["phases_gib"]
        parts = ", ".join(f"{k} {v}" for k, v in r["train_step_parts_gib"].items())
        lines.append(f"| {r['run']} ({r['block_params_m']} M params) | {p['chain']} | {p['train step']} ({parts}) | {p['validation']} | "
                     f"{r['resident_gib']} | {r['peak_gb']} ({r['target_gb']:g}) | {'yes' if r['met'] else 'no'} |")
    c = rows[0]
    lines.append(f"\nCheck ({c['run']}): real {c['real_phases_gib']}, fake {c['fake_phases_gib']}: {'equal' if c['agree'] else 'DIFFERENT'}.")
    (HERE / "results" / "blockap_gpu_estimate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
