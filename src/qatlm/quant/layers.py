"""The layer factories every method and loader uses: the training (fake-quant) or packed layer of a linear on a
grid, uniform or K-quant, chosen by the grid the layer's width gets (``QuantSpec.layer_spec``)."""

from __future__ import annotations

import torch
from torch import nn

from qatlm.errors import QatlmError
from qatlm.quant.grid import QuantSpec
from qatlm.quant.kquant import KFakeQuantLinear, KPackedLinear
from qatlm.quant.linear import FakeQuantLinear, PackedLinear


def fake_quant_layer(linear: nn.Linear, spec: QuantSpec, name: str = "") -> FakeQuantLinear:
    """The training layer of ``linear`` (named ``name`` in the model) on its grid: ``spec``'s own for that layer in a
    mixed model; a K-quant grid falls back on widths it cannot hold."""
    ls = spec.for_layer(name, linear.in_features)
    return KFakeQuantLinear(linear, ls) if ls.kformat else FakeQuantLinear(linear, ls)


def packed_layer(in_features: int, out_features: int, spec: QuantSpec, bias: bool, dtype=torch.float32, name: str = "") -> PackedLinear:
    """An empty packed layer of this shape on the grid ``spec`` gives layer ``name``, to load stored tensors into."""
    ls = spec.for_layer(name, in_features)
    cls = KPackedLinear if ls.kformat else PackedLinear
    return cls(in_features, out_features, ls, bias, dtype=dtype)


def refuse_kquant(model: nn.Module, method: str):
    """The end-to-end methods train uniform grids' step sizes; a K-quant model is refused in one line."""
    k = next((m.spec.format for m in model.modules() if isinstance(m, (KPackedLinear, KFakeQuantLinear))), None)
    if k is not None:
        raise QatlmError(f"{method} trains uniform grids only; this model is on the {k} grid (use rtn or block-ap for K-quant grids)")
