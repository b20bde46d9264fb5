"""The Python API: one config dataclass per method and one verb, ``quantize(model, config)``."""

from __future__ import annotations

from torch import nn

from qatlm.errors import QatlmError
from qatlm.methods.block_ap import BlockAPConfig, quantize_block_ap
from qatlm.methods.dl_qat import BlockAPDLQATConfig, RTNDLQATConfig, quantize_blockap_dlqat, quantize_rtn_dlqat
from qatlm.methods.e2e_qp import EfficientQATConfig, quantize_efficientqat
from qatlm.methods.rtn import RTNConfig, quantize_rtn

# method name -> (config class, function(model, config, **data) -> summary dict); the model is changed in place
METHODS = {
    "rtn": (RTNConfig, quantize_rtn),
    "block-ap": (BlockAPConfig, quantize_block_ap),
    "efficientqat": (EfficientQATConfig, quantize_efficientqat),
    "dl-qat": (RTNDLQATConfig, quantize_rtn_dlqat),
    "efficientqat+dl-qat": (BlockAPDLQATConfig, quantize_blockap_dlqat),
}


def method_for(config) -> str:
    for name, (cls, _) in METHODS.items():
        if type(config) is cls:
            return name
    raise QatlmError(f"unknown method config {type(config).__name__}; known: {', '.join(METHODS)}")


def quantize(model: nn.Module, config, **data) -> nn.Module:
    """Quantize ``model`` in place with the method ``config`` belongs to; returns the packed model."""
    _, fn = METHODS[method_for(config)]
    fn(model, config, **data)
    return model
