"""A model's quantized layers: which linears are targets, swapping layers (the one helper every method uses),
packing, and how packed layers compute at inference. Generic: no per-family code."""

from __future__ import annotations

import torch
from torch import nn

from qatlm.errors import QatlmError
from qatlm.model.arch import find_parts, quant_targets, replace_module
from qatlm.quant.grid import QuantSpec
from qatlm.quant.layers import fake_quant_layer
from qatlm.quant.linear import FakeQuantLinear, PackedLinear, check_target


def target_names(model: nn.Module, lm_head: bool = False) -> list[str]:
    """Qualified names of every linear layer to quantize: all in decoder blocks but routers, (+ lm_head)."""
    parts = find_parts(model)
    names = [f"{parts.layers_name}.{i}.{n}" for i, block in enumerate(parts.layers) for n in quant_targets(block)]
    if lm_head and isinstance(parts.lm_head, nn.Linear):
        names += [n for n, m in model.named_modules() if m is parts.lm_head][:1]
    return names


def swap_layers(root: nn.Module, make, kind: type | None = None, names=None) -> dict:
    """Replace submodules of ``root`` by ``make(name, module)``: those named in ``names``, or every instance of
    ``kind``. Returns ``{name: new module}``. Every method swaps layers through this one function."""
    if names is None:
        names = [n for n, m in root.named_modules() if isinstance(m, kind)]
    new = {}
    for name in names:
        new[name] = make(name, root.get_submodule(name))
        replace_module(root, name, new[name])
    return new


def attach_fake_quant(model: nn.Module, spec: QuantSpec, lm_head: bool = False, names=None) -> dict[str, FakeQuantLinear]:
    """Replace target linears by ``FakeQuantLinear`` initialised with min-max (RTN) grids."""
    if lm_head and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the quantized head no longer shares the embedding
    names = [n for n in (names if names is not None else target_names(model, lm_head))
             if isinstance(model.get_submodule(n), nn.Linear)]

    def make(name, mod):
        check_target(name, mod, spec)
        if lm_head and name.endswith("lm_head"):
            mod.weight = nn.Parameter(mod.weight.detach().clone())
        return fake_quant_layer(mod, spec, name)
    return swap_layers(model, make, names=names)


def pack_model(model: nn.Module, kind: type = FakeQuantLinear) -> int:
    """Turn every layer of ``kind`` (any class with ``to_packed``) into a ``PackedLinear``; returns how many."""
    return len(swap_layers(model, lambda name, m: m.to_packed(), kind))


def packed_layers(model: nn.Module) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def set_kernel(model: nn.Module, kernel: str = "auto", budget_bytes: int | None = None) -> dict:
    """How packed layers compute at inference: ``plain`` (dequantize each layer at each call: no float
    weights held), ``cache`` (dequantize once and keep the float weight: fastest, costs the float model's
    size), ``int4`` (torch's CPU int4 matmul; layers it does not apply to fall back to ``cache``), or
    ``auto``: ``cache`` when all the float copies together fit in ``budget_bytes`` (default: a quarter of
    the memory still available to this process, cgroup limits included, leaving the rest to activations
    and logits), else ``plain`` — a model whose float weights do not fit in memory still evaluates.
    Returns {kernel: number of layers}."""
    if kernel not in ("auto", "plain", "cache", "int4"):
        raise QatlmError(f"unknown kernel '{kernel}': use auto, cache, int4 or plain")
    layers = packed_layers(model)
    if kernel == "auto":
        need = sum(m.in_features * m.out_features * torch.empty((), dtype=m.compute_dtype).element_size() for m in layers.values())
        if budget_bytes is None and layers:
            from qatlm.memory import available_bytes

            budget_bytes = available_bytes(next(iter(layers.values())).qweight.device) // 4
        kernel = "cache" if need <= (budget_bytes or 0) else "plain"
    counts: dict[str, int] = {}
    for m in layers.values():
        m._int4, m._cached = None, None
        m.cache_weight, used = False, "plain"
        if kernel == "int4" and m.use_int4_kernel():
            used = "int4"
        elif kernel in ("cache", "int4"):
            m.cache_weight, used = True, "cache"
        counts[used] = counts.get(used, 0) + 1
    return counts
