"""Round-to-nearest: min-max grids, no training. Also the starting point of every training method."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qatlm.quant.apply import attach_fake_quant, pack_model
from qatlm.quant.grid import QuantSpec


@dataclass
class RTNConfig:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    v1_zeros: bool = False  # keep zero points >= 1 so a GPTQ v1 export is exact
    lm_head: bool = False

    def __post_init__(self):
        self.spec  # validates bits and group size

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym, 1 if self.v1_zeros else 0)


def quantize_rtn(model: nn.Module, config: RTNConfig, **_) -> dict:
    attach_fake_quant(model, config.spec, lm_head=config.lm_head)
    return {"method": "rtn", "layers": pack_model(model)}
