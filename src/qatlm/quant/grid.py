"""Uniform group-wise quantization grid: the math every method shares.

A weight ``W[out, in]`` is split along the input dimension into groups of ``group_size`` columns
(``-1``: one group per output row). Group ``k`` of row ``o`` has a step size ``s[o, k]`` and an integer
zero point ``z[o, k]`` in ``[0, 2^b - 1]``:

    q = clamp(round(W / s) + z, 0, 2^b - 1)        ŵ = s · (q − z)

When ``in`` is not a multiple of the group size the last group is shorter (``g_idx = col // g``),
as in GPTQ. Everything here is a plain function of tensors; the modules live in ``linear.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from qatlm.errors import QatlmError
from qatlm.fields import check_choices, opt

SUPPORTED_BITS = (2, 3, 4, 8)
MIN_SCALE = 1e-5
MAX_GROUP = 1 << 16  # a group wider than any layer of any model is per-channel: -1 says so
QK_K = 256  # weights per llama.cpp K-quant super-block


@dataclass(frozen=True)
class KFormat:
    """One of llama.cpp's block types that qatlm trains on directly (``quant/kquant.py`` has the math): the K-quants
    (super-blocks of 256 weights whose sub-block scales are small integers under fp16 factors) and Q4_0 / Q5_0 / Q5_1 /
    Q8_0 (blocks of 32 weights, each with an fp16 step of its own)."""

    name: str  # GGML type name
    bits: int  # code bits
    sub: int  # weights per sub-block (one step size each)
    sc_max: int  # largest sub-block scale (magnitude); 0: no integer scales, the step is stored as fp16 (32-weight types)
    m_max: int  # largest integer sub-block min (0: none, or stored as fp16 when ``mins``)
    block_bytes: int  # bytes per block of ``block`` weights
    block: int = QK_K  # weights per block: 256 (a K-quant super-block) or 32
    mins: bool = False  # a min per sub-block (ŵ = step·code − min); off: symmetric codes with a sign per sub-block
    fallback: str | None = "w4g32-sym"  # the grid of rows whose width is not a multiple of ``block``

    @property
    def bpw(self) -> float:
        return 8 * self.block_bytes / self.block

    @property
    def flat(self) -> bool:
        """The step (and min) of each sub-block is an fp16 of its own, with no super-block factor."""
        return self.sc_max == 0

    @property
    def half(self) -> int:
        """The zero point of a symmetric type's codes (2^(bits-1)); the other sign of the scale makes it half − 1."""
        return 2 ** (self.bits - 1)


# rows of other widths: Q2_K..Q4_K -> Q4_0 (qatlm's long-standing choice; llama.cpp takes Q5_0 for Q4_K), Q5_K -> Q5_1 and
# Q6_K -> Q8_0 as llama.cpp does; the 32-weight types hold any width that is a multiple of 32
K_FORMATS = {
    "q2_k": KFormat("Q2_K", 2, 16, 15, 15, 84, mins=True),
    "q3_k": KFormat("Q3_K", 3, 16, 32, 0, 110),
    "q4_k": KFormat("Q4_K", 4, 32, 63, 63, 144, mins=True),
    "q5_k": KFormat("Q5_K", 5, 32, 63, 63, 176, mins=True, fallback="q5_1"),
    "q6_k": KFormat("Q6_K", 6, 16, 128, 0, 210, fallback="w8g32-sym"),
    "q4_0": KFormat("Q4_0", 4, 32, 0, 0, 18, block=32, fallback=None),
    "q5_0": KFormat("Q5_0", 5, 32, 0, 0, 22, block=32, fallback=None),
    "q5_1": KFormat("Q5_1", 5, 32, 0, 0, 24, block=32, mins=True, fallback=None),
    "q8_0": KFormat("Q8_0", 8, 32, 0, 0, 34, block=32, fallback=None),
}
GRIDS = ("uniform", *K_FORMATS, "k")
MENU = "w2g64,w2g128,w3g64,w3g128,w4g64,w4g128,w8g128-sym"  # the grids a --target-bpw allocation chooses from (8-bit symmetric: Q8_0 holds it)
# under a K-quant grid: llama.cpp's K types, and for any layer the types of 32-weight blocks (Q4_0, Q5_0, Q5_1, Q8_0),
# which also hold the layers whose width is not a multiple of 256
K_MENU = "q2_k,q3_k,q4_k,q5_k,q6_k,q4_0,q5_0,q5_1,q8_0"


