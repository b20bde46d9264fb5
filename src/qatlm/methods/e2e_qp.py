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

from qatlm.errors import QatlmError, check_number
from qatlm.methods.base import Context
from qatlm.options import opt
from qatlm.model.layers import pack_model, swap_layers
from qatlm.quant.linear import PackedLinear, ScaleTrainLinear
from qatlm.train import Trainable, run_end_to_end, train_end_to_end


PAPER_E2E_STEPS = 128


@dataclass
class E2EQPConfig:
    """EfficientQAT's E2E-QP: the integer weights frozen, the step sizes (optionally zero points) trained end to end."""

    data: str = opt("wikipedia", "text source (continual pre-training) or instruction .jsonl/.parquet/dataset with "
                                 "instruction/input/output or messages fields (instruction tuning; loss on responses only); "
                                 "built-in instruction set: sciq-instruct (1,000 SciQ questions, not an evaluation task)")
    samples: int = opt(64, "training samples (text windows or instruction records)")
    seqlen: int = opt(512, "tokens per sample, at most")
    val_samples: int = opt(8, "validation samples")
    epochs: int = opt(1, "epochs")
    batch_size: int = opt(4, "global batch over all processes and accumulation steps")
    grad_accum: int = opt(1, "gradient accumulation steps")
    lr: float | None = opt(None, "learning rate", default_help="the paper's 2e-5 at 2 bits / 1e-5 above, times 128/steps when "
                                                              "shorter, at most 1e-3")
    warmup_ratio: float = opt(0.03, "linear warmup fraction")
    min_lr_ratio: float = opt(0.0, "cosine decay ends at this fraction of the learning rate")
    clip_grad: float = opt(0.3, "gradient-norm clip")
    train_zeros: bool = opt(False, "also train the zero points", flag="train-zeros")
    grad_checkpointing: bool = opt(True, "recompute each block's activations in the backward pass: memory flat in depth, ~1/3 "
                                         "more compute (--no-grad-checkpointing trades memory for speed)")
    val_every: int = opt(0, "validate every N steps (0: each epoch)")
    save_every: int = opt(0, "resumable checkpoint every N steps (0: each epoch)")
    save_minutes: float = opt(10.0, "also a resumable checkpoint at least every N minutes, whatever save-every says (0: off)")
    seed: int = opt(0, "seed for data sampling, shuffling and DL-QAT's LoRA init")

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
    from qatlm.quant.kquant import refuse_kquant

    refuse_kquant(model, "e2e-qp")
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


def run(model, config: E2EQPConfig, data=None, context: Context | None = None) -> dict:
    """The method protocol (``methods/base.py``): trains the packed model's step sizes in place."""
    return run_end_to_end(model, config, context or Context(), scale_trainable, "e2e-qp")
