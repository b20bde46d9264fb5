"""What the two end-to-end methods (E2E-QP, DL-QAT) share: the fields of the end-to-end loop.

``EndToEndConfig`` holds data, budget, schedule, validation and checkpointing; each method's config adds only
the fields it reads (E2E-QP: ``lr``, ``train_zeros``; DL-QAT: magnitude and LoRA settings), so a flag of one
method is refused for the other instead of being accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from qatlm.errors import MAX_SEED, check_number
from qatlm.fields import check_choices, opt


@dataclass
class EndToEndConfig:
    """The end-to-end loop's settings (``train/end_to_end.py``); not a method by itself."""

    data: str = opt("wikipedia", "text source (continual pre-training) or instruction .jsonl/.parquet/dataset with "
                                 "instruction/input/output or messages fields (instruction tuning; loss on responses only); "
                                 "built-in instruction set: sciq-instruct (1,000 SciQ questions, not an evaluation task)")
    samples: int = opt(64, "training samples (text windows or instruction records)")
    seqlen: int = opt(512, "tokens per sample, at most")
    val_samples: int = opt(8, "validation samples")
    epochs: int = opt(1, "epochs")
    batch_size: int = opt(4, "global batch over all processes and accumulation steps")
    grad_accum: int = opt(1, "gradient accumulation steps")
    warmup_ratio: float = opt(0.03, "linear warmup fraction")
    min_lr_ratio: float = opt(0.0, "cosine decay ends at this fraction of the learning rate")
    clip_grad: float = opt(0.3, "gradient-norm clip")
    grad_checkpointing: bool = opt(True, "recompute each block's activations in the backward pass: memory flat in depth, ~1/3 "
                                         "more compute (--no-grad-checkpointing trades memory for speed)")
    val_every: int = opt(0, "validate every N steps (0: each epoch)")
    save_every: int = opt(0, "resumable checkpoint every N steps (0: each epoch)")
    save_minutes: float = opt(10.0, "also a resumable checkpoint at least every N minutes, whatever save-every says (0: off)")
    seed: int = opt(0, "seed for data sampling, shuffling and DL-QAT's LoRA init")

    def __post_init__(self):
        check_choices(self)
        for name in ("samples", "epochs", "batch_size", "grad_accum"):
            check_number(name, getattr(self, name), at_least=1)
        check_number("seqlen", self.seqlen, at_least=2)
        for name in ("val_samples", "val_every", "save_every", "save_minutes", "clip_grad"):
            check_number(name, getattr(self, name), at_least=0)
        check_number("warmup_ratio", self.warmup_ratio, at_least=0, below=1)
        check_number("min_lr_ratio", self.min_lr_ratio, at_least=0, at_most=1)
        check_number("seed", self.seed, at_least=0, at_most=MAX_SEED)
