"""qatlm: quantization-aware training that turns a Hugging Face causal LM into a real low-bit integer model."""

__version__ = "0.1.0"

from qatlm.api import METHODS, quantize  # noqa: E402
from qatlm.errors import QatlmError  # noqa: E402
from qatlm.methods.block_ap import BlockAPConfig  # noqa: E402
from qatlm.methods.dl_qat import DLQATConfig, RTNDLQATConfig, train_dl_qat  # noqa: E402
from qatlm.methods.e2e_qp import E2EQPConfig, EfficientQATConfig, train_e2e_qp  # noqa: E402
from qatlm.methods.rtn import RTNConfig  # noqa: E402
from qatlm.model.checkpoint import checkpoint_info, load_fp_model, load_quantized, save_quantized  # noqa: E402
from qatlm.quant.grid import QuantSpec  # noqa: E402

__all__ = [
    "METHODS",
    "BlockAPConfig",
    "DLQATConfig",
    "E2EQPConfig",
    "RTNDLQATConfig",
    "train_dl_qat",
    "EfficientQATConfig",
    "train_e2e_qp",
    "QatlmError",
    "QuantSpec",
    "RTNConfig",
    "checkpoint_info",
    "load_fp_model",
    "load_quantized",
    "quantize",
    "save_quantized",
]
