"""DL-QAT (arXiv 2504.09223): end-to-end QAT that trains under 1 % of the parameters — a magnitude
per quantization group on the step size and LoRA factors that move the weights inside the integer
grid — and merges into a plain packed integer model with no extra inference cost.

Runs on the shared end-to-end loop (``train_end_to_end``): same data modes, distributed training,
checkpoint/resume and report as E2E-QP.

Cost of each setting, per quantized layer [out, in] with group size g:
- per-group magnitude: out·in/g values (1/g of the quantized weights: 0.78 % at g128, 1.56 % at g64);
- per-channel magnitude: out values (1/in of the weights);
- LoRA rank r: r·(in + out) values.
The default rank is the largest r ≤ 16 with LoRA at most 0.2 % of the quantized weights (at least 1),
which keeps the total under 1 % for group sizes ≥ 128.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from qatlm.errors import MAX_LR, QatlmError, check_number
from qatlm.methods.base import Context
from qatlm.summary import EndToEndSummary
from qatlm.fields import opt
from qatlm.methods.end_to_end import EndToEndConfig
from qatlm.train.end_to_end import Trainable, run_end_to_end, train_end_to_end
from qatlm.model.layers import pack_model, swap_layers
from qatlm.quant.linear import DLQATLinear, FakeQuantLinear, PackedLinear

LORA_BUDGET = 0.002


@dataclass
class DLQATConfig(EndToEndConfig):
    """DL-QAT: a magnitude per quantization group and LoRA factors that move the weights inside the integer grid."""

    takes_float_base: ClassVar[bool] = True  # after RTN it trains from the float weights on the grid, not from integers

    rank: int | None = opt(None, "LoRA rank", flag="rank", default_help="the largest <= 16 costing at most 0.2% of the quantized weights")
    alpha: float | None = opt(None, "LoRA alpha", flag="alpha", default_help="the rank, i.e. scaling 1")
    magnitude: str = opt("group", "one magnitude per quantization group or per output channel", flag="magnitude",
                         choices=("group", "channel"), what="magnitude")
    lora: bool = opt(True, "train LoRA factors (--no-lora: the magnitudes only)", flag="lora")
    lr_lora: float = opt(5e-2, "learning rate of the LoRA factors", flag="lr-lora")  # bench/lr_sweep.py: best val loss at w3/w4g128
    lr_magnitude: float = opt(1e-2, "learning rate of the magnitudes", flag="lr-magnitude")
    targets: str | None = opt(None, "comma-separated layer-name fragments to train (e.g. q_proj,v_proj)", flag="targets",
                              default_help="every quantized layer")

    def __post_init__(self):
        super().__post_init__()
        check_number("rank", self.rank, at_least=1)
        check_number("alpha", self.alpha, above=0)
        check_number("lr_lora", self.lr_lora, above=0, at_most=MAX_LR)
        check_number("lr_magnitude", self.lr_magnitude, above=0, at_most=MAX_LR)


def _source_layers(model) -> dict[str, nn.Module]:
    from qatlm.quant.layers import refuse_kquant

    refuse_kquant(model, "dl-qat")
    return {n: m for n, m in model.named_modules() if isinstance(m, (PackedLinear, FakeQuantLinear))}


def auto_rank(shapes: list[tuple[int, int]], budget: float = LORA_BUDGET) -> int:
    """Largest rank ≤ 16 whose LoRA factors cost at most ``budget`` of the quantized weights (≥ 1)."""
    weights = sum(o * i for o, i in shapes)
    per_rank = sum(o + i for o, i in shapes)
    return max(1, min(16, int(budget * weights / per_rank)))


def parameter_cost(shapes: list[tuple[int, int]], group_size: int, rank: int, magnitude: str = "group", lora: bool = True,
                   total_params: int | None = None) -> dict:
    """What DL-QAT trains for layers of these [out, in] shapes (works on meta-device models too)."""
    quant = sum(o * i for o, i in shapes)
    mag = sum(o * (-(-i // (i if group_size == -1 else group_size))) if magnitude == "group" else o for o, i in shapes)
    lo = sum(rank * (o + i) for o, i in shapes) if lora else 0
    total = total_params or quant
    return {"quantized_weights": quant, "magnitude_params": mag, "lora_params": lo, "rank": rank if lora else 0,
            "trainable_params": mag + lo, "fraction_of_model": (mag + lo) / total,
            "magnitude_fraction": mag / total, "lora_fraction": lo / total}


def dlqat_trainable(model, config: DLQATConfig, total_steps: int) -> Trainable:
    src = _source_layers(model)
    if config.targets:
        keys = [t.strip() for t in config.targets.split(",") if t.strip()]
        src = {n: m for n, m in src.items() if any(k in n for k in keys)}
    if not src:
        raise QatlmError("DL-QAT found no quantized layers to train (start from a quantized checkpoint or an RTN-initialised model)")
    shapes = [(m.out_features, m.in_features) for m in src.values()]
    narrowest = min(min(s) for s in shapes)
    if config.rank is not None and config.rank > narrowest:
        raise QatlmError(f"--rank {config.rank} is larger than the narrowest quantized layer ({narrowest} wide): a LoRA rank is "
                         "at most a layer's width")
    model_params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith((".scale", ".zero"))) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear))
    rank = config.rank or auto_rank(shapes)
    gen = torch.Generator().manual_seed(config.seed)  # LoRA A: reproducible from --seed, so resume is exact

    def make(name, m):
        build = DLQATLinear.from_fake_quant if isinstance(m, FakeQuantLinear) else DLQATLinear.from_packed
        return build(m, rank=rank, alpha=config.alpha, magnitude=config.magnitude, lora=config.lora, generator=gen)
    layers = swap_layers(model, make, names=list(src))
    mags = [m.m for m in layers.values()]
    lora = [p for m in layers.values() if m.rank for p in (m.A, m.B)]
    for p in mags + lora:
        p.requires_grad_(True)
    groups = [{"params": mags, "lr": config.lr_magnitude}] + ([{"params": lora, "lr": config.lr_lora}] if lora else [])

    def merge():
        swap_layers(model, lambda name, m: m.to_packed(), names=list(layers))
        pack_model(model)  # layers outside the targets that were still fake-quant (RTN init) are fixed to integers too
        return len(layers)

    spec = next(iter(layers.values())).spec
    cost = parameter_cost(shapes, spec.group_size, rank, config.magnitude, config.lora, total_params=model_params)
    return Trainable(groups, merge, {"lr_lora": config.lr_lora, "lr_magnitude": config.lr_magnitude, "cost": cost})


def train_dl_qat(model, config: DLQATConfig, tokenizer, work_dir=None, resume=False, progress=True, cache_dir=None, device=None,
                 accelerator=None) -> EndToEndSummary:
    """DL-QAT in place on a model whose quantized layers are packed or RTN fake-quant; merges at the end."""
    return train_end_to_end(model, config, tokenizer, dlqat_trainable, "dl-qat", work_dir, resume, progress, accelerator, cache_dir,
                            device=device)


def run(model, config: DLQATConfig, data=None, context: Context | None = None) -> EndToEndSummary:
    """The method protocol (``methods/base.py``): trains in place and merges into packed integers."""
    return run_end_to_end(model, config, context or Context(), dlqat_trainable, "dl-qat")
