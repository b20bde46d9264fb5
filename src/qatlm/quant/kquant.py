"""llama.cpp's block types (the K-quants Q2_K..Q6_K, and Q4_0 / Q5_0 / Q5_1 / Q8_0) as trainable quantization grids.

A K-quant row is cut into super-blocks of 256 weights, each cut into sub-blocks of ``B`` weights (16 for
Q2_K/Q3_K/Q6_K, 32 for Q4_K/Q5_K). A sub-block ``j`` has a small-integer scale ``sc_j`` and (Q2_K, Q4_K, Q5_K) a
small-integer min ``m_j``; the super-block has the fp16 factors ``d`` and (with mins) ``dmin``:

    Q2_K, Q4_K, Q5_K:  ŵ = d·sc_j · q − dmin·m_j   q ∈ [0, 2^b − 1], sc_j, m_j ∈ [0, 15] (Q2_K) / [0, 63]
    Q3_K:              ŵ = d·(sc_j − 32) · (u − 4)  u ∈ [0, 7], sc_j ∈ [0, 63]  (signed 6-bit scales)
    Q6_K:              ŵ = d·sc_j · (u − 32)        u ∈ [0, 63], sc_j ∈ [−128, 127]  (int8 scales)

Q4_0, Q5_0, Q5_1 and Q8_0 have blocks of 32 weights with an fp16 step each and no super-block: ŵ = d·(u − 2^(b−1))
with d signed (Q4_0, Q5_0, Q8_0), ŵ = d·q + m with an fp16 min m (Q5_1). (qatlm's uniform ``w4g32-sym`` / ``w8g32-sym``
grids are stored as Q4_0 / Q8_0 too, with d > 0: the block types add the sign, which lets the larger-magnitude side of
a block have the extra code, as llama.cpp's own quantizer does.)

qatlm trains a sub-block step ``s_j > 0`` and offset ``z_j`` (in steps) as it does for its uniform grid
(``grid.py``), and sees them through the format at every forward pass: the super-block factors are re-fitted
from the current steps (``d = fp16(max_j s_j / sc_max)``), the steps and offsets are rounded onto ``d·sc`` /
``dmin·m`` (the 32-weight types: to fp16), straight-through, then the weights onto the sub-block grid. The symmetric types
(Q3_K, Q6_K, Q4_0, Q5_0, Q8_0) have a sign per sub-block; with a positive step that is a zero point of h = 2^(b−1) (a
positive scale: codes ``u − h`` in [−h, h−1]) or h − 1 (a negative scale, codes stored as ``2^b − 1 − u``: the
range [−(h−1), h]), so ``z_j`` is trained in [h − 1, h] and rounded.

``pack_blocks`` writes the integers as the GGUF block bytes, so a ``KPackedLinear`` *is* its llama.cpp tensor
and the GGUF export copies it: the file's dequantized weights equal qatlm's bit for bit (same fp32 products
in the same order as ggml's and the ``gguf`` package's dequantizers). Rows whose width is not a multiple of
256 cannot be K-quant tensors; they take the type's ``fallback`` (``grid.py``): for Q2_K..Q4_K a 4-bit symmetric
grid with groups of 32, which GGUF stores exactly as Q4_0 (4.5 bits per weight; llama.cpp's own quantizer takes
Q5_0 for Q4_K), Q5_1 for Q5_K and Q8_0 for Q6_K as llama.cpp does.

The start (``kquant_search_init``) searches each sub-block's grid width as llama.cpp's quantizer does (several
clippings, least-squares refit of step and offset to the codes, the best kept): on SmolLM2's ``down_proj`` its
weight error after the hierarchy is 0.074 (relative, Q2_K) against 0.110 for min-max and 0.093 for llama.cpp's
own Q2_K of the same weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qatlm.errors import QatlmError
from qatlm.quant.grid import MIN_SCALE, QK_K, KFormat, QuantSpec, expand_groups, group_reduce, round_ste
from qatlm.quant.linear import FakeQuantLinear, PackedLinear


def kquant_spec(spec: QuantSpec) -> KFormat:
    fmt = spec.kformat
    if fmt is None:
        raise QatlmError(f"{spec.tag} is not a K-quant grid")
    return fmt


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _super(t: torch.Tensor, fmt: KFormat) -> torch.Tensor:
    """``[out, sub-blocks]`` -> ``[out, blocks, sub-blocks per block]``."""
    return t.reshape(t.shape[0], -1, fmt.block // fmt.sub)


def kquant_init(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest start: per sub-block min-max step and offset (types with mins: the offset is −min; the integer
    mins of Q2_K/Q4_K/Q5_K are >= 0, so a sub-block of positive weights gets offset 0); symmetric types: the sign that
    puts the larger-magnitude extreme on the long side of the codes. Returns float ``(scale, zero)`` ``[out, sub-blocks]``."""
    w = w.detach().float()
    fmt = kquant_spec(spec)
    wmin = group_reduce(w, spec, "amin")
    wmax = group_reduce(w, spec, "amax")
    if fmt.mins:
        if not fmt.flat:
            wmin = wmin.clamp_max(0.0)
        scale = ((wmax - wmin) / spec.qmax).clamp_min(MIN_SCALE)
        zero = -wmin / scale  # an offset in steps: any size (the format stores it as dmin·m, or Q5_1's fp16 min)
        return scale, (zero if fmt.flat else zero.clamp_min(0))
    h = fmt.half
    neg = wmin.abs() >= wmax.abs()  # the negative extreme is larger: codes −h..h−1 (zero h)
    scale = torch.where(neg, wmin.abs() / h, wmax.abs() / h).clamp_min(MIN_SCALE)
    zero = torch.where(neg, float(h), float(h - 1))
    return scale, zero