@dataclass(frozen=True)
class QuantSpec:
    """What grid the weights live on: bit width, group size (-1 = per output channel), symmetry."""

    bits: int = opt(4, "weight bits: 2, 3, 4 or 8")
    group_size: int = opt(128, "columns per quantization group, -1 = per output channel")
    sym: bool = opt(False, "symmetric grid (zero point fixed at 2^(bits-1)); off: asymmetric")
    zero_min: int = opt(0, "keep every zero point >= 1 (initialisation and training), so that `qatlm export --format gptq-v1` "
                           "is exact", flag="v1-zeros", as_bool=True)
    format: str = opt("uniform", "grid family: uniform (--bits/--group-size/--sym), or a llama.cpp type that exports to GGUF "
                                 "bit-exactly: the K-quants q2_k (2.625 bits/weight), q3_k (3.44), q4_k (4.5), q5_k (5.5), "
                                 "q6_k (6.56) in super-blocks of 256 weights (layers of other widths: Q4_0; Q5_1 under q5_k, "
                                 "Q8_0 under q6_k), q4_0 (4.5), q5_0 (5.5), q5_1 (6), q8_0 (8.5) in blocks of 32; k: with "
                                 "--target-bpw, each layer "
                                 "gets the llama.cpp type of --bit-menu it needs (default " + K_MENU + ")", flag="grid", choices=GRIDS,
                      what="grid")
    target_bpw: float | None = opt(None, "mixed precision: a budget in bits per quantized weight (step sizes, zero points and "
                                         "group indices counted, as `qatlm info` counts them); each layer gets the grid of --bit-menu "
                                         "that a sensitivity measured on the calibration data says it needs. Unset: one grid for every layer",
                                   flag="target-bpw")
    menu: str = opt(MENU, "the grids a --target-bpw allocation chooses from, comma-separated (wBgG, -sym for a symmetric one; the others follow --sym)",
                    flag="bit-menu")
    tie_fused: bool = opt(False, "with --target-bpw: one grid for each group of projections vLLM loads as one fused layer "
                                 "(q/k/v, gate/up), so that the mix can serve in vLLM; their sensitivities and bytes add up",
                          flag="tie-fused")
    layers: tuple = opt((), "per-layer grids of a mixed model: (layer name, grid tag) pairs, set by the allocation", cli=False)

    def __post_init__(self):
        check_choices(self)
        if self.format == "k":  # a mix of llama.cpp's types: the cheapest K type is the base, the menu the K menu
            if self.target_bpw is None and not self.layers:
                raise QatlmError("--grid k mixes llama.cpp's types within a budget: give --target-bpw (or one type: --grid "
                                 + "|".join(K_FORMATS) + ")")
            object.__setattr__(self, "format", next(iter(K_FORMATS)))
        if self.format != "uniform":  # the K-quant type fixes bits and sub-block size
            k = K_FORMATS[self.format]
            if self.sym or self.zero_min:
                raise QatlmError(f"--grid {self.format} has its own zero points: drop --sym/--v1-zeros")
            if (self.bits, self.group_size) not in ((4, 128), (k.bits, k.sub)):
                raise QatlmError(f"--grid {self.format} fixes {k.bits}-bit codes in sub-blocks of {k.sub}: drop --bits/--group-size")
            object.__setattr__(self, "bits", k.bits)
            object.__setattr__(self, "group_size", k.sub)
            if self.target_bpw is not None and self.menu == MENU:  # a K-quant mix chooses among llama.cpp's types
                object.__setattr__(self, "menu", K_MENU)
        if self.zero_min not in (0, 1):
            raise QatlmError(f"zero_min must be 0 or 1, not {self.zero_min}")
        if self.kformat is None and self.bits not in SUPPORTED_BITS:
            hint = "; 5 and 6 bits are llama.cpp's types: --grid q5_0|q5_1|q5_k|q6_k" if self.bits in (5, 6) else ""
            raise QatlmError(f"bits={self.bits} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}{hint}")
        if not (self.group_size == -1 or (self.group_size > 0 and self.group_size % 8 == 0)):
            raise QatlmError(f"group size {self.group_size} is invalid; use -1 (per channel) or a positive multiple of 8")
        if self.group_size > MAX_GROUP:
            raise QatlmError(f"group size {self.group_size} is larger than {MAX_GROUP}, wider than any layer; use -1 for one "
                             "group per output row")
        self._check_mixed()

    def _check_mixed(self):
        if self.tie_fused and self.target_bpw is None:
            raise QatlmError("--tie-fused ties the grids a --target-bpw allocation chooses: give --target-bpw too")
        if self.target_bpw is not None:
            if isinstance(self.target_bpw, bool) or not isinstance(self.target_bpw, (int, float)) or not 1.0 < self.target_bpw <= 16.0:
                raise QatlmError(f"--target-bpw {self.target_bpw!r} is not a budget qatlm can meet: give bits per weight between 1 and 16")
            menu = self.menu_specs()
            if not menu:
                raise QatlmError("--bit-menu is empty: name at least one grid, e.g. w2g64,w4g128")
        object.__setattr__(self, "layers", tuple((str(n), str(t)) for n, t in self.layers))
        for _, t in self.layers:
            spec_from_tag(t, self)

    def menu_specs(self) -> list["QuantSpec"]:
        """The grids of ``--bit-menu`` (under a K-quant grid the K menu unless one is given), each with this grid's
        symmetry and zero-point rule, cheapest first."""
        specs = [spec_from_tag(t.strip(), self) for t in self.menu.split(",") if t.strip()]
        return sorted(set(specs), key=lambda s: (s.bits, -s.group_size if s.group_size != -1 else -MAX_GROUP, s.format))

    def stored_grid(self, layer: str) -> "QuantSpec":
        """The uniform grid of a layer stored as GPTQ tensors (``qweight``): its own in a mixed model; under a K-quant
        base grid, a layer with no grid of its own is one the K type cannot hold (its ``fallback``)."""
        tag = self._layer_tags.get(layer)
        if tag is not None:
            return spec_from_tag(tag, self)
        return self.fallback if self.kformat is not None else self.plain

    @property
    def fallback(self) -> "QuantSpec":
        """The grid a K-quant type gives rows whose width it cannot hold (``KQUANT_FALLBACK``, Q4_0, for Q2_K..Q4_K)."""
        fb = self.kformat.fallback if self.kformat is not None else None
        return self if fb is None else spec_from_tag(fb)

    @property
    def plain(self) -> "QuantSpec":
        """This grid without the mixed-precision plan (what one layer is on)."""
        if self.target_bpw is None and not self.layers and self.menu == MENU and not self.tie_fused:
            return self
        return replace(self, target_bpw=None, layers=(), menu=MENU, tie_fused=False)

    @property
    def mixed(self) -> bool:
        return self.target_bpw is not None or bool(self.layers)

    @cached_property
    def _layer_tags(self) -> dict:
        return dict(self.layers)

    def for_layer(self, name: str, in_features: int) -> "QuantSpec":
        """The grid of layer ``name`` (``in_features`` wide): its own in a mixed model, else this one (a K-quant grid
        falls back on widths it cannot hold)."""
        tag = self._layer_tags.get(name)
        return (self.plain if tag is None else spec_from_tag(tag, self)).layer_spec(in_features)

    def layer_bytes(self, in_features: int, out_features: int) -> int:
        """Bytes of one packed layer on this grid (codes, step sizes, zero points, group index; bias not counted):
        what `qatlm info` counts as quantized bytes."""
        if self.kformat is not None:
            if in_features % self.kformat.block == 0:
                return in_features * out_features // self.kformat.block * self.kformat.block_bytes
            return self.fallback.layer_bytes(in_features, out_features)
        groups = self.num_groups(in_features)
        return 4 * (in_features * self.bits // 32) * out_features + 4 * groups * (out_features * self.bits // 32) \
            + 2 * groups * out_features + 4 * in_features

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def kformat(self) -> KFormat | None:
        """The K-quant type of this grid, or None for a uniform grid."""
        return K_FORMATS.get(self.format)

    def layer_spec(self, in_features: int) -> "QuantSpec":
        """The grid of one layer: this one, except that a K-quant grid needs widths that are a multiple of 256
        (as llama.cpp's own quantizer does, other widths get the type's ``fallback``: Q4_0 for Q2_K..Q4_K, i.e. 4-bit
        symmetric groups of 32; Q5_1 for Q5_K; Q8_0 for Q6_K)."""
        if self.kformat is None or in_features % self.kformat.block == 0:
            return self
        return self.fallback

    def round_zero(self, zero: torch.Tensor) -> torch.Tensor:
        """A (float, trained) zero point as the integer it is stored as: rounded, clamped to [zero_min, qmax]."""
        return zero.round().clamp(self.zero_min, self.qmax)

    def group_width(self, in_features: int) -> int:
        """Columns per group of a layer this wide (a group at least as wide as the layer is the whole row)."""
        return in_features if self.group_size == -1 else min(self.group_size, in_features)

    def num_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_width(in_features))

    def g_idx(self, in_features: int) -> torch.Tensor:
        return torch.arange(in_features, dtype=torch.int32) // self.group_width(in_features)

    @property
    def tag(self) -> str:
        if self.target_bpw is not None:
            return f"mixed{self.target_bpw:g}"
        if self.layers:
            return "mixed"
        if self.kformat is not None:
            return self.format
        g = "c" if self.group_size == -1 else str(self.group_size)
        return f"w{self.bits}g{g}{'-sym' if self.sym else ''}"


