"""A source model folder, checked before anything is loaded: it exists, it is a Hugging Face folder, every
safetensors file holds the bytes its header promises, its config loads without remote code, and it is a float
causal LM (or says it is quantized). Also the compute dtype a device gets."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qatlm.errors import QatlmError


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """fp32 on CPU (bf16 matmul is ~400x slower there), bf16 on an accelerator."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def check_model_dir(path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise QatlmError(f"model path {p} does not exist")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise QatlmError(f"{p} is not a Hugging Face model folder (no config.json)")
    check_safetensors(p)
    return p


def check_safetensors(folder: Path) -> None:
    """Every ``.safetensors`` file of a folder must open and hold all the bytes its header promises:
    an empty, truncated or corrupt file is named in one line before anything is loaded."""
    import struct

    for f in sorted(Path(folder).glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                if n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise QatlmError(f"{f} is not a valid safetensors file ({'empty' if size == 0 else e})") from None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise QatlmError(f"{f} is truncated: its header needs {8 + n + end:,} bytes, the file has {size:,}")


def load_config(p: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(p, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QatlmError(f"unsupported model at {p}: {first}") from None


def is_quantized_dir(path) -> bool:
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    return "quantization_config" in json.loads((p / "config.json").read_text())


def check_fp_folder(path):
    """``(folder, config)`` of a full-precision causal LM in safetensors, or a one-line error."""
    p = check_model_dir(path)
    config = load_config(p)
    if getattr(config, "quantization_config", None):
        raise QatlmError(f"{p} is already a quantized checkpoint; load it with qatlm.load_quantized")
    if not list(p.glob("*.safetensors")):
        raise QatlmError(f"{p} has no .safetensors weights (qatlm does not load pickled .bin files)")
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise QatlmError(f"{p} is not a causal language model (architectures: {', '.join(archs)}); qatlm quantizes decoder LMs")
    return p, config
