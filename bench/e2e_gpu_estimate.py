"""E2E-QP training memory of 7B- and 70B-shaped packed models, by byte accounting (no GPU needed).

    python bench/e2e_gpu_estimate.py                   # Llama-2-7B and -70B shapes at w2g64, micro-batches 1x2048, 1x4096 and 4x4096

No GPU was lent to the session that wrote this, so these figures are computed, not measured with
``torch.cuda.max_memory_allocated``. The model is built on the meta device (shapes and dtypes, no data),
its linear layers swapped for qatlm's packed layers and then for E2E-QP's trainable ones, exactly as
``qatlm train`` does on a GPU (bf16 compute, fp32 step sizes). Then:

* static: every parameter and buffer (unique storages), plus a gradient and two AdamW moments for each
  trainable tensor — the same accounting as ``tests/test_e2e_qp.py::test_static_training_memory...``;
* held activations: with gradient checkpointing on, each block keeps its input hidden states (B x T x H
  in bf16), times the number of blocks; plus what the final norm, the head and the loss save — logits
  and their float copy — counted with ``torch.autograd.graph.saved_tensors_hooks`` (distinct storages)
  while the meta model's own modules run;
* one block recomputed in the backward pass: the distinct tensors one block saves without
  checkpointing, minus attention-probability matrices ([.., T, T]: a GPU's fused attention keeps none);
* transients: the largest of (the logits' gradient in fp32; one row chunk of a layer's dequantization
  and its gradient, ``CHUNK_WEIGHTS`` weights at ~26 bytes each).

peak ~= static + held + one block + transients. Not counted: the CUDA context (~0.5 GB), allocator
fragmentation, and the DDP buckets of a multi-GPU run. Written to bench/results/e2e_gpu_estimate.{json,md}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}


def _bytes(t) -> int:
    return t.numel() * t.element_size()


def build(shape: dict, bits: int, group: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qatlm.methods.e2e_qp import attach_scale_training
    from qatlm.model.arch import replace_module
    from qatlm.model.layers import target_names
    from qatlm.quant.grid import QuantSpec
    from qatlm.quant.linear import PackedLinear

    config = LlamaConfig(**shape, max_position_embeddings=4096)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        spec = QuantSpec(bits, group)
        for name in target_names(model):
            old = model.get_submodule(name)
            replace_module(model, name, PackedLinear(old.in_features, old.out_features, spec, old.bias is not None, dtype=torch.bfloat16))
    attach_scale_training(model)
    return model


def static_bytes(model) -> dict:
    seen, held = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (id(t.untyped_storage()) if t.device.type != "meta" else id(t))
        if key not in seen:
            seen.add(key)
            held += _bytes(t)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads_and_adam = sum(3 * p.numel() * 4 for p in trainable)  # fp32 gradient + exp_avg + exp_avg_sq
    return {"tensors": held, "grads_and_adam": grads_and_adam, "trainable_params": sum(p.numel() for p in trainable)}


def saved_bytes(fn, skip_square: bool = False) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs (a tensor saved by several
    operations, e.g. the input shared by q/k/v, counts once)."""
    total, seen = [0], set()

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in seen and not (skip_square and t.dim() >= 2 and t.shape[-1] == t.shape[-2] and t.shape[-1] > 64):
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def estimate(name: str, shape: dict, batch: int, seqlen: int, bits: int = 2, group: int = 64) -> dict:
    from qatlm.quant.linear import CHUNK_WEIGHTS

    model = build(shape, bits, group)
    st = static_bytes(model)
    model.train()
    # the model's own forward builds its causal mask from data (not possible on meta): its parts are run one by one
    block = model.model.layers[0]
    h = torch.zeros(batch, seqlen, shape["hidden_size"], dtype=torch.bfloat16, device="meta", requires_grad=True)
    pos = torch.arange(seqlen, device="meta").unsqueeze(0)
    rope = model.model.rotary_emb(h, pos)

    def run_block():
        return block(h, position_embeddings=rope, attention_mask=None, position_ids=pos)

    # a checkpointed block keeps only its inputs: the hidden states (rope's cos/sin are shared by all blocks)
    per_block_held = _bytes(h)
    labels = torch.zeros(batch, seqlen, dtype=torch.long, device="meta")

    def tail():
        logits = model.lm_head(model.model.norm(h))
        return model.loss_function(logits, labels, vocab_size=shape["vocab_size"])

    held = shape["num_hidden_layers"] * per_block_held + saved_bytes(tail)
    one_block = saved_bytes(run_block, skip_square=True)
    logits_grad = batch * seqlen * shape["vocab_size"] * 4
    chunk = CHUNK_WEIGHTS * 26
    transient = max(logits_grad, chunk)
    peak = st["tensors"] + st["grads_and_adam"] + held + one_block + transient
    gib = lambda b: round(b / 2**30, 2)  # noqa: E731
    return {"model": name, "grid": f"w{bits}g{group}", "micro_batch": f"{batch}x{seqlen}", "static_gib": gib(st["tensors"]),
            "grads_adam_gib": gib(st["grads_and_adam"]), "held_activations_gib": gib(held), "one_block_gib": gib(one_block),
            "transient_gib": gib(transient), "peak_estimate_gib": gib(peak), "trainable_params": st["trainable_params"]}


def main():
    rows = []
    for name, shape in SHAPES.items():
        for batch, seqlen in ((1, 2048), (1, 4096), (4, 4096)):
            r = estimate(name, shape, batch, seqlen)
            print(json.dumps(r), flush=True)
            rows.append(r)
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    (res / "e2e_gpu_estimate.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| model | grid | micro-batch | packed model + fp32 scales | grads + AdamW | held activations | one block (backward) | "
             "transient | **peak (computed)** |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['grid']} | {r['micro_batch']} | {r['static_gib']} GiB | {r['grads_adam_gib']} GiB | "
                     f"{r['held_activations_gib']} GiB | {r['one_block_gib']} GiB | {r['transient_gib']} GiB | **{r['peak_estimate_gib']} GiB** |")
    (res / "e2e_gpu_estimate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