KQUANT_FALLBACK = QuantSpec(bits=4, group_size=32, sym=True)
_TAG = re.compile(r"w(\d+)g(\d+|c)(-sym)?")


def spec_from_tag(tag: str, base: QuantSpec | None = None) -> QuantSpec:
    """``w4g64`` / ``w3gc`` / ``w4g128-sym`` / ``q4_k`` as a plain grid; a tag without ``-sym`` takes ``base``'s symmetry,
    and ``base``'s zero-point rule applies (one line naming a tag that is none of these)."""
    if tag in K_FORMATS:
        return QuantSpec(format=tag)
    m = _TAG.fullmatch(tag)
    if not m:
        raise QatlmError(f"'{tag}' is not a grid: write wBgG (e.g. w4g128, w2g64, w4gc for per channel, -sym for symmetric)")
    sym = bool(m.group(3)) or bool(base is not None and base.sym)
    zmin = base.zero_min if base is not None and not sym else 0
    return QuantSpec(bits=int(m.group(1)), group_size=-1 if m.group(2) == "c" else int(m.group(2)), sym=sym, zero_min=zmin)


def ggml_name(spec: QuantSpec) -> str | None:
    """The llama.cpp tensor type that stores ``spec`` exactly, or None: a K type; 4-bit groups of 32 as Q4_0 (symmetric)
    or Q4_1; 8-bit symmetric groups of 32 as Q8_0."""
    if spec.kformat is not None:
        return spec.kformat.name
    if spec.group_size == 32 and (spec.bits, spec.sym) in ((4, True), (4, False), (8, True)):
        return {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}[(spec.bits, spec.sym)]
    return None


