"""Find a causal LM's parts by walking it, and run its decoder layers one at a time.

Nothing here names a model family: the decoder stack is the largest ``nn.ModuleList`` of identical
blocks, the final norm is the norm beside it, embeddings and head come from the HF accessors, and
the keyword arguments a layer needs (rotary position embeddings, masks, per-layer sliding windows)
are recorded from one real forward pass of the model itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from qatlm.errors import QatlmError
from qatlm.quant.linear import FakeQuantLinear, PackedLinear

_LINEAR_LIKE = (nn.Linear, FakeQuantLinear, PackedLinear)

# linear layers inside a block that are routers / gates of a mixture of experts, never quantized
_ROUTER = re.compile(r"(^|\.)(gate|router|[a-z_]*_gate|[a-z_]*router[a-z_]*)$")


@dataclass
class ModelParts:
    layers: nn.ModuleList
    layers_name: str
    embed: nn.Module
    norm: nn.Module | None
    lm_head: nn.Module | None


def find_parts(model: nn.Module) -> ModelParts:
    best, best_name, best_params = None, "", -1
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(isinstance(s, _LINEAR_LIKE) for s in mod[0].modules()):
            continue
        n = sum(p.numel() for p in mod.parameters())
        if n > best_params:
            best, best_name, best_params = mod, name, n
    if best is None:
        raise QatlmError(f"cannot find the decoder layers of {type(model).__name__}: no list of blocks with linear layers")
    owner = model.get_submodule(best_name.rsplit(".", 1)[0]) if "." in best_name else model
    norms = [m for n, m in owner.named_children() if "norm" in n.lower() or "norm" in type(m).__name__.lower()]
    return ModelParts(
        layers=best,
        layers_name=best_name,
        embed=model.get_input_embeddings(),
        norm=norms[-1] if norms else None,
        lm_head=model.get_output_embeddings(),
    )


def _expert_count(config) -> int | None:
    for attr in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 1:
            return n
    return None


def fused_expert_params(model: nn.Module) -> list[str]:
    """Parameters that hold every expert of a mixture of experts at once: 3-D, one slice per expert."""
    n = _expert_count(getattr(model, "config", None))
    return [name for name, p in model.named_parameters() if n and p.dim() == 3 and p.shape[0] == n]


def defuse_experts(model: nn.Module) -> int:
    """Give every expert of a mixture of experts its own ``nn.Linear`` layers, in place (transformers 5 stores
    Mixtral / Qwen-MoE / OLMoE experts as fused 3-D tensors). Done with ``defuser``, the library GPTQModel uses
    for the same purpose: the forward pass is unchanged (tested to the bit), every expert is then quantized like
    any other linear layer, and its tensors carry the per-expert names that MoE checkpoints (the original ones
    and GPTQ ones) use. Works on a meta-device skeleton. Returns how many fused tensors were split."""
    import contextlib
    import io

    fused = fused_expert_params(model)
    if not fused:
        return 0
    from defuser import convert_model

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress log
        convert_model(model)
    left = fused_expert_params(model)
    if left:
        raise QatlmError(f"{len(left)} fused expert tensors (e.g. {left[0]}) could not be split into per-expert layers: "
                         f"{type(model).__name__}'s experts are not supported yet")
    return len(fused)


def is_router(name: str) -> bool:
    return bool(_ROUTER.search(name)) and not name.endswith("_proj")


def quant_targets(block: nn.Module, linear_types=(nn.Linear,)) -> dict[str, nn.Module]:
    """Every linear layer of a block except MoE routers/gates, by qualified name inside the block."""
    return {n: m for n, m in block.named_modules() if isinstance(m, linear_types) and not is_router(n)}


# projections that serving runtimes (vLLM) load as one fused layer, which holds one grid
FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_group(name: str) -> tuple[str, ...]:
    """The layer names loaded as one fused layer with ``name`` (``...self_attn.k_proj`` -> its q/k/v), or ``()``."""
    parent, _, leaf = name.rpartition(".")
    group = next((g for g in FUSED_PROJECTIONS if leaf in g), ())
    return tuple(f"{parent}.{m}" if parent else m for m in group)


def replace_module(root: nn.Module, name: str, new: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, parts: ModelParts | None = None, stop_early: bool = True,
                         stop_at: int | None = None):
    """Run the model once and record what each decoder layer receives.

    Returns ``(hidden, kwargs_per_layer)``: the hidden states entering layer 0 and, for every layer,
    the keyword arguments the model passed to it (without any KV cache). With ``stop_early`` the
    forward pass is cut off before the last layer's compute and the LM head.
    """
    parts = parts or find_parts(model)
    n = len(parts.layers)
    last = n - 1 if stop_at is None else stop_at
    hidden, kwargs_list = [None], [None] * n

    def hook(i):
        def pre(mod, args, kwargs):
            kw = dict(kwargs)
            h = args[0] if args else kw.pop("hidden_states")
            for key in ("past_key_values", "past_key_value", "layer_past"):
                if key in kw:
                    kw[key] = None
            if "use_cache" in kw:
                kw["use_cache"] = False
            if args[1:]:
                raise QatlmError(f"{type(mod).__name__} takes extra positional inputs; cannot run it on its own")
            kwargs_list[i] = kw
            if i == 0:
                hidden[0] = h
            if stop_early and i == last:
                raise _Stop

        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(parts.layers)]
    # a block whose weights are not loaded (lazy loading: on the meta device) passes its input through:
    # the keyword arguments every layer receives come from the model's own forward, not from the blocks
    skipped = [layer for layer in parts.layers if any(p.device.type == "meta" for p in layer.parameters())]
    for layer in skipped:
        layer.forward = _pass_through
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        for layer in skipped:
            del layer.forward
    return hidden[0], kwargs_list


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer on its own; returns the output hidden states."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out



@torch.no_grad()
def first_layer_input(model: nn.Module, input_ids: torch.Tensor, parts: ModelParts | None = None) -> torch.Tensor:
    """The hidden states entering decoder layer 0 (the model's own embedding path, scaling included)."""
    return capture_layer_inputs(model, input_ids, parts, stop_at=0)[0]
