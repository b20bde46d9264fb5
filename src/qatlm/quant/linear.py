"""Quantized linear layers: a fake-quant layer for training and a packed integer layer for inference.

``FakeQuantLinear`` keeps a float weight plus trainable step sizes and zero points and computes
``F.linear(x, fake_quantize(W))``. ``PackedLinear`` holds the GPTQ tensors (``qweight``, ``qzeros``,
``scales`` fp16, ``g_idx``) and dequantizes them. ``FakeQuantLinear.to_packed()`` rounds the step sizes
to fp16 *before* taking the integers, so both layers compute the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qatlm.quant.grid import MIN_SCALE, QuantSpec, dequantize, expand_groups, fake_quantize, fp16_ste, minmax_init, quantize_to_int, round_ste
from qatlm.errors import QatlmError
from qatlm.quant.packing import pack_cols, pack_rows, unit, unpack_cols, unpack_rows


CHUNK_WEIGHTS = 1 << 22  # per-call paths dequantize at most this many weights at a time (16 MiB in fp32)


def row_chunks(out_features: int, in_features: int) -> list[tuple[int, int]]:
    """Output-row ranges of at most ``CHUNK_WEIGHTS`` weights: the float temporaries of a per-call
    dequantization (codes, expanded scales and zeros, the weight) stay this size whatever the layer."""
    rows = max(1, CHUNK_WEIGHTS // max(in_features, 1))
    return [(r, min(r + rows, out_features)) for r in range(0, out_features, rows)]


class FakeQuantLinear(nn.Module):
    """A linear layer whose weight is seen through the quantization grid (straight-through rounding)."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.data, requires_grad=linear.weight.requires_grad)
        self.bias = linear.bias
        scale, zero = self.start(linear.weight.data, spec)
        dtype = torch.float32 if linear.weight.dtype in (torch.float16, torch.bfloat16) else linear.weight.dtype
        self.scale = nn.Parameter(scale.to(dtype))
        # the symmetric zero point is fixed at 2^(b-1); the asymmetric one is trained as a float
        self.zero = nn.Parameter(zero.to(dtype), requires_grad=not spec.sym)

    @staticmethod
    def start(w: torch.Tensor, spec: QuantSpec):
        """The initial (scale, zero) per group: the min-max (RTN) grid."""
        return minmax_init(w, spec)

    def quantized_weight(self) -> torch.Tensor:
        w = fake_quantize(self.weight.to(self.scale.dtype), fp16_ste(self.scale.clamp_min(MIN_SCALE)), self.zero, self.spec)
        return w.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def integers(self):
        """(q[out,in], z[out,groups], scale_fp16[out,groups]) exactly as they will be stored."""
        scale16 = self.scale.detach().float().clamp_min(MIN_SCALE).to(torch.float16)
        q, z = quantize_to_int(self.weight.detach(), scale16.float(), self.zero.detach().float(), self.spec)
        return q, z, scale16

    @torch.no_grad()
    def to_packed(self) -> "PackedLinear":
        q, z, scale16 = self.integers()
        return PackedLinear.from_integers(q, z, scale16, self.bias, self.spec, dtype=self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.tag}"