def grid_names(tags) -> dict[str, str]:
    """How a mix's grid tags are shown: where the mix holds a llama.cpp K type, every tag GGUF stores exactly by its
    llama.cpp type name (``q3_k`` -> ``Q3_K``, ``w4g32-sym`` -> ``Q4_0``); otherwise the tags themselves."""
    tags = list(tags)
    k = any(t in K_FORMATS for t in tags)
    return {t: (ggml_name(spec_from_tag(t)) or t) if k else t for t in tags}


def expand_groups(t: torch.Tensor, spec: QuantSpec, in_features: int) -> torch.Tensor:
    """Per-group tensor ``[out, groups]`` -> per-column ``[out, in]`` (last group may be short)."""
    g = spec.group_width(in_features)
    if t.shape[1] * g == in_features:
        return t.repeat_interleave(g, dim=1)
    return t.repeat_interleave(g, dim=1)[:, :in_features]


def group_reduce(w: torch.Tensor, spec: QuantSpec, op: str) -> torch.Tensor:
    """Reduce ``W[out, in]`` over each group with ``op`` in {'amin', 'amax'} -> ``[out, groups]``."""
    out_f, in_f = w.shape
    g = spec.group_width(in_f)
    n = spec.num_groups(in_f)
    if n * g != in_f:  # short last group: pad it with copies of its own last column (min/max unchanged)
        w = torch.cat([w, w[:, -1:].expand(out_f, n * g - in_f)], dim=1)
    v = w.reshape(out_f, n, g)
    return v.amin(-1) if op == "amin" else v.amax(-1)


