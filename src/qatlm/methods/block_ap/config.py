"""Block-AP's settings: the config dataclass, its learning-rate and epoch rules, and the fingerprint a resumed
run must match."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from qatlm.errors import MAX_LR, MAX_SEED, check_number
from qatlm.fields import opt
from qatlm.methods.base import GridConfig
from qatlm.quant.grid import QuantSpec

PAPER_STEPS = 4096
MIN_STEPS = 128  # unset epochs: at least this many steps per block (the default 128 samples x 2 epochs at batch 2)
LOSSES = ("mse", "mse-capped")


@dataclass(init=False)
class BlockAPConfig(GridConfig):
    """EfficientQAT's Block-AP: each decoder block trained against its full-precision output, then fixed to integers."""

    streams: ClassVar[bool] = True  # can run block by block on a lazily loaded model

    grid: QuantSpec = opt(QuantSpec, "the integer grid")
    calib: str = opt("wikipedia", "calibration text: wikipedia (built-in), a .txt/.jsonl/.parquet/dataset folder, a Hugging Face "
                                  "dataset NAME:CONFIG:SPLIT[:FIELD] (streamed), or wikitext2-train / c4-train")
    calib_samples: int = opt(128, "calibration samples")
    calib_seqlen: int = opt(512, "tokens per calibration sample")
    val_samples: int = opt(16, "validation samples, disjoint from calibration")
    seed: int = opt(0, "seed for calibration sampling and shuffling")
    epochs: int | None = opt(None, "epochs per block", default_help=f"2 (the reference), or more so that each block trains at "
                             f"least {MIN_STEPS} steps (the default 128 samples at batch 2 give exactly 2)")
    batch_size: int = opt(2, "samples per step (the global batch under torchrun)")
    lr_quant: float | None = opt(None, "learning rate of step sizes (fraction of a group's range per step, see "
                                       "--update-units; on 8-bit grids of 15 initial steps, the 4-bit grid's rate) and "
                                       "zero points (integer units)",
                                 default_help="1e-4 scaled by 4096/steps, at most 1e-2")
    lr_weight: float | None = opt(None, "learning rate of weights and norms, as a fraction of a group's range per step "
                                        "(see --update-units)",
                                  default_help="2e-5 at 2 bits / 1e-5 above, scaled by 4096/steps, at most 1e-3")
    min_lr_ratio: float = opt(0.05, "cosine decay ends at this fraction of each learning rate")
    clip_grad: float | None = opt(None, "gradient-norm clip", flag="block-clip-grad", default_help="none, as the reference")
    input_mode: str = opt("quant", "block inputs from the quantized chain (quant) or the fp chain (fp)", choices=("quant", "fp"), what="input mode")
    loss: str = opt("mse", "reconstruction loss: mse (the paper) or mse-capped (tokens of massive norm, e.g. attention sinks, "
                           "count by their relative error)", flag="block-loss", choices=LOSSES, what="block loss")
    train_norms: bool = opt(True, "train each block's norm weights with its linear weights, as the reference (biases stay fixed)")
    update_units: str = opt("layer", "units of the weights' and step sizes' learning rates: layer (the layer's mean initial "
                                     "group range: scale-free, every group of a layer alike), range (each group's own initial "
                                     "range: scale-free) or absolute (the reference's; only right for models whose group ranges "
                                     "are ~1)",
                            choices=("range", "layer", "absolute"), what="update units")
    norm_updates: str = opt("absolute", "how norm weights move per step: absolute (lr_weight itself, as the reference) or "
                                        "relative (lr_weight times each norm's RMS: the same on a model whose norms are 10x "
                                        "larger)", choices=("absolute", "relative"), what="norm updates")
    early_stop: bool = opt(False, "stop a block when its validation loss rises")
    ram_budget_gb: float = opt(8.0, "activation caches beyond this many GiB go to memory-mapped files")
    chain_batch: int = opt(8, "samples per forward when moving activations through a finished block")
    cache_dtype: str = opt("auto", "the two activation caches: auto = float32 on CPU, bfloat16 on GPU",
                           choices=("auto", "float32", "bfloat16", "float16"), what="cache dtype")
    compile_step: bool = opt(False, "compile each block's training step (fake-quant, block, loss) with torch.compile: fewer, "
                                    "fused kernels where eager is launch- or memory-bound (GPUs); the first block pays the "
                                    "compile time, equal to eager up to float rounding")

    def __post_init__(self):
        super().__post_init__()  # the grid, and every field's choices
        for name in ("calib_samples", "epochs", "batch_size", "chain_batch"):
            check_number(name, getattr(self, name), at_least=1)
        check_number("calib_seqlen", self.calib_seqlen, at_least=2)
        check_number("val_samples", self.val_samples, at_least=0)
        check_number("lr_quant", self.lr_quant, above=0, at_most=MAX_LR)
        check_number("lr_weight", self.lr_weight, above=0, at_most=MAX_LR)
        check_number("seed", self.seed, at_least=0, at_most=MAX_SEED)
        check_number("min_lr_ratio", self.min_lr_ratio, at_least=0, at_most=1)
        check_number("block_clip_grad", self.clip_grad, at_least=0)
        check_number("ram_budget_gb", self.ram_budget_gb, at_least=0, at_most=1 << 20)

    def cache_torch_dtype(self, device) -> torch.dtype:
        if self.cache_dtype == "auto":
            return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
        return getattr(torch, self.cache_dtype)

    def epochs_for(self, n_train: int) -> int:
        """The epochs a block trains for on ``n_train`` samples: ``epochs`` when set, else the reference's 2, raised
        so that a block takes at least MIN_STEPS steps (on a small calibration set more passes over the same tokens
        beat the same passes at a higher rate: SmolLM2 w4g128 on 64 samples, 44.02 -> 42.13 ppl)."""
        if self.epochs is not None:
            return self.epochs
        return max(2, math.ceil(MIN_STEPS / max(1, math.ceil(n_train / self.batch_size))))

    def learning_rates(self, steps: int) -> tuple[float, float]:
        """(lr_quant, lr_weight), both in units of a quantization group's initial range (max − min; see ``update_units``) per
        step (zero points: integer units). Unset ones keep the paper's lr x steps budget: the paper trains
        each block for 4096 steps (4096 samples, batch 2, 2 epochs) at 1e-4 / 2e-5 (1e-5 above 2 bits); with
        fewer steps the rate grows by 4096/steps, capped at 1e-2 / 1e-3. (The paper's rates are absolute;
        on SmolLM2, where these defaults were measured, the group ranges are ~1.0 at every setting, so the
        numbers coincide there, and they keep their meaning on models whose weights are 10x smaller.)"""
        scale = max(1.0, PAPER_STEPS / max(steps, 1))
        lq = self.lr_quant if self.lr_quant is not None else min(1e-2, 1e-4 * scale)
        lw = self.lr_weight if self.lr_weight is not None else min(1e-3, (2e-5 if self.bits == 2 else 1e-5) * scale)
        return lq, lw

    def fingerprint(self) -> str:
        # (the calibration file's path is not in it: the tokens are, beside it, so the same text under another path resumes)
        keep = {k: v for k, v in asdict(self).items() if k not in ("ram_budget_gb", "chain_batch", "calib")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