class PackedLinear(nn.Module):
    """Inference layer over GPTQ-layout tensors (v2 zero points: stored zeros are the true zeros)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool, dtype=torch.float32):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        groups = spec.num_groups(in_features)
        words = spec.bits  # int32 words per 32 values
        self.register_buffer("qweight", torch.zeros(in_features * words // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * words // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", spec.g_idx(in_features))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.cache_weight = False
        self._cached: torch.Tensor | None = None
        self._int4 = None  # (int4-packed weight, scales-and-offsets, group) for torch's CPU int4 matmul

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``/``.half()``/``.bfloat16()`` must not touch the stored step sizes: they stay fp16
        (the format's dtype; a bf16 round trip would lose bits). Device moves still apply."""
        scales = self._buffers["scales"]
        super()._apply(fn, recurse)
        self._buffers["scales"] = scales.to(self._buffers["scales"].device)
        return self

    @classmethod
    def from_integers(cls, q, z, scale16, bias, spec: QuantSpec, dtype=torch.float32) -> "PackedLinear":
        out_f, in_f = q.shape
        layer = cls(in_f, out_f, spec, bias is not None, dtype=dtype)
        layer.qweight = pack_rows(q.t().cpu(), spec.bits, "input width").to(q.device)
        layer.qzeros = pack_cols(z.t().cpu(), spec.bits, "output width").to(q.device)
        layer.scales = scale16.t().contiguous()
        if bias is not None:
            layer.bias = bias.detach().to(dtype).clone()
        return layer

    def integers(self):
        """(q[out,in], z[out,groups], scale_fp16[out,groups]) unpacked from the stored words."""
        q = unpack_rows(self.qweight, self.spec.bits, self.in_features).t()
        z = unpack_cols(self.qzeros, self.spec.bits, self.out_features).t()
        return q, z, self.scales.t()

    def to_packed(self) -> "PackedLinear":
        return self

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        if self._cached is not None:
            return self._cached
        q, z, _ = self.integers()
        w = dequantize(q, self.scales.t().float(), z, self.spec).to(dtype or self.compute_dtype)
        if self.cache_weight:
            self._cached = w
        return w

    def weight_rows(self, r0: int, r1: int, dtype, zeros: torch.Tensor) -> torch.Tensor:
        """Output rows ``r0:r1`` of the dequantized weight, unpacked from those rows' words only
        (``zeros``: all unpacked zero points ``[out, groups]``)."""
        q = unpack_rows(self.qweight[:, r0:r1], self.spec.bits, self.in_features).t()
        return dequantize(q, self.scales[:, r0:r1].t().float(), zeros[r0:r1], self.spec).to(dtype)

    def use_int4_kernel(self) -> bool:
        """Compute with torch's CPU int4 matmul (no float weight is ever materialised), when the grid
        is 4-bit with a group of 32/64/128/256 dividing the width. ``w = s·(q − z) = s·(q − 8) + s·(8 − z)``
        is exactly the kernel's ``scale·(q − 8) + offset`` form. Returns whether it applies."""
        g = self.spec.group_width(self.in_features)
        op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
        if self.spec.bits != 4 or g not in (32, 64, 128, 256) or self.in_features % g or self.qweight.device.type != "cpu" or op is None:
            return False
        q, z, _ = self.integers()
        s = self.scales.t().float()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        self._int4 = (packed, torch.stack([s.t(), (s * (8 - z.float())).t()], dim=-1).contiguous(), g)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._int4 is not None and x.device.type == "cpu":
            packed, sz, g = self._int4
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).contiguous(), packed, g, sz.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        chunks = row_chunks(self.out_features, self.in_features)
        if self._cached is not None or self.cache_weight or len(chunks) == 1:
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        z = unpack_cols(self.qzeros, self.spec.bits, self.out_features).t()
        y = torch.cat([F.linear(x, self.weight_rows(r0, r1, x.dtype, z)) for r0, r1 in chunks], dim=-1)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.tag}, packed{', int4 kernel' if self._int4 else ''}"


