"""EfficientQAT phase 2, E2E-QP: the integer weights stay frozen (and packed); only the step sizes
(optionally the zero points) are trained end to end with the language-model loss.

Two data modes: continual pre-training (causal-LM loss on text samples) and instruction tuning
(Alpaca fields or chat messages; loss on response tokens only). AdamW, weight decay 0, warmup 3%,
cosine decay, gradient-norm clipping at 0.3, gradient accumulation, periodic validation, a resumable
checkpoint every K steps. Under ``accelerate launch`` / ``torchrun`` the same code trains
data-parallel: each process takes its slice of every global batch and DDP averages the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qatlm.errors import QatlmError, check_number
from qatlm.methods.block_ap import BlockAPConfig
from qatlm.model.layers import pack_model, swap_layers
from qatlm.quant.linear import PackedLinear, ScaleTrainLinear
from qatlm.train import Trainable, train_end_to_end


PAPER_E2E_STEPS = 128


@dataclass
class E2EQPConfig:
    data: str = "wikipedia"  # text source (continual pre-training) or instruction file (auto-detected)
    samples: int = 64  # training samples (text windows or instruction records)
    seqlen: int = 512
    val_samples: int = 8
    epochs: int = 1
    batch_size: int = 4  # global batch (all processes, all accumulation micro-steps)
    grad_accum: int = 1
    lr: float | None = None  # None: the paper's 2e-5 (2 bits) / 1e-5, scaled to the step budget (learning_rate)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    clip_grad: float = 0.3
    train_zeros: bool = False
    grad_checkpointing: bool = True  # recompute each block's activations in the backward pass (the paper's setting)
    val_every: int = 0  # steps between validations (0: at the end of every epoch only)
    save_every: int = 0  # steps between resumable checkpoints (0: every epoch); also every save_minutes
    save_minutes: float = 10.0  # a resumable checkpoint at least this often (0: by steps only)
    seed: int = 0

    def __post_init__(self):
        for name in ("samples", "epochs", "batch_size", "grad_accum"):
            check_number(name, getattr(self, name), at_least=1)
        check_number("seqlen", self.seqlen, at_least=2)
        for name in ("val_samples", "val_every", "save_every", "save_minutes", "clip_grad"):
            check_number(name, getattr(self, name), at_least=0)
        check_number("lr", self.lr, above=0)
        check_number("warmup_ratio", self.warmup_ratio, at_least=0, below=1)
        check_number("min_lr_ratio", self.min_lr_ratio, at_least=0, at_most=1)

    def learning_rate(self, bits: int, steps: int = PAPER_E2E_STEPS) -> float:
        """The paper's E2E-QP takes 128 steps (4096 samples, global batch 32, 1 epoch) at 2e-5 (2-bit) / 1e-5.
        Unless set, a shorter run keeps that lr x steps budget: lr x 128/steps, at most 1e-3."""
        if self.lr is not None:
            return self.lr
        return min(1e-3, (2e-5 if bits == 2 else 1e-5) * max(1.0, PAPER_E2E_STEPS / max(steps, 1)))


def attach_scale_training(model, train_zeros: bool = False) -> dict[str, ScaleTrainLinear]:
    """Packed layers -> ``ScaleTrainLinear`` (integers frozen); every other parameter frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = swap_layers(model, lambda name, m: ScaleTrainLinear(m, train_zeros=train_zeros), PackedLinear)
    if not layers:
        raise QatlmError("the model has no packed layers: E2E-QP starts from a quantized checkpoint")
    return layers


def detach_scale_training(model) -> int:
    return pack_model(model, ScaleTrainLinear)


def scale_trainable(model, config: E2EQPConfig, total_steps: int) -> Trainable:
    """E2E-QP: step sizes (and optionally zero points) of every packed layer."""
    bits = next(m.spec.bits for m in model.modules() if isinstance(m, PackedLinear))
    layers = attach_scale_training(model, config.train_zeros)
    params = [m.scale for m in layers.values()] + [m.zero for m in layers.values() if m.zero is not None]
    lr = config.learning_rate(bits, total_steps)
    return Trainable([{"params": params, "lr": lr}], lambda: detach_scale_training(model), {"lr": lr, "layers": len(layers)})


def train_e2e_qp(model, config: E2EQPConfig, tokenizer, work_dir=None, resume: bool = False, progress: bool = True,
                 accelerator=None, cache_dir=None, device=None) -> dict:
    """Train the step sizes of a packed model in place; returns a summary. Packs the result at the end."""
    return train_end_to_end(model, config, tokenizer, scale_trainable, "e2e-qp", work_dir, resume, progress, accelerator, cache_dir,
                            device=device)


@dataclass
class EfficientQATConfig(BlockAPConfig):
    """Block-AP, then E2E-QP on the same text (or ``e2e_data``), as one recipe."""

    e2e_data: str | None = None
    e2e_samples: int | None = None  # default: the calibration sample count
    e2e_epochs: int = 1
    e2e_batch_size: int = 4
    e2e_lr: float | None = None
    train_zeros: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_number("e2e_samples", self.e2e_samples, at_least=1)
        check_number("e2e_epochs", self.e2e_epochs, at_least=1)
        check_number("e2e_batch_size", self.e2e_batch_size, at_least=1)
        check_number("e2e_lr", self.e2e_lr, above=0)


def quantize_efficientqat(model, config: EfficientQATConfig, tokenizer=None, work_dir=None, resume=False, **kw) -> dict:
    from qatlm.methods.block_ap import quantize_block_ap

    work = Path(work_dir) if work_dir else None
    s1 = quantize_block_ap(model, config, tokenizer=tokenizer, work_dir=work, resume=resume, **kw)
    e2e = E2EQPConfig(data=config.e2e_data or config.calib, samples=config.e2e_samples or config.calib_samples,
                      seqlen=config.calib_seqlen, val_samples=config.val_samples, epochs=config.e2e_epochs,
                      batch_size=config.e2e_batch_size, lr=config.e2e_lr, train_zeros=config.train_zeros, seed=config.seed)
    s2 = train_e2e_qp(model, e2e, tokenizer, work_dir=work / "e2e" if work else None, resume=resume, progress=kw.get("progress", True))
    return {**s1, "method": "efficientqat", "e2e": s2}
