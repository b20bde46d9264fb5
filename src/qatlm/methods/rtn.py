"""Round-to-nearest: min-max grids, no training. Also the starting point of every training method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from qatlm.model.arch import find_parts, quant_targets
from qatlm.model.layers import attach_fake_quant, pack_model, target_names
from qatlm.methods.base import Context, with_grid
from qatlm.options import opt
from qatlm.quant.grid import QuantSpec


@with_grid
@dataclass
class RTNConfig:
    """Round-to-nearest on a min-max grid; the first stage of the recipes that start from it."""

    streams: ClassVar[bool] = True  # can run block by block on a lazily loaded model

    grid: QuantSpec = opt(QuantSpec, "the integer grid")
    lm_head: bool = opt(False, "also quantize the LM head (off: it stays in full precision)")
    pack: bool = opt(True, "fix the weights to integers now; off leaves the RTN grid on the float weights for a later "
                           "stage that trains from them (the dl-qat recipe)", cli=False)


def quantize_rtn(model: nn.Module, config: RTNConfig, work_dir=None, **_) -> dict:
    """RTN in place. A lazily loaded model (``model/lazy.py``) with a ``work_dir`` is done block by block:
    each block is read from the shards, quantized, written to ``work_dir/blocks`` and dropped, so a model
    larger than the memory streams through."""
    from qatlm.model.arch import defuse_experts
    from qatlm.model.lazy import check_source_weights, lazy_source, materialize_block, release_block, save_block

    defuse_experts(model)  # MoE: one linear layer per expert (the loaders have done it already)

    if lazy_source(model) is None or work_dir is None:
        if lazy_source(model) is not None:  # no place to put finished blocks: load them all
            for i in range(len(find_parts(model).layers)):
                materialize_block(model, i, next(model.parameters()).dtype, next(model.parameters()).device)
        layers = attach_fake_quant(model, config.spec, lm_head=config.lm_head)
        return {"method": "rtn", "layers": pack_model(model) if config.pack else len(layers)}
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


def run(model: nn.Module, config: RTNConfig, data=None, context: Context | None = None) -> dict:
    """The method protocol (``methods/base.py``): RTN takes no data."""
    return quantize_rtn(model, config, work_dir=(context or Context()).work_dir)
