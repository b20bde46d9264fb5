"""Round-to-nearest: min-max grids, no training. Also the starting point of every training method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from qatlm.model.arch import quant_targets
from qatlm.model.lazy import check_source_weights
from qatlm.model.sequential import SequentialBlocks
from qatlm.model.layers import attach_fake_quant, pack_model, target_names
from qatlm.fields import opt
from qatlm.methods.base import Context, GridConfig
from qatlm.quant.grid import QuantSpec
from qatlm.summary import RTNSummary


@dataclass(init=False)
class RTNConfig(GridConfig):
    """Round-to-nearest on a min-max grid; the first stage of the recipes that start from it."""

    streams: ClassVar[bool] = True  # can run block by block on a lazily loaded model

    grid: QuantSpec = opt(QuantSpec, "the integer grid")
    lm_head: bool = opt(False, "also quantize the LM head (off: it stays in full precision)")
    pack: bool = opt(True, "fix the weights to integers now; off leaves the RTN grid on the float weights for a later "
                           "stage that trains from them (the dl-qat recipe)", cli=False)


def quantize_rtn(model: nn.Module, config: RTNConfig, work_dir=None, **_) -> RTNSummary:
    """RTN in place. A lazily loaded model (``model/lazy.py``) with a ``work_dir`` goes through the sequential-block
    pipeline: each block is read from the shards, quantized, written to ``work_dir/blocks`` and dropped, so a model
    larger than the memory streams through."""
    from qatlm.model.arch import defuse_experts

    defuse_experts(model)  # MoE: one linear layer per expert (the loaders have done it already)
    blocks = SequentialBlocks(model, work_dir)
    if not blocks.lazy or work_dir is None:
        blocks.materialize_all()  # a lazy model with no place to put finished blocks: load them all
        layers = attach_fake_quant(model, config.spec, lm_head=config.lm_head)
        return RTNSummary(layers=pack_model(model) if config.pack else len(layers))
    check_source_weights(model, config.spec)
    n = 0
    for i, block in blocks:
        attach_fake_quant(model, config.spec, names=[f"{blocks.name(i)}.{name}" for name in quant_targets(block)])
        n += pack_model(block)
        blocks.save(i, block)
    if config.lm_head:
        prefix = blocks.parts.layers_name + "."
        head = [name for name in target_names(model, lm_head=True) if not name.startswith(prefix)]
        attach_fake_quant(model, config.spec, lm_head=True, names=head)
        n += pack_model(model)
    return RTNSummary(layers=n)


def run(model: nn.Module, config: RTNConfig, data=None, context: Context | None = None) -> RTNSummary:
    """The method protocol (``methods/base.py``): RTN takes no data."""
    return quantize_rtn(model, config, work_dir=(context or Context()).work_dir)