class _ScaleOnlyLinearFn(torch.autograd.Function):
    """``y = x · (s ⊙ (q − z))ᵀ`` where only ``s`` (and optionally ``z``) are trainable.

    The integer weights stay packed: the float weight is rebuilt from them in the forward pass and
    again in the backward pass, a block of output rows at a time (``row_chunks``), so no full-size float
    copy of a layer — weight or weight gradient — is ever held.
    """

    @staticmethod
    def forward(ctx, x, scale, zero, layer):
        ctx.save_for_backward(x, scale, zero)
        ctx.layer = layer
        ys = [F.linear(x, layer.weight_rows(r0, r1, scale, zero).to(x.dtype)) for r0, r1 in layer.row_chunks()]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)

    @staticmethod
    def backward(ctx, gy):
        x, scale, zero = ctx.saved_tensors
        layer = ctx.layer
        spec, in_f = layer.spec, layer.in_features
        x2 = x.reshape(-1, in_f)
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = torch.zeros_like(x2)
        gs = torch.zeros_like(scale)
        gz = torch.zeros_like(zero) if ctx.needs_input_grad[2] else None
        for r0, r1 in layer.row_chunks():
            z = torch.clamp(torch.round(zero[r0:r1]), spec.zero_min, spec.qmax)
            qz = layer.codes_rows(r0, r1).float() - expand_groups(z.float(), spec, in_f)  # q − z, unpacked once
            w = expand_groups(scale[r0:r1].float(), spec, in_f) * qz  # = dequantize(q, s, z)
            gx += gy2[:, r0:r1].matmul(w.to(gy.dtype))
            gw = (gy2[:, r0:r1].t().matmul(x2.to(gy.dtype))).float()  # [rows, in]
            gs[r0:r1] = _group_sum(gw * qz, spec, in_f)
            if gz is not None:
                gz[r0:r1] = -_group_sum(gw, spec, in_f) * scale[r0:r1]
        return gx.reshape(x.shape), gs, gz, None


def _group_sum(t: torch.Tensor, spec: QuantSpec, in_f: int) -> torch.Tensor:
    n, g = spec.num_groups(in_f), spec.group_width(in_f)
    if n * g == in_f:
        return t.reshape(t.shape[0], n, g).sum(-1)
    idx = spec.g_idx(in_f).to(t.device, torch.int64).expand_as(t)
    return torch.zeros(t.shape[0], n, dtype=t.dtype, device=t.device).scatter_add_(1, idx, t)


