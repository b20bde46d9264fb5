"""Lazy loading: a model skeleton without weights, each decoder block read from the safetensors shards only
when it is needed and dropped again afterwards, so host memory does not grow with the number of blocks.

``load_lazy_model(path)`` returns the model with everything outside the decoder blocks loaded (embeddings,
final norm, head: what the embedding path and the final assembly need) and every block on the meta device.
The methods that work block by block (RTN, Block-AP) call ``materialize_block`` before a block and
``release_block`` after it; the checkpoint writer then assembles the output from the blocks written to the
work folder (``save_quantized(..., block_files=...)``). No per-family code: tensors are found by name.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qatlm.errors import QatlmError


class LazyUnsupported(QatlmError):
    """The checkpoint's tensor names are not the model's (transformers converts them while loading)."""


class ShardReader:
    """Where every tensor of a folder's safetensors shards lives; reads one tensor at a time."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple] = {}
        from qatlm.model.source import weight_files

        for f in weight_files(self.folder):
            with safe_open(f, framework="pt") as fh:
                for k in fh.keys():
                    self.where[k] = f
                    self.shapes[k] = tuple(fh.get_slice(k).get_shape())

        self.stored: dict[str, str] = {}  # model name -> name in the files, where they differ

    def rename(self, renamings: list[tuple[str, str]]) -> int:
        """Also answer to the names the regex ``(pattern, replacement)`` pairs make of the stored ones (the model's names
        for tensors a checkpoint stores under its own, e.g. Mixtral's ``block_sparse_moe.experts.N.w1``); returns how
        many names were added."""
        added = 0
        for key in list(self.where):
            new = key
            for pattern, repl in renamings:
                new = re.sub(pattern, repl, new)
            if new != key and new not in self.where:
                self.where[new], self.shapes[new], self.stored[new] = self.where[key], self.shapes[key], key
                added += 1
        return added

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.where[name], framework="pt") as fh:
            return fh.get_tensor(self.stored.get(name, name))

    def load_into(self, module: nn.Module, prefix: str, dtype: torch.dtype, device) -> None:
        """Give every meta parameter / persistent buffer of ``module`` its tensor ``prefix + name``."""
        from accelerate.utils import set_module_tensor_to_device

        missing = []
        names = [n for n, t in module.named_parameters() if t.device.type == "meta"]
        names += [n for n, t in module.named_buffers() if t is not None and t.device.type == "meta"]
        for name in names:
            key = prefix + name
            if key not in self.where:
                missing.append(key)
                continue
            value = self.get(key)
            if value.is_floating_point():
                value = value.to(dtype)
            set_module_tensor_to_device(module, name, device, value=value)
        if missing:
            raise QatlmError(f"{self.folder} lacks {len(missing)} tensor(s) the model needs (e.g. {missing[0]})")


def checkpoint_renamings(model_type: str) -> list[tuple[str, str]]:
    """How a family's checkpoints name tensors that its (defused) modules name otherwise, as regex substitutions:
    the plain renamings of defuser's registry (Mixtral: ``block_sparse_moe`` -> ``mlp``, ``w1/w3/w2`` ->
    ``gate_proj/up_proj/down_proj``). Tensors that need converting, not renaming, are not covered."""
    try:
        from defuser.model_registry import MODEL_CONFIG
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return []
    out = []
    for op in (MODEL_CONFIG.get(model_type) or {}).get("checkpoint_mapping", []):
        if type(op) is WeightRenaming:
            out += list(zip(op.source_patterns, op.target_patterns))  # regex patterns, as transformers applies them
    return out


def lazy_source(model: nn.Module) -> tuple[ShardReader, str] | None:
    """``(reader, layers prefix)`` when ``model`` was loaded lazily, else None."""
    return getattr(model, "_qatlm_lazy", None)


