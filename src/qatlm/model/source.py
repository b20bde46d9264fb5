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
    read_config_json(p)
    check_safetensors(p)
    return p


def read_config_json(folder: Path) -> dict:
    """``config.json`` as a dict, or one line saying what is wrong with it."""
    f = Path(folder) / "config.json"
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QatlmError(f"{f} cannot be read ({e.__class__.__name__})") from None
    if not text.strip():
        raise QatlmError(f"{f} is empty")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise QatlmError(f"{f} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(cfg, dict):
        raise QatlmError(f"{f} does not hold a JSON object (it holds a {type(cfg).__name__})")
    return cfg


INDEX = "model.safetensors.index.json"


def weight_files(folder) -> list[Path]:
    """The safetensors files transformers reads from a folder, and only those: ``model.safetensors``, else the shards
    ``model.safetensors.index.json`` names, else the folder's one ``.safetensors`` file. A name that is not a readable
    regular file, a shard the index names that is missing, or a second weights file beside them (a backup or a
    copy, whose tensors could be read instead) is refused in one line. [] when the folder has no safetensors."""
    folder = Path(folder)
    present = sorted(folder.glob("*.safetensors"), key=lambda f: f.name)
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors").is_symlink():  # transformers' first choice
        files = [folder / "model.safetensors"]
    elif (folder / INDEX).exists():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise QatlmError(f"{folder / INDEX} is not a valid safetensors index (no weight_map)") from None
        files = [folder / n for n in names]
        for f in files:
            if not f.exists() and not f.is_symlink():
                raise QatlmError(f"{f.name}, named by its index, is missing from {folder}")
    else:
        files = present[:1]
    for f in files:
        _check_regular(f)
    extra = [f.name for f in present if f not in files]
    if extra:
        raise QatlmError(f"{folder} holds {', '.join(extra)} beside {', '.join(f.name for f in files)}: transformers reads only "
                         "the latter, so which weights are meant is ambiguous; move the other file(s) out of the folder")
    return files


def _check_regular(f: Path) -> None:
    try:
        f.stat()
    except OSError as e:
        import errno

        if e.errno == errno.ELOOP:
            raise QatlmError(f"{f} is a symbolic-link loop") from None
        raise QatlmError(f"{f} cannot be read ({e.strerror})") from None
    if not f.is_file():
        raise QatlmError(f"{f} is not a file")


def check_safetensors(folder: Path) -> None:
    """Every weights file of a folder (``weight_files``) must open and hold all the bytes its header promises:
    an empty, truncated or corrupt file is named in one line before anything is loaded."""
    import struct

    for f in weight_files(folder):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                if n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise QatlmError(f"{f} is not a valid safetensors file ({'empty' if size == 0 else e})") from None
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
    return "quantization_config" in read_config_json(p)


def check_fp_folder(path):
    """``(folder, config)`` of a full-precision causal LM in safetensors, or a one-line error."""
    p = check_model_dir(path)
    config = load_config(p)
    if getattr(config, "quantization_config", None):
        raise QatlmError(f"{p} is already a quantized checkpoint; load it with qatlm.load_quantized")
    if not weight_files(p):
        raise QatlmError(f"{p} has no .safetensors weights (qatlm does not load pickled .bin files)")
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise QatlmError(f"{p} is not a causal language model (architectures: {', '.join(archs)}); qatlm quantizes decoder LMs")
    return p, config


# --- models named by their hub id ----------------------------------------------------------------------------------

HUB_FILES = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]  # never .bin, never code


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` (or a bare ``name``): no leading ``.``, ``/`` or ``~``, at most one ``/``, no backslash."""
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", name)) and ".." not in name


def resolve_model(name, revision: str | None = None) -> Path:
    """A model named by a local folder (which wins when it exists) or by a Hugging Face hub id (``org/name``, at
    ``revision``), fetched into the standard HF cache: safetensors, config and tokenizer files only (never pickled
    ``.bin`` weights, never remote code). With ``HF_HUB_OFFLINE=1`` only the cache is read."""
    import os

    p = Path(str(name)).expanduser()
    if p.exists() or not looks_like_hub_id(str(name)):
        if revision is not None:
            raise QatlmError(f"--revision {revision} applies to hub ids only; {name} is a local folder")
        return p
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    what = f"{name}" + (f" at revision {revision}" if revision else "")
    try:
        folder = Path(snapshot_download(str(name), revision=revision, cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                        allow_patterns=HUB_FILES, local_files_only=offline))
    except GatedRepoError:
        raise QatlmError(f"{name} is a gated repository: accept its licence on its hub page, then log in with "
                         "`hf auth login`") from None
    except RevisionNotFoundError:
        raise QatlmError(f"{name} has no revision {revision}") from None
    except RepositoryNotFoundError:
        raise QatlmError(f"no model {name} on the hub (nor a local folder of that name); a private repository needs "
                         "`hf auth login`") from None
    except LocalEntryNotFoundError:
        raise QatlmError(f"{what} is not in the local Hugging Face cache and the hub cannot be reached"
                         + (" (HF_HUB_OFFLINE is set)" if offline else "") + ": fetch it once with network access") from None
    except (HfHubHTTPError, OSError) as e:
        raise QatlmError(f"{what} could not be fetched from the hub ({str(e).splitlines()[0][:160]})") from None
    if not weight_files(folder):
        pickled = sorted(f.name for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth"))
        raise QatlmError(f"{name} has no safetensors weights" + (f" (only {', '.join(pickled)}, which qatlm never unpickles)"
                                                                  if pickled else "") + ": choose a repository that ships safetensors")
    return folder
