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

from qatlm.errors import MAX_LR, QatlmError, check_number
from qatlm.fields import opt
from qatlm.methods.base import Context
from qatlm.summary import EndToEndSummary
from qatlm.methods.end_to_end import EndToEndConfig
from qatlm.model.layers import pack_model, swap_layers
from qatlm.quant.linear import PackedLinear, ScaleTrainLinear
from qatlm.train.end_to_end import Trainable, run_end_to_end, train_end_to_end


PAPER_E2E_STEPS = 128


@dataclass
class E2EQPConfig(EndToEndConfig):
    """EfficientQAT's E2E-QP: the integer weights frozen, the step sizes (optionally zero points) trained end to end."""

    lr: float | None = opt(None, "learning rate of the step sizes, relative: each moves by about this fraction of itself per "
                                 "step (they are trained as log s), so it holds whatever the model's weight scale",
                           default_help="2e-3 at 2 bits / 1e-3 above, times 128/steps when shorter, at most 0.02")
    train_zeros: bool = opt(False, "also train the zero points", flag="train-zeros")

    def __post_init__(self):
        super().__post_init__()
        check_number("lr", self.lr, above=0, at_most=MAX_LR)

    def learning_rate(self, bits: int, steps: int = PAPER_E2E_STEPS) -> float:
        """The paper's E2E-QP takes 128 steps (4096 samples, global batch 32, 1 epoch) at an absolute 2e-5 (2-bit) /
        1e-5 on Llama-2 step sizes of ~1-4e-2: about 1e-3 of a step size per step. qatlm trains log s, so the rate is
        that fraction, the same for any weight scale: 2e-3 (2-bit) / 1e-3, and a shorter run keeps the
        rate x steps budget: x 128/steps, at most 0.02."""
        if self.lr is not None:
            return self.lr
        return min(0.02, (2e-3 if bits == 2 else 1e-3) * max(1.0, PAPER_E2E_STEPS / max(steps, 1)))


def attach_scale_training(model, train_zeros: bool = False) -> dict[str, ScaleTrainLinear]:
    """Packed layers -> ``ScaleTrainLinear`` (integers frozen); every other parameter frozen."""
    from qatlm.quant.layers import refuse_kquant

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
    bits = min(m.spec.bits for m in model.modules() if isinstance(m, PackedLinear))  # a mixed model: its lowest width
    layers = attach_scale_training(model, config.train_zeros)
    params = [m.log_scale for m in layers.values()] + [m.zero for m in layers.values() if m.zero is not None]
    lr = config.learning_rate(bits, total_steps)
    return Trainable([{"params": params, "lr": lr}], lambda: detach_scale_training(model), {"lr": lr})


def train_e2e_qp(model, config: E2EQPConfig, tokenizer, work_dir=None, resume: bool = False, progress: bool = True,
                 accelerator=None, cache_dir=None, device=None) -> EndToEndSummary:
    """Train the step sizes of a packed model in place; returns a summary. Packs the result at the end."""
    return train_end_to_end(model, config, tokenizer, scale_trainable, "e2e-qp", work_dir, resume, progress, accelerator, cache_dir,
                            device=device)


def run(model, config: E2EQPConfig, data=None, context: Context | None = None) -> EndToEndSummary:
    """The method protocol (``methods/base.py``): trains the packed model's step sizes in place."""
    return run_end_to_end(model, config, context or Context(), scale_trainable, "e2e-qp")