class ScaleTrainLinear(nn.Module):
    """E2E-QP layer: frozen packed integers, trainable step sizes (and optionally zero points).

    Memory: the integer weights stay packed (``qweight``); frozen zero points stay packed integers
    (``qzeros``: no float copy, no optimizer state); the step sizes keep their fp16 values (``scale0``) and gain
    one fp32 parameter per group, their log-ratio to them (``log_scale``).
    """

    def __init__(self, packed: PackedLinear, train_zeros: bool = False):
        super().__init__()
        self.spec = packed.spec
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("g_idx", packed.g_idx)
        self.register_buffer("bias", packed.bias)
        # scale-free: the step sizes are s0 · exp(log_scale), so a step of the optimizer moves each by a fraction of
        # itself, whatever the model's weight scale (s0 is exactly the stored fp16 step size)
        self.register_buffer("scale0", packed.scales.t().contiguous())
        self.log_scale = nn.Parameter(torch.zeros(self.scale0.shape, dtype=torch.float32, device=self.scale0.device))
        if train_zeros and not self.spec.sym:
            self.zero = nn.Parameter(unpack_cols(packed.qzeros, self.spec.bits, self.out_features).t().float().contiguous())
            self.register_buffer("qzeros", None)
        else:
            self.zero = None
            self.register_buffer("qzeros", packed.qzeros)
        self.compute_dtype = packed.compute_dtype

    @property
    def scale(self) -> torch.Tensor:
        """The step sizes in fp32, ``s0 · exp(log_scale)`` (exactly s0 while log_scale is 0)."""
        return self.scale0.float() * torch.exp(self.log_scale)

    @torch.no_grad()
    def integers(self):
        """(q[out,in], z[out,groups], scale_fp16[out,groups]) as ``to_packed`` will store them."""
        q = unpack_rows(self.qweight, self.spec.bits, self.in_features).t()
        z = self.frozen_zeros() if self.zero is None else torch.round(self.zero).clamp(self.spec.zero_min, self.spec.qmax)
        return q, z.to(torch.int32), self.scale.float().clamp_min(MIN_SCALE).to(torch.float16)

    def frozen_zeros(self) -> torch.Tensor:
        return unpack_cols(self.qzeros, self.spec.bits, self.out_features).t()

    def row_chunks(self) -> list[tuple[int, int]]:
        return row_chunks(self.out_features, self.in_features)

    def codes_rows(self, r0: int, r1: int) -> torch.Tensor:
        return unpack_rows(self.qweight[:, r0:r1], self.spec.bits, self.in_features).t()

    def weight_rows(self, r0: int, r1: int, scale, zero) -> torch.Tensor:
        """fp32 rows ``r0:r1`` of ``s · (q − round(z))``."""
        z = torch.clamp(torch.round(zero[r0:r1]), self.spec.zero_min, self.spec.qmax)
        return dequantize(self.codes_rows(r0, r1), scale[r0:r1].float(), z, self.spec)

    def forward(self, x):
        s = fp16_ste(self.scale.clamp_min(MIN_SCALE))
        if self.zero is None:
            z = self.frozen_zeros().float()
        else:
            z = self.zero + (torch.round(self.zero).clamp(self.spec.zero_min, self.spec.qmax) - self.zero).detach()  # STE round+clamp
        y = _ScaleOnlyLinearFn.apply(x, s, z, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def to_packed(self) -> PackedLinear:
        q, z, s16 = self.integers()
        return PackedLinear.from_integers(q, z, s16, self.bias, self.spec, dtype=self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.tag}, packed, trainable scales"


FRAC_STEPS = 255  # DL-QAT's continuous base from a float weight: code + int8 fraction / 255 (|fraction| <= 127/255 < 1/2)


class DLQATLinear(nn.Module):
    """DL-QAT layer: ``W_int = clamp(round_STE(base + (α/r)·B·A), 0, qmax)``, ``Ŵ = (m ⊙ s)·(W_int − z)``.

    ``base`` is the stored integers when starting from a packed checkpoint, or ``W0/s + z`` when the fp
    weight is known (RTN init). Neither is held as a float: the integers stay packed (``qweight``, bits per
    weight) and the continuous base adds an int8 fraction (``frac``, 1/255 of a step), so the base costs
    at most bits + 8 bits per weight; ``s`` stays fp16 and ``z`` packed, both frozen. Trainable: the LoRA
    factors ``A`` [r, in] and ``B`` [out, r] (B starts at 0, so training starts exactly at the initial
    quantized model) and the magnitude ``m`` (one per group, or one per output channel), initialised to 1.
    The LoRA product is always taken in fp32, outside any autocast, so ``to_packed()`` (the merge) — the very same
    operations — reproduces the training-time integers bit for bit, under bf16 training too.
    """

    def __init__(self, q, frac, scale16, zero, bias, spec: QuantSpec, rank: int = 4, alpha: float | None = None,
                 magnitude: str = "group", lora: bool = True, dtype=torch.float32, generator: torch.Generator | None = None):
        super().__init__()
        self.spec = spec
        self.out_features, self.in_features = q.shape
        self.compute_dtype = dtype
        self.register_buffer("qweight", pack_rows(q.t().to(torch.int32).cpu(), spec.bits, "input width").to(q.device))
        self.register_buffer("frac", None if frac is None else frac.to(torch.int8).contiguous())
        self.register_buffer("s0", scale16.to(torch.float16).contiguous())
        z = spec.round_zero(zero).to(torch.int32)
        self.register_buffer("qzeros", pack_cols(z.t().cpu(), spec.bits, "output width").to(q.device))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        groups = scale16.shape[1]
        self.m = nn.Parameter(torch.ones(self.out_features, groups if magnitude == "group" else 1, device=q.device))
        self.rank = rank if lora else 0
        self.scaling = (alpha if alpha is not None else float(max(rank, 1))) / max(rank, 1)
        if self.rank:
            self.A = nn.Parameter((torch.randn(rank, self.in_features, generator=generator) / self.in_features**0.5).to(q.device))
            self.B = nn.Parameter(torch.zeros(self.out_features, rank, device=q.device))
        else:
            self.A = self.B = None

    @classmethod
    def from_fake_quant(cls, fq: FakeQuantLinear, **kw) -> "DLQATLinear":
        """From an fp weight with its RTN grid: base = W0/s + z (s as stored, fp16), kept as code + fraction."""
        q, z, s16 = fq.integers()
        base = fq.weight.detach().float() / expand_groups(s16.float(), fq.spec, fq.in_features) + expand_groups(z.float(), fq.spec, fq.in_features)
        frac = torch.round((base - q.float()) * FRAC_STEPS).clamp(-127, 127)
        return cls(q, frac, s16, z.float(), fq.bias, fq.spec, dtype=fq.weight.dtype, **kw)

    @classmethod
    def from_packed(cls, pk: PackedLinear, **kw) -> "DLQATLinear":
        """From stored integers (e.g. Block-AP output): base = q."""
        q, z, s16 = pk.integers()
        return cls(q, None, s16, z.float(), pk.bias, pk.spec, dtype=pk.compute_dtype, **kw)

    def base(self) -> torch.Tensor:
        q = unpack_rows(self.qweight, self.spec.bits, self.in_features).t().float()
        return q if self.frac is None else q + self.frac.float() / FRAC_STEPS

    def zeros(self) -> torch.Tensor:
        return unpack_cols(self.qzeros, self.spec.bits, self.out_features).t().float()

    def _codes(self, ste: bool) -> torch.Tensor:
        v = self.base()
        if self.rank:
            with torch.autocast(v.device.type, enabled=False):  # fp32 product, in training as in to_packed()
                v = v + self.scaling * (self.B.float() @ self.A.float())
        r = round_ste(v) if ste else torch.round(v)
        return torch.clamp(r, 0, self.spec.qmax)

    def _scale(self) -> torch.Tensor:
        s0 = self.s0.float()
        m = self.m if self.m.shape[1] == s0.shape[1] else self.m.expand_as(s0)
        return (m * s0).clamp_min(MIN_SCALE)

    def forward(self, x):
        s = fp16_ste(self._scale())
        w = expand_groups(s, self.spec, self.in_features) * (self._codes(ste=True) - expand_groups(self.zeros(), self.spec, self.in_features))
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def integers(self):
        """(q[out,in], z[out,groups], scale_fp16[out,groups]) of the merged layer: the training-time codes and m ⊙ s."""
        return self._codes(ste=False).to(torch.int32), self.zeros().to(torch.int32), self._scale().to(torch.float16)

    @torch.no_grad()
    def to_packed(self) -> PackedLinear:
        """Merge: the same integers the training forward pass used, packed; no extra inference cost."""
        q, z, s16 = self.integers()
        return PackedLinear.from_integers(q, z, s16, self.bias, self.spec, dtype=self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.tag}, rank={self.rank}, magnitude={tuple(self.m.shape)}"


def check_target(name: str, linear: nn.Linear, spec: QuantSpec):
    """A layer about to be quantized: packable widths and finite weights (a NaN would become NaN step sizes)."""
    check_packable(name, linear.in_features, linear.out_features, spec.for_layer(name, linear.in_features))
    w = linear.weight
    if w.device.type != "meta" and not bool(w.isfinite().all()):
        bad = int((~w.isfinite()).sum())
        raise QatlmError(f"{name}: the source weight has {bad} NaN/inf values; refusing to quantize a broken model")


def check_packable(name: str, in_f: int, out_f: int, spec: QuantSpec):
    if spec.kformat is not None:  # GGUF block bytes: one row of super-blocks per output channel
        return
    vals, _ = unit(spec.bits)
    for what, n in (("input", in_f), ("output", out_f)):
        if n % vals:
            raise QatlmError(f"{name}: {what} width {n} cannot be packed at {spec.bits} bits (needs a multiple of {vals})")
