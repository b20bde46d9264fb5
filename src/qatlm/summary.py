"""What a run reports, as types: every reader (the CLI, ``checkpoint_info``, the plots, the benchmarks) reads
these fields, never guessed dict keys. ``RunSummary.to_dict`` is what ``training_summary.json`` holds and
``RunSummary.from_dict`` reads it back.

Block errors are *relative*: a block's squared error on the validation samples divided by the energy of the
full-precision block's own contribution ``‖fp_out − fp_in‖²`` (the same number on a model whose hidden
states are 1000x larger).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

BLOCK_ERROR = "validation squared error / energy of the fp block's own contribution (rtn_rel_error, trained_rel_error)"


@dataclass
class BlockRecord:
    """One Block-AP block: its relative error at RTN and after training, and how the training went."""

    block: int
    rtn_rel_error: float
    trained_rel_error: float
    steps: int = 0
    retries: int = 0
    val_losses: list = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False
    lr_retried: bool = False  # retrained at a tenth of the rates (the first attempt did not beat RTN)
    rtn_fallback: bool = False  # kept its RTN grid (neither attempt beat RTN)
    experts_without_tokens: list | None = None  # MoE: experts no calibration token reached (kept at RTN)


@dataclass
class MixedSummary:
    """A mixed-precision allocation (``methods/mixed.py``): the budget, what it bought, and how well it was predicted.
    Errors: per block, the sum over its tokens of ``‖Δ block output‖² / ‖block output‖²`` on the sensitivity samples
    with round-to-nearest grids (predicted: the sum of each layer's own error; measured: all layers at once)."""

    target_bpw: float
    bits_per_weight: float  # of the allocation, bytes as the packed checkpoint stores them
    menu: str
    layers: dict  # layer name -> grid tag
    grids: dict  # grid tag -> number of layers
    samples: int = 0
    tokens: int = 0
    predicted_block_errors: list = field(default_factory=list)
    measured_block_errors: list = field(default_factory=list)
    sensitivity: dict = field(default_factory=dict)  # layer -> {grid tag: error}
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> "MixedSummary":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class RTNSummary:
    method: str = "rtn"
    layers: int = 0


@dataclass
class BlockAPSummary:
    config: dict
    epochs: int
    steps_per_block: int
    lr_quant: float
    lr_weight: float
    blocks: list[BlockRecord] = field(default_factory=list)
    resumed_from_block: int = 0
    replayed_blocks: int = 0
    processes: int = 1
    seconds: float = 0.0
    train_flops_per_s: float | None = None
    rtn_fallback_blocks: list = field(default_factory=list)
    lr_retried_blocks: list = field(default_factory=list)
    experts_without_tokens: list | None = None
    block_error: str = BLOCK_ERROR
    method: str = "block-ap"

    @classmethod
    def from_dict(cls, d: dict) -> "BlockAPSummary":
        d = dict(d)
        d["blocks"] = [BlockRecord(**b) for b in d.get("blocks", [])]
        return cls(**d)


@dataclass
class EndToEndSummary:
    """E2E-QP or DL-QAT: what trained, and the validation loss before and after."""

    method: str
    mode: str
    config: dict
    layers: int
    trainable_params: int
    trainable_fraction: float
    val_loss_before: float
    val_losses: list
    steps: int
    retries: int = 0
    seconds: float = 0.0
    processes: int = 1
    periodic_val: list = field(default_factory=list)
    lr: float | None = None  # E2E-QP's step-size rate
    lr_lora: float | None = None  # DL-QAT's rates
    lr_magnitude: float | None = None
    cost: dict | None = None  # DL-QAT's parameter cost (``methods.dl_qat.parameter_cost``)
    best_step: int | None = None  # the step of the best validated state (0: the model as it came), which the phase returns
    best_val_loss: float | None = None
    restored_best: bool = False  # the last state validated worse than an earlier one, which was put back

    @property
    def val_loss_after(self) -> float | None:
        """The validation loss of the model the phase handed back (its best validated state)."""
        if self.best_val_loss is not None:
            return self.best_val_loss
        return self.val_losses[-1] if self.val_losses else None

    @property
    def bought_nothing(self) -> bool:
        """No validated state beat the model the phase was given: it handed that model back unchanged."""
        return self.best_step == 0


STAGE_TYPES = {"rtn": RTNSummary, "block-ap": BlockAPSummary, "e2e-qp": EndToEndSummary, "dl-qat": EndToEndSummary}


@dataclass
class RunSummary:
    """A recipe's run: its name, its stages in order, and each stage's own summary."""

    method: str
    stages: list[str]
    rtn: RTNSummary | None = None
    block_ap: BlockAPSummary | None = None
    e2e_qp: EndToEndSummary | None = None
    dl_qat: EndToEndSummary | None = None
    device: str | None = None  # where the stages ran
    mixed: MixedSummary | None = None  # the per-layer grids of a --target-bpw run

    def stage(self, name: str):
        return getattr(self, name.replace("-", "_"))

    @property
    def trained(self):
        """The summary of the first stage that trains (RTN only initialises), or RTN's when nothing trained."""
        return next((self.stage(n) for n in self.stages if n != "rtn"), self.rtn)

    @property
    def end_to_end(self) -> EndToEndSummary | None:
        return self.e2e_qp or self.dl_qat

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSummary":
        kw = {"method": d["method"], "stages": list(d["stages"]), "device": d.get("device"),
              "mixed": MixedSummary.from_dict(d["mixed"]) if d.get("mixed") else None}
        for name in kw["stages"]:
            key = name.replace("-", "_")
            if d.get(key) is not None:
                typ = STAGE_TYPES[name]
                kw[key] = typ.from_dict(d[key]) if hasattr(typ, "from_dict") else typ(**d[key])
        return cls(**kw)
