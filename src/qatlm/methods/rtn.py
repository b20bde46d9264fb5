"""Round-to-nearest: min-max grids, no training. Also the starting point of every training method."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qatlm.model.arch import find_parts, quant_targets
from qatlm.model.layers import attach_fake_quant, pack_model, target_names
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


def quantize_rtn(model: nn.Module, config: RTNConfig, work_dir=None, **_) -> dict:
    """RTN in place. A lazily loaded model (``model/lazy.py``) with a ``work_dir`` is done block by block:
    each block is read from the shards, quantized, written to ``work_dir/blocks`` and dropped, so a model
    larger than the memory streams through."""
    from qatlm.model.lazy import check_source_weights, lazy_source, materialize_block, release_block, save_block

    if lazy_source(model) is None or work_dir is None:
        if lazy_source(model) is not None:  # no place to put finished blocks: load them all
            for i in range(len(find_parts(model).layers)):
                materialize_block(model, i, next(model.parameters()).dtype, next(model.parameters()).device)
        attach_fake_quant(model, config.spec, lm_head=config.lm_head)
        return {"method": "rtn", "layers": pack_model(model)}
    parts = find_parts(model)
    check_source_weights(model, config.spec)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    n = 0
    for i, block in enumerate(parts.layers):
        materialize_block(model, i, dtype, device)
        names = [f"{parts.layers_name}.{i}.{name}" for name in quant_targets(block)]
        attach_fake_quant(model, config.spec, names=names)
        n += pack_model(block)
        save_block(work_dir, i, block)
        release_block(block)
    if config.lm_head:
        head = [name for name in target_names(model, lm_head=True) if not name.startswith(parts.layers_name + ".")]
        attach_fake_quant(model, config.spec, lm_head=True, names=head)
        n += pack_model(model)
    return {"method": "rtn", "layers": n}
