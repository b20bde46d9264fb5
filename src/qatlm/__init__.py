"""qatlm: quantization-aware training that turns a Hugging Face causal LM into a real low-bit integer model."""

from qatlm.api import METHODS, quantize, recipe
from qatlm.errors import QatlmError
from qatlm.methods.base import Context
from qatlm.methods.block_ap import BlockAPConfig
from qatlm.methods.dl_qat import DLQATConfig, train_dl_qat
from qatlm.methods.e2e_qp import E2EQPConfig, train_e2e_qp
from qatlm.methods.rtn import RTNConfig
from qatlm.model.checkpoint import checkpoint_info, load_fp_model, load_quantized, save_quantized
from qatlm.quant.grid import QuantSpec
from qatlm.recipes import RECIPES, run_recipe
from qatlm.version import __version__

__all__ = [
    "__version__",
    "METHODS",
    "RECIPES",
    "BlockAPConfig",
    "Context",
    "DLQATConfig",
    "E2EQPConfig",
    "train_dl_qat",
    "train_e2e_qp",
    "QatlmError",
    "QuantSpec",
    "RTNConfig",
    "checkpoint_info",
    "load_fp_model",
    "load_quantized",
    "quantize",
    "recipe",
    "run_recipe",
    "save_quantized",
]