def minmax_init(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest min-max grid: returns float ``scale`` and integer-valued ``zero``, both ``[out, groups]``."""
    w = w.detach().float()
    wmin = group_reduce(w, spec, "amin")
    wmax = group_reduce(w, spec, "amax")
    if spec.sym:
        amax = torch.maximum(wmax.abs(), wmin.abs())
        scale = (2 * amax / spec.qmax).clamp_min(MIN_SCALE)
        zero = torch.full_like(scale, float(2 ** (spec.bits - 1)))
    else:
        scale = ((wmax - wmin) / spec.qmax).clamp_min(MIN_SCALE)
        zero = spec.round_zero(-wmin / scale)
    return scale, zero


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through (identity) gradient."""
    return _RoundSTE.apply(x)


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (how step sizes are stored) with an identity gradient."""
    return x + (x.detach().half().to(x.dtype) - x.detach())


class _FakeQuantGrouped(torch.autograd.Function):
    """Fused fake quantization for ``in % g == 0`` on ``[out, groups, g]`` views, with the gradients of
    the straight-through estimator written out (saves the half-dozen full-size temporaries autograd keeps):
    inside the range dŵ/dw = 1, dŵ/ds = round(w/s) − w/s, dŵ/dz = 0; clamped: dŵ/dw = 0,
    dŵ/ds = q − z, dŵ/dz = −s."""

    @staticmethod
    def forward(ctx, w, scale, zero, spec):
        qmax = spec.qmax
        s = scale.unsqueeze(-1)
        z = spec.round_zero(zero).unsqueeze(-1)
        ws = w / s
        raw = torch.round(ws) + z
        inside = (raw >= 0) & (raw <= qmax)
        qz = raw.clamp_(0, qmax).sub_(z)  # q − z
        ctx.save_for_backward(ws, qz, inside, s)
        return qz * s

    @staticmethod
    def backward(ctx, g):
        ws, qz, inside, s = ctx.saved_tensors
        gw = g * inside
        gs = (g * (qz - ws * inside)).sum(-1)
        gz = -(g * ~inside * s).sum(-1)
        return gw, gs, gz, None


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Differentiable ``ŵ = s · (clamp(round(w/s) + z, 0, qmax) − z)``.

    ``scale`` and ``zero`` are per group ``[out, groups]``; ``zero`` may be a float parameter: it is rounded
    (straight-through) and clamped to the integer range here. Gradients reach ``w``, ``scale`` and ``zero``.
    """
    out_f, in_f = w.shape
    n, g = scale.shape[1], spec.group_width(in_f)
    if n * g == in_f:
        return _FakeQuantGrouped.apply(w.reshape(out_f, n, g), scale, zero, spec).reshape(out_f, in_f)
    return fake_quantize_reference(w, scale, zero, spec)


def fake_quantize_reference(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The same function composed from autograd ops (any group layout, ragged last group included)."""
    in_f = w.shape[1]
    s = expand_groups(scale, spec, in_f)
    # rounded and clamped zero point with an identity gradient (as the fused path and the reference: a zero
    # point that has left the range still receives its gradient)
    zq = zero + (spec.round_zero(zero.detach()) - zero.detach())
    z = expand_groups(zq, spec, in_f)
    q = torch.clamp(round_ste(w / s) + z, 0, spec.qmax)
    return s * (q - z)


@torch.no_grad()
def quantize_to_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec):
    """Integers of ``w`` on the grid: ``(q[out, in] int32, z[out, groups] int32)``, both clamped to range."""
    in_f = w.shape[1]
    z = spec.round_zero(zero)
    q = torch.clamp(torch.round(w.float() / expand_groups(scale.float(), spec, in_f)) + expand_groups(z, spec, in_f), 0, spec.qmax)
    return q.to(torch.int32), z.to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, dtype=torch.float32) -> torch.Tensor:
    """``s · (q − z)`` with per-group ``scale``/``zero`` ``[out, groups]`` and ``q[out, in]``."""
    in_f = q.shape[1]
    s = expand_groups(scale.to(dtype), spec, in_f)
    z = expand_groups(zero.to(dtype), spec, in_f)
    return s * (q.to(dtype) - z)