def load_lazy_model(path, dtype: torch.dtype | None = None, device="cpu") -> nn.Module:
    """The causal LM at ``path`` with its decoder blocks left on the meta device (see the module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from qatlm.model.arch import defuse_experts, find_parts
    from qatlm.model.source import check_fp_folder, default_dtype

    p, config = check_fp_folder(path)
    dtype = dtype or default_dtype(device)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    defuse_experts(model)  # MoE: per-expert layers, named as the checkpoint stores them
    reader = ShardReader(p)
    wanted = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t is not None and t.device.type == "meta"]
    renamed = [n for n in wanted if n not in reader.where and not (n.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if renamed and reader.rename(checkpoint_renamings(config.model_type)):
        renamed = [n for n in renamed if n not in reader.where]
    if renamed:  # e.g. tensors that transformers converts (not only renames) while loading
        raise LazyUnsupported(f"{len(renamed)} parameters are stored under other names (e.g. {renamed[0]})")
    shapes = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if b is not None}
    bad = [n for n in wanted if n in reader.shapes and tuple(shapes[n].shape) != reader.shapes[n]]
    if bad:
        raise QatlmError(f"{p}: the tensor shapes in its safetensors do not match its config.json (e.g. {bad[0]})")
    parts = find_parts(model)
    prefix = parts.layers_name + "."
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # everything outside the blocks, now (embeddings, final norm, head; rotary buffers are computed, not stored)
    outside = [n for n, _ in model.named_parameters() if not n.startswith(prefix)]
    outside += [n for n, b in model.named_buffers() if b is not None and b.device.type == "meta" and not n.startswith(prefix)]
    from accelerate.utils import set_module_tensor_to_device

    for name in outside:
        if name not in reader.where:
            if tied and name.endswith("lm_head.weight"):
                continue  # tied to the embedding: shared after tie_weights
            raise QatlmError(f"{p} lacks the tensor {name}; transformers would fill it with random values")
        value = reader.get(name)
        set_module_tensor_to_device(model, name, device, value=value.to(dtype) if value.is_floating_point() else value)
    if tied:
        model.tie_weights()
    model._qatlm_lazy = (reader, parts.layers_name)
    return model.eval()


def materialize_block(model: nn.Module, index: int, dtype: torch.dtype, device) -> None:
    reader, layers_name = lazy_source(model)
    block = model.get_submodule(layers_name)[index]
    reader.load_into(block, f"{layers_name}.{index}.", dtype, device)


def release_block(block: nn.Module) -> None:
    """Drop a block's tensors (its packed form is on disk by now) and hand the freed heap back to the OS:
    without the trim glibc keeps the pages and the RSS grows ~35 MiB per 1024-wide block (measured)."""
    import gc

    from qatlm.memory import release_freed_memory

    block.to("meta")
    gc.collect()
    release_freed_memory()


def block_file(work_dir, index: int) -> Path:
    return Path(work_dir) / "blocks" / f"block_{index:04d}.safetensors"


def save_block(work_dir, index: int, block: nn.Module, meta: dict | None = None) -> Path:
    """A finished (packed) block's tensors, written atomically to the work folder (``meta``: strings stored in the
    file's header, e.g. the run's fingerprint, so that the file can be verified without any other state)."""
    from safetensors.torch import save_file

    from qatlm.io import atomic_file

    final = block_file(work_dir, index)
    with atomic_file(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in block.state_dict().items()}, tmp, metadata=meta)
    return final


def check_source_weights(model: nn.Module, spec) -> None:
    """Before any work: every layer to quantize packs at ``spec`` and its stored weight is finite, read
    tensor by tensor from the shards (one tensor in memory at a time)."""
    from qatlm.model.arch import quant_targets
    from qatlm.quant.linear import check_packable

    reader, layers_name = lazy_source(model)
    for i, block in enumerate(model.get_submodule(layers_name)):
        for name, lin in quant_targets(block).items():
            key = f"{layers_name}.{i}.{name}"
            check_packable(key, lin.in_features, lin.out_features, spec.for_layer(key, lin.in_features))
            w = reader.get(f"{key}.weight")
            if not bool(w.isfinite().all()):
                raise QatlmError(f"{key}: the source weight has {int((~w.isfinite()).sum())} NaN/inf values; "
                                 "refusing to quantize a broken model")
