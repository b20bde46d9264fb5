"""Other sensitivity measures for ``--target-bpw``, measured against the one qatlm uses (bench only).

qatlm's allocation (``qatlm/methods/mixed.py``) scores a layer on a grid by the error that layer alone, rounded to
nearest with min-max steps, causes at its block's output. Two variants, selected by ``bench/run.py --sensitivity``:

- ``propagated``: each block's scores are weighted by how much of an error at that block's output reaches the model's
  output: the KL divergence of the next-token distribution from the float model's, per unit of block-output error,
  measured with the block's layers on the grids the plain allocation chose and every other block float. The grids are
  then allocated again on the weighted scores.
- ``clipped``: the layer is put on each grid with the min-max range shrunk, per group, by the factor in [0.5, 1] whose
  rounded weights are closest to the float ones (a start closer to the step sizes training ends with).

Rows: ``bench/results/mixed_sensitivity/`` (see docs/mixed.md).
"""

from __future__ import annotations

import torch

from qatlm.methods import mixed
from qatlm.model.arch import capture_layer_inputs, first_layer_input, quant_targets, run_layer
from qatlm.model.sequential import SequentialBlocks
from qatlm.quant.grid import MIN_SCALE, QuantSpec, dequantize, minmax_init, quantize_to_int


def _group_sum(e: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    out_f, in_f = e.shape
    g, n = spec.group_width(in_f), spec.num_groups(in_f)
    if n * g != in_f:
        e = torch.cat([e, e.new_zeros(out_f, n * g - in_f)], dim=1)
    return e.reshape(out_f, n, g).sum(-1)


def clipped_steps(w: torch.Tensor, spec: QuantSpec, steps: int = 20, lowest: float = 0.5):
    """Per group: the min-max range shrunk by the factor in [lowest, 1] whose round-to-nearest weights are closest."""
    best = None
    for i in range(steps + 1):
        scale, zero = minmax_init(w * (1.0 - (1.0 - lowest) * i / steps), spec)  # the range shrunk by that factor
        s16 = scale.half().float()
        q, z = quantize_to_int(w, s16, zero, spec)
        e = _group_sum((dequantize(q, s16, z, spec) - w).pow(2), spec)
        if best is None:
            best = (e, scale, zero)
        else:
            m = e < best[0]
            best = tuple(torch.where(m, new, old) for new, old in zip((e, scale, zero), best))
    return best[1], best[2]


@torch.no_grad()
def clipped_rtn_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.kformat is not None:
        return _plain_rtn_weight(w, spec)
    scale, zero = clipped_steps(w.float(), spec)
    s16 = scale.clamp_min(MIN_SCALE).half().float()
    q, z = quantize_to_int(w.float(), s16, zero, spec)
    return dequantize(q, s16, z, spec).to(w.dtype)


_plain_rtn_weight = mixed.rtn_weight


@torch.no_grad()
def propagation_gains(model, ids: torch.Tensor, grids: dict, device=None) -> list[float]:
    """Per block: KL(float || perturbed) of the next-token distributions, summed over the tokens, per unit of the
    block-output error ``mixed.measure`` counts, the block's layers on ``grids`` and every other block float. One walk
    over the blocks; each probed error is carried to the output in its own stream."""
    blocks = SequentialBlocks(model, None, None, device)
    parts, dev = blocks.parts, blocks.device
    _, kwargs = capture_layer_inputs(model, ids[:1].to(dev), parts)
    x = first_layer_input(model, ids.to(dev), parts)
    streams, errors = [], []
    for bi, block in blocks:
        kw = kwargs[bi]
        streams = [run_layer(block, h, kw) for h in streams]
        ref = run_layer(block, x, kw)
        targets = {f"{blocks.name(bi)}.{n}": lin for n, lin in quant_targets(block).items()}
        saved = {n: lin.weight.data for n, lin in targets.items()}
        for n, lin in targets.items():
            lin.weight.data = mixed.rtn_weight(saved[n], grids[n])
        y = run_layer(block, x, kw)
        for n, lin in targets.items():
            lin.weight.data = saved[n]
        errors.append(mixed._token_error(y, ref.float(), ref.float().pow(2).sum(-1).clamp_min(1e-30)))
        streams.append(y)
        x = ref

    def logp(h):
        h = parts.norm(h) if parts.norm is not None else h
        return torch.log_softmax(parts.lm_head(h).float(), -1)

    gains = []
    for b, h in enumerate(streams):
        kl = 0.0
        for i in range(x.shape[0]):
            p = logp(x[i:i + 1])
            kl += float((p.exp() * (p - logp(h[i:i + 1]))).sum())
        gains.append(kl / max(errors[b], 1e-30))
    return gains


def plan(model, spec: QuantSpec, ids: torch.Tensor, device, variant: str):
    """``mixed.plan`` with the sensitivity ``variant``; returns its ``(spec, MixedSummary)`` and, for ``propagated``,
    the per-block gains."""
    if variant == "clipped":
        mixed.rtn_weight = clipped_rtn_weight  # every measurement of this (bench) process rounds with clipped steps
        return (*mixed.plan(model, spec, ids, device), None)
    if variant != "propagated":
        return (*mixed.plan(model, spec, ids, device), None)
    box = {}
    allocate = mixed.allocate

    def weighted(table, budget, n_weights, tie_fused=False):
        layers = allocate(table, budget, n_weights, tie_fused)
        gains = propagation_gains(model, ids, {n: mixed._grid(t, spec) for n, t in layers.items()}, device)
        box["gains"] = gains
        table = {n: {t: (b, e * gains[mixed._block_index(n)]) for t, (b, e) in opts.items()} for n, opts in table.items()}
        return allocate(table, budget, n_weights, tie_fused)

    mixed.allocate = weighted
    try:
        spec_out, summary = mixed.plan(model, spec, ids, device)
    finally:
        mixed.allocate = allocate
    return spec_out, summary, box["gains"]
