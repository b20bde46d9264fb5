"""What Block-AP optimises: the block reconstruction loss, and AdamW with updates measured in group ranges."""

from __future__ import annotations

import torch

from qatlm.quant.grid import expand_groups

CAP = 4.0  # "mse-capped": a token's squared error counts in full up to CAP x the batch's median target norm


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse", reduction: str = "mean") -> torch.Tensor:
    """Reconstruction loss of a block's output ``[b, L, d]`` against its full-precision target.

    "mse": plain mean squared error (the paper). "mse-capped": every token's squared error is scaled by
    ``min(1, (CAP·m / ‖y_t‖)²)``, m the median target norm of the batch: ordinary tokens keep weight 1,
    while a token whose hidden state is hundreds of times larger than the rest (the attention-sink
    token of many LLMs, e.g. SmolLM2's first position at norm ~2·10^4 against ~10^2) is judged by its
    *relative* error instead of dominating the sum with an absolute error that barely matters downstream.
    """
    err = (out.float() - target.float()).pow(2)
    if kind == "mse-capped":
        norm2 = target.float().pow(2).sum(-1, keepdim=True)
        ref = norm2.flatten().median() * CAP**2
        err = err * (ref / norm2.clamp_min(1e-20)).clamp(max=1.0)
    return err.sum() if reduction == "sum" else err.mean()



class RelativeAdamW(torch.optim.AdamW):
    """AdamW whose update of some parameters is multiplied element-wise by a per-group unit.

    ``units`` maps a parameter to ``(unit [out, groups], spec)``: a weight ``[out, in]`` (unit expanded over
    each group's columns) or a per-group tensor ``[out, groups]``. Adam's step is ~lr per element whatever the
    gradient's scale, so with the unit set to the group's range a learning rate reads "fraction of the
    group's range per step": the same on a model whose weights are 10x smaller (same as Adam on the
    reparametrised ``w / unit``, up to where epsilon enters)."""

    def __init__(self, groups, units: dict, **kw):
        super().__init__(groups, **kw)
        self.units = units

    @torch.no_grad()
    def step(self, closure=None):
        before = [(p, p.detach().clone()) for p in self.units if p.grad is not None]
        loss = super().step(closure)
        for p, old in before:
            unit, spec = self.units[p]
            delta = p - old
            if delta.shape != unit.shape:
                unit = expand_groups(unit, spec, delta.shape[1])
            p.copy_(old.add_(delta.mul_(unit)))
        return loss