def _subblocks(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return w.detach().float().reshape(w.shape[0], -1, spec.group_size)


def kquant_search_init(w: torch.Tensor, spec: QuantSpec, candidates: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The RTN start with a search, as llama.cpp's own quantizer does: per sub-block, several grid widths are tried
    (the min-max width divided by 1 … 0.55; symmetric types: both signs), the codes taken on each, step and offset
    refitted to them by least squares, and the pair with the smallest squared error kept. Returns ``(scale, zero)``."""
    x = _subblocks(w, spec)  # [out, sub-blocks, n]
    fmt = kquant_spec(spec)
    best_err = torch.full(x.shape[:2], float("inf"))
    best_s, best_z = kquant_init(w, spec)
    best_s, best_z = best_s.clone(), best_z.clone()
    shrink = torch.linspace(1.0, 0.55, candidates)
    if fmt.mins:
        free = fmt.flat  # Q5_1's fp16 min has either sign; the integer mins of the K types are >= 0
        lo = x.amin(-1) if free else x.amin(-1).clamp_max(0.0)
        width = (x.amax(-1) - lo).clamp_min(MIN_SCALE)
        n = x.shape[-1]
        for f in shrink:
            s0 = width * f / spec.qmax
            for shift in (0.0, 0.5):  # where the shrunk grid sits: against the min, or centred
                b0 = -(lo + shift * (1 - f) * width)
                L = torch.clamp(torch.round((x + b0.unsqueeze(-1)) / s0.unsqueeze(-1)), 0, spec.qmax)
                sL, sL2, sx, sLx = L.sum(-1), (L * L).sum(-1), x.sum(-1), (L * x).sum(-1)
                den = n * sL2 - sL * sL
                a = torch.where(den > 0, (n * sLx - sL * sx) / den.clamp_min(1e-12), s0)
                b = (sx - a * sL) / n  # ŵ = a·L + b; an integer min needs b <= 0 (an offset >= 0)
                if not free:
                    pos = b > 0
                    a = torch.where(pos, sLx / sL2.clamp_min(1e-12), a)
                    b = torch.where(pos, torch.zeros_like(b), b)
                a = a.clamp_min(MIN_SCALE)
                err = ((a.unsqueeze(-1) * L + b.unsqueeze(-1) - x) ** 2).sum(-1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_s = torch.where(better, a, best_s)
                best_z = torch.where(better, -b / a if free else (-b / a).clamp_min(0), best_z)
        return best_s, best_z
    h = float(fmt.half)
    for z in (h, h - 1):  # zero h: codes −h..h−1 (the negative end is the long one); zero h − 1: −(h−1)..h
        end = (-x.amin(-1) / h) if z == h else (x.amax(-1) / h)
        for f in shrink:
            s0 = (end * f).clamp_min(MIN_SCALE)
            c = torch.clamp(torch.round(x / s0.unsqueeze(-1)) + z, 0, spec.qmax) - z
            a = ((c * x).sum(-1) / (c * c).sum(-1).clamp_min(1e-12)).clamp_min(MIN_SCALE)
            err = ((a.unsqueeze(-1) * c - x) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, a, best_s)
            best_z = torch.where(better, torch.full_like(best_z, z), best_z)
    return best_s, best_z


def _fp16_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (_fp16(x.detach()) - x.detach())


def _quantized_scales(scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, ste: bool):
    """The sub-block steps and offsets after the format's own rounding: (s_q, b_q, z_q, parts) where ŵ = s_q·code − b_q
    (types with mins; ``z_q`` None) or ŵ = s_q·(code − z_q) (symmetric types; ``b_q`` None). ``parts``: the stored
    integers and fp16 factors (d, sc, dmin, m). K types: the super-block factors are fitted to the detached steps
    (re-fitted at each call) and the steps rounded onto them; the 32-weight types: each step (and min) is rounded to
    fp16. All roundings are straight-through when ``ste``."""
    fmt = kquant_spec(spec)
    rnd = round_ste if ste else torch.round
    s = scale.float().clamp_min(MIN_SCALE)
    zq = None
    if not fmt.mins:
        h = float(fmt.half)
        zq = zero.float().clamp(h - 1, h)
        zq = zq + (torch.round(zq.detach()) - zq.detach())  # rounded, straight-through
    if fmt.flat:
        f16 = _fp16_ste if ste else _fp16
        s_q = f16(s)
        parts = {"d": _fp16(s.detach())}
        if not fmt.mins:
            return s_q, None, zq, parts
        b_q = f16(s * zero.float())  # Q5_1 stores the min −b as fp16: either sign
        parts["m"] = -_fp16((s * zero.float()).detach())
        return s_q, b_q, None, parts
    if fmt.mins:
        hi = torch.full_like(s, float(fmt.sc_max))
    else:  # a positive scale reaches sc_max − 1, a negative one −sc_max (Q3_K: 31 / −32; Q6_K: 127 / −128)
        hi = torch.where(zq.detach() > fmt.half - 0.5, float(fmt.sc_max - 1), float(fmt.sc_max))
    d = _fp16((_super(s.detach(), fmt) / _super(hi, fmt)).amax(-1))  # [out, super]
    d = torch.where(d > 0, d, torch.full_like(d, 2.0**-24))
    de = d.repeat_interleave(fmt.block // fmt.sub, dim=1)
    sc = torch.minimum(rnd(s / de).clamp_min(0), hi)
    s_q = de * sc
    parts = {"d": d, "sc": sc.detach()}
    if not fmt.mins:
        return s_q, None, zq, parts
    b = (s * zero.float()).clamp_min(0)  # the offset in weight units: −min of the sub-block's grid
    dmin = _fp16((_super(b.detach(), fmt) / fmt.m_max).amax(-1))
    dmin = torch.where(dmin > 0, dmin, torch.full_like(dmin, 2.0**-24))
    dme = dmin.repeat_interleave(fmt.block // fmt.sub, dim=1)
    m = rnd(b / dme).clamp(0, fmt.m_max)
    parts.update(dmin=dmin, m=m.detach())
    return s_q, dme * m, None, parts


def kquant_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Differentiable ŵ on the K grid (straight-through rounding of codes, steps and offsets)."""
    in_f = w.shape[1]
    s_q, b_q, z_q, _ = _quantized_scales(scale, zero, spec, ste=True)
    s = expand_groups(s_q, spec, in_f)
    safe = s.clamp_min(2.0**-24)  # a sub-block scale of 0 decodes to a constant: any code will do
    if b_q is not None:
        b = expand_groups(b_q, spec, in_f)
        q = torch.clamp(round_ste((w.float() + b) / safe), 0, spec.qmax)
        return s * q - b
    z = expand_groups(z_q, spec, in_f)
    q = torch.clamp(round_ste(w.float() / safe) + z, 0, spec.qmax)
    return s * (q - z)


@torch.no_grad()
def kquant_integers(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> dict:
    """The stored integers: codes ``q`` [out, in] (symmetric types: ``u`` with ŵ = d·sc·(u − 2^(b−1)), the sign in
    ``sc`` or in Q5_0's ``d``), ``sc`` (Q3_K: stored as sc + 32 in 0..63; Q6_K: int8), ``m``, fp16 ``d``/``dmin``
    per block (Q5_1: fp16 ``m``, the min itself)."""
    in_f = w.shape[1]
    fmt = kquant_spec(spec)
    s_q, b_q, z_q, parts = _quantized_scales(scale, zero, spec, ste=False)
    s = expand_groups(s_q, spec, in_f).clamp_min(2.0**-24)
    if b_q is not None:
        q = torch.clamp(torch.round((w.float() + expand_groups(b_q, spec, in_f)) / s), 0, spec.qmax).to(torch.uint8)
        if fmt.flat:
            return {"q": q, "d": parts["d"].half(), "m": parts["m"].half()}
        return {"q": q, "sc": parts["sc"].to(torch.uint8), "m": parts["m"].to(torch.uint8),
                "d": parts["d"].half(), "dmin": parts["dmin"].half()}
    z = expand_groups(z_q, spec, in_f)
    q = torch.clamp(torch.round(w.float() / s) + z, 0, spec.qmax)  # ŵ = s·(q − z)
    pos = z_q > fmt.half - 0.5  # zero h: a positive scale, u = q;  zero h − 1: a negative scale, u = qmax − q
    u = torch.where(expand_groups(pos, spec, in_f), q, spec.qmax - q).to(torch.uint8)
    if fmt.flat:
        return {"q": u, "d": torch.where(pos, parts["d"], -parts["d"]).half()}
    sc = torch.where(pos, parts["sc"], -parts["sc"])
    sc = (sc + 32).to(torch.uint8) if fmt.name == "Q3_K" else sc.to(torch.int8)
    return {"q": u, "sc": sc, "d": parts["d"].half()}


# ---- GGUF block bytes (ggml's block_q2_K .. block_q6_K, block_q5_0 / block_q5_1), packed and decoded with numpy ----

def _pack_2bit_planes(q: np.ndarray) -> np.ndarray:
    """[n, 256] 2-bit values -> [n, 64] bytes: weight h·128 + j·32 + l sits in byte h·32 + l at bits 2j."""
    v = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(-1, 64)


def _pack_nibbles(q: np.ndarray, span: int) -> np.ndarray:
    """Low 4 bits of [n, k] values as k/2 bytes: in each run of 2·``span`` weights, weight j < span in the low nibble of
    byte j, weight span + j in its high nibble (Q4_K/Q5_K: span 32; Q6_K: 64; the 32-weight types: 16)."""
    v = (q.reshape(q.shape[0], -1, 2, span) & 0xF).astype(np.uint8)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(q.shape[0], -1)


def _bit_planes(bits: np.ndarray) -> np.ndarray:
    """[n, 8·32] single bits -> [n, 32] bytes: weight i·32 + l at bit i of byte l (Q3_K's hmask, Q5_K's qh)."""
    v = bits.reshape(bits.shape[0], 8, 32).astype(np.uint8)
    return np.bitwise_or.reduce(v << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)


def _pack_6bit_pairs(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K's (and Q5_K's) 12 bytes of eight 6-bit scales and eight 6-bit mins."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return out


def _fp16_bytes(t: torch.Tensor, nb: int) -> np.ndarray:
    return t.cpu().numpy().astype(np.float16).reshape(nb, 1).view(np.uint8)


def pack_blocks(ints: dict, spec: QuantSpec) -> torch.Tensor:
    """Integers of ``kquant_integers`` -> GGUF block bytes ``uint8 [out, in/block · block_bytes]``."""
    fmt = kquant_spec(spec)
    q = ints["q"].cpu().numpy()
    out_f, in_f = q.shape
    nb = out_f * (in_f // fmt.block)
    q = q.reshape(nb, fmt.block).astype(np.uint8)
    d = _fp16_bytes(ints["d"], nb)
    if fmt.name == "Q8_0":  # d, the codes as int8
        blocks = np.concatenate([d, (q.astype(np.int16) - fmt.half).astype(np.int8).view(np.uint8)], axis=1)
    elif fmt.flat:  # Q4_0 / Q5_0 / Q5_1: d, (m), (the fifth bits as one little-endian uint32), the low nibbles
        head = [d, _fp16_bytes(ints["m"], nb)] if fmt.mins else [d]
        if fmt.bits == 5:
            qh = np.bitwise_or.reduce(((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32), axis=1)
            head.append(qh.astype("<u4").reshape(nb, 1).view(np.uint8))
        blocks = np.concatenate([*head, _pack_nibbles(q, 16)], axis=1)
    else:
        sc = ints["sc"].cpu().numpy().reshape(nb, -1)
        if fmt.mins:
            m = ints["m"].cpu().numpy().reshape(nb, -1)
            dmin = _fp16_bytes(ints["dmin"], nb)
        if fmt.name == "Q2_K":
            blocks = np.concatenate([(sc | (m << 4)).astype(np.uint8), _pack_2bit_planes(q), d, dmin], axis=1)
        elif fmt.name == "Q3_K":
            low = ((sc[:, :8] & 0xF) | ((sc[:, 8:] & 0xF) << 4)).astype(np.uint8)
            high = np.zeros((nb, 4), np.uint8)
            for s in range(4):  # scale s·4 + b: its top two bits at bits 2s of byte 8 + b
                high |= ((sc[:, s * 4:(s + 1) * 4] >> 4) & 3).astype(np.uint8) << (2 * s)
            blocks = np.concatenate([_bit_planes(q >> 2 & 1), _pack_2bit_planes(q & 3), low, high, d], axis=1)
        elif fmt.name == "Q4_K":  # weight c·64 + h·32 + l in byte c·32 + l, low nibble for h = 0
            blocks = np.concatenate([d, dmin, _pack_6bit_pairs(sc, m), _pack_nibbles(q, 32)], axis=1)
        elif fmt.name == "Q5_K":  # as Q4_K, the fifth bit of weight i·32 + l at bit i of qh byte l
            blocks = np.concatenate([d, dmin, _pack_6bit_pairs(sc, m), _bit_planes(q >> 4 & 1), _pack_nibbles(q, 32)], axis=1)
        else:  # Q6_K: low nibbles in runs of 128 (byte n·64 + b: weights n·128 + b, n·128 + 64 + b); the top two bits of
            hi2 = (q.reshape(nb, 2, 4, 32) >> 4) & 3  # weight n·128 + j·32 + l at bits 2j of byte n·32 + l
            qh = (hi2[:, :, 0] | (hi2[:, :, 1] << 2) | (hi2[:, :, 2] << 4) | (hi2[:, :, 3] << 6)).reshape(nb, 64)
            blocks = np.concatenate([_pack_nibbles(q, 64), qh.astype(np.uint8), sc.astype(np.int8).view(np.uint8), d], axis=1)
    assert blocks.shape[1] == fmt.block_bytes
    return torch.from_numpy(np.ascontiguousarray(blocks.reshape(out_f, -1)))


def _f16(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16).astype(np.float32))


def _nibbles(qs: np.ndarray, span: int) -> np.ndarray:
    """Inverse of ``_pack_nibbles``."""
    nb = qs.shape[0]
    return ((qs.reshape(nb, -1, 1, span) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0xF).reshape(nb, -1)


def _bits_of_planes(planes: np.ndarray) -> np.ndarray:
    """Inverse of ``_bit_planes``."""
    nb = planes.shape[0]
    return ((planes.reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(nb, 256)


def unpack_blocks(blocks: torch.Tensor, spec: QuantSpec, in_f: int) -> dict:
    """GGUF block bytes -> (s_q [out, sub-blocks] fp32, b_q or z, codes) such that ŵ = s_q·q − b_q (types with mins) or
    ŵ = s_q·(q − z) (symmetric types, s_q signed) with the products ggml takes: ``dl = d·sc``, ``ml = dmin·m``."""
    fmt = kquant_spec(spec)
    out_f = blocks.shape[0]
    b = blocks.cpu().numpy().reshape(-1, fmt.block_bytes)
    nb = b.shape[0]
    if fmt.flat:
        d = _f16(b[:, 0:2])
        o = 4 if fmt.mins else 2
        if fmt.name == "Q8_0":
            q = (np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.int16) + fmt.half).astype(np.uint8)
        elif fmt.bits == 5:
            qh = np.ascontiguousarray(b[:, o:o + 4]).view("<u4")  # [nb, 1]
            high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
            q = _nibbles(b[:, o + 4:o + 20], 16) | (high << 4)
        else:
            q = _nibbles(b[:, o:o + 16], 16)
        codes = torch.from_numpy(q).reshape(out_f, in_f)
        s_q = d.reshape(out_f, -1)
        if fmt.mins:
            return {"s": s_q, "b": -_f16(b[:, 2:4]).reshape(out_f, -1), "q": codes}
        return {"s": s_q, "z": torch.full_like(s_q, float(fmt.half)), "q": codes}
    if fmt.name == "Q2_K":
        scm, qs, d, dmin = b[:, :16], b[:, 16:80], b[:, 80:82], b[:, 82:84]
        sc, m = scm & 0xF, scm >> 4
        q = ((qs.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(nb, QK_K)
    elif fmt.name in ("Q4_K", "Q5_K"):
        d, dmin, s12 = b[:, 0:2], b[:, 2:4], b[:, 4:16]
        sc = np.concatenate([s12[:, 0:4] & 0x3F, (s12[:, 8:12] & 0xF) | ((s12[:, 0:4] >> 6) << 4)], axis=1)
        m = np.concatenate([s12[:, 4:8] & 0x3F, (s12[:, 8:12] >> 4) | ((s12[:, 4:8] >> 6) << 4)], axis=1)
        q = _nibbles(b[:, 16:144], 32) if fmt.name == "Q4_K" else _nibbles(b[:, 48:176], 32) | (_bits_of_planes(b[:, 16:48]) << 4)
    elif fmt.name == "Q3_K":
        hmask, qs, s12, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], b[:, 108:110]
        low = np.concatenate([s12[:, :8] & 0xF, s12[:, :8] >> 4], axis=1)
        high = ((s12[:, 8:12].reshape(nb, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)) & 3).reshape(nb, 16)
        sc = (low | (high << 4)).astype(np.int16) - 32  # signed, as ggml: ŵ = d·(sc − 32)·(u − 4)
        ql = ((qs.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(nb, QK_K)
        q = ql | (_bits_of_planes(hmask) << 2)  # u; the code is u − 4
    else:  # Q6_K
        ql, qh, scales, d = b[:, 0:128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
        high = ((qh.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(nb, QK_K)
        q = _nibbles(ql, 64) | (high << 4)  # u; the code is u − 32
        sc = np.ascontiguousarray(scales).view(np.int8)
    d = _f16(d).reshape(nb, 1)
    sc_t = torch.from_numpy(sc.astype(np.float32))
    codes = torch.from_numpy(q.astype(np.uint8)).reshape(out_f, in_f)
    s_q = (d * sc_t).reshape(out_f, -1)
    if fmt.mins:
        b_q = (_f16(dmin).reshape(nb, 1) * torch.from_numpy(m.astype(np.float32))).reshape(out_f, -1)
        return {"s": s_q, "b": b_q, "q": codes}
    return {"s": s_q, "z": torch.full_like(s_q, float(fmt.half)), "q": codes}


def dequantize_blocks(blocks: torch.Tensor, spec: QuantSpec, in_f: int, dtype=torch.float32) -> torch.Tensor:
    """GGUF block bytes -> the float weight, computed as ggml computes it (fp32)."""
    return decode(unpack_blocks(blocks, spec, in_f), spec, in_f).to(dtype)


def decode(p: dict, spec: QuantSpec, in_f: int) -> torch.Tensor:
    """The fp32 weight of ``unpack_blocks``' parts."""
    s = expand_groups(p["s"], spec, in_f)
    if "b" in p:
        return s * p["q"].float() - expand_groups(p["b"], spec, in_f)
    return s * (p["q"].float() - float(kquant_spec(spec).half))


def _no_integers(spec: QuantSpec) -> QatlmError:
    return QatlmError(f"a {spec.format} layer has no uniform integers (q, z, s): its codes are GGUF K-quant blocks")


def check_kquant_target(name: str, in_f: int, spec: QuantSpec):
    fmt = kquant_spec(spec)
    if in_f % fmt.block:
        what = "K-quant super-blocks" if fmt.block == QK_K else f"{fmt.name} blocks"
        raise QatlmError(f"{name}: input width {in_f} is not a multiple of {fmt.block}, which {what} need")


class KFakeQuantLinear(FakeQuantLinear):
    """A linear layer whose weight is seen through a K-quant grid (``kquant_weight``): the float weight,
    the sub-block steps ``scale`` and offsets ``zero`` are trained; the hierarchy is re-fitted each call."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec):
        check_kquant_target("layer", linear.in_features, spec)
        super().__init__(linear, spec)  # the offset (or Q3_K's sign) of every sub-block is trained: spec.sym is False

    @staticmethod
    def start(w: torch.Tensor, spec: QuantSpec):
        """The initial (step, offset) per sub-block: llama.cpp-style clipping search."""
        return kquant_search_init(w, spec)

    def quantized_weight(self) -> torch.Tensor:
        return kquant_weight(self.weight, self.scale, self.zero, self.spec).to(self.weight.dtype)

    def integers(self):
        raise _no_integers(self.spec)

    @torch.no_grad()
    def kquant_integers(self) -> dict:
        return kquant_integers(self.weight.detach(), self.scale.detach(), self.zero.detach(), self.spec)

    @torch.no_grad()
    def to_packed(self) -> "KPackedLinear":
        layer = KPackedLinear(self.in_features, self.out_features, self.spec, self.bias is not None, dtype=self.weight.dtype)
        layer.kblocks = pack_blocks(self.kquant_integers(), self.spec).to(self.weight.device)
        if self.bias is not None:
            layer.bias = self.bias.detach().to(layer.compute_dtype).clone()
        return layer


class KPackedLinear(PackedLinear):
    """Inference layer over a K-quant tensor's GGUF block bytes (``kblocks``: uint8 ``[out, in/256 · bytes]``,
    the rows of the llama.cpp tensor as they are written to the file)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool, dtype=torch.float32):
        check_kquant_target("layer", in_features, spec)
        nn.Module.__init__(self)
        self.spec = spec
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        self.register_buffer("kblocks", torch.zeros(out_features, in_features // kquant_spec(spec).block * kquant_spec(spec).block_bytes, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.cache_weight = False
        self._cached: torch.Tensor | None = None
        self._int4 = None

    @property
    def qweight(self) -> torch.Tensor:  # where the codes are (device, bytes), as for the uniform layer
        return self.kblocks

    def _apply(self, fn, recurse=True):
        return nn.Module._apply(self, fn, recurse)

    def integers(self):
        raise _no_integers(self.spec)

    def use_int4_kernel(self) -> bool:
        return False

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        if self._cached is not None:
            return self._cached
        w = dequantize_blocks(self.kblocks, self.spec, self.in_features).to(self.kblocks.device, dtype or self.compute_dtype)
        if self.cache_weight:
            self._cached = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.tag}, packed"
