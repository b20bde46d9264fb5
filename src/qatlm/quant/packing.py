"""GPTQ bit packing of b-bit integers into int32 words, vectorised.

Values are laid out as one little-endian bit stream: value ``j`` of a packing unit occupies stream
bits ``[b·j, b·j + b)``, and stream bit ``p`` is bit ``p % 32`` of word ``p // 32``. For 2, 4 and 8 bits
this is GPTQ's "value j at shift b·j" layout; for 3 bits it is GPTQ's standard layout of 32 values
in 3 words (the 11th and 22nd value straddle a word boundary).
"""

from __future__ import annotations

import math

import torch

from qatlm.errors import QatlmError

_CHUNK_COLS = 2048  # columns packed at a time, to bound the temporary bit planes' memory


def unit(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest packing unit: 2→(16,1), 3→(32,3), 4→(8,1), 8→(4,1)."""
    g = math.gcd(32, bits)
    return 32 // g, bits // g


def _check_rows(n: int, bits: int, what: str):
    vals, _ = unit(bits)
    if n % vals:
        raise QatlmError(f"{what} of {n} cannot be packed at {bits} bits: it must be a multiple of {vals}")


def pack_rows(values: torch.Tensor, bits: int, what: str = "row count") -> torch.Tensor:
    """Pack ``values[N, M]`` (ints in ``[0, 2^bits)``) along dim 0 into ``int32[N·bits/32, M]``."""
    n, m = values.shape
    _check_rows(n, bits, what)
    vals, words = unit(bits)
    if words == 1:  # 2, 4, 8 bits: value j of a word at shift bits*j
        x = values.to(torch.int64).clamp(0, 2**bits - 1).view(n // vals, vals, m)
        w = (x << torch.arange(0, 32, bits, dtype=torch.int64).view(1, vals, 1)).sum(dim=1)
        return (w - ((w >> 31) & 1) * (1 << 32)).to(torch.int32)
    out = torch.empty(n // vals * words, m, dtype=torch.int32)
    bit_shift = torch.arange(bits, dtype=torch.int64).view(1, 1, bits, 1)
    word_shift = torch.arange(32, dtype=torch.int64).view(1, 1, 32, 1)
    for c in range(0, m, _CHUNK_COLS):
        x = values[:, c : c + _CHUNK_COLS].to(torch.int64).clamp(0, 2**bits - 1)
        mc = x.shape[1]
        planes = (x.view(n // vals, vals, 1, mc) >> bit_shift) & 1  # [units, vals, bits, M]
        planes = planes.reshape(n // vals, words, 32, mc)  # stream bit p -> (word, bit)
        w = (planes << word_shift).sum(dim=2)  # [units, words, M], in [0, 2^32)
        w = w - ((w >> 31) & 1) * (1 << 32)  # reinterpret as signed int32
        out[:, c : c + mc] = w.reshape(-1, mc).to(torch.int32)
    return out


def unpack_rows(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``int32[N·bits/32, M]`` -> ``int32[N, M]``."""
    vals, words = unit(bits)
    rows, m = packed.shape
    if words == 1:  # 2, 4, 8 bits: whole values per word, shift-and-mask
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device).view(1, vals, 1)
        v = ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(rows * vals, m)
        return v if n is None else v[:n]
    units = rows // words
    w = packed.to(torch.int64) & 0xFFFFFFFF
    word_shift = torch.arange(32, dtype=torch.int64, device=packed.device).view(1, 1, 32, 1)
    planes = (w.view(units, words, 1, m) >> word_shift) & 1  # [units, words, 32, M]
    planes = planes.reshape(units, vals, bits, m)
    bit_shift = torch.arange(bits, dtype=torch.int64, device=packed.device).view(1, 1, bits, 1)
    v = (planes << bit_shift).sum(dim=2).reshape(units * vals, m).to(torch.int32)
    return v if n is None else v[:n]


def pack_cols(values: torch.Tensor, bits: int, what: str = "column count") -> torch.Tensor:
    """Pack ``values[N, M]`` along dim 1 into ``int32[N, M·bits/32]`` (GPTQ's ``qzeros`` layout)."""
    return pack_rows(values.t().contiguous(), bits, what).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, m: int | None = None) -> torch.Tensor:
    return unpack_rows(packed.t().contiguous(), bits, m).t().contiguous()


def v1_zeros_to_v2(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """GPTQ v1 ``qzeros`` (each stored zero is the true zero − 1) to v2 (the true zeros), as GPTQ's own loaders
    read them. At 2/4/8 bits v1 writers subtract the per-field ones *from the packed 32-bit word* (a true zero of
    0 borrows from the field above it), and loaders add them back the same way, so the conversion is that word
    addition, modulo 2^32 (adding 1 to each field and clipping, or wrapping each field alone, turns every zero of
    0 into 2^bits − 1, and the field above it one too low). 3-bit fields straddle words, and there both sides
    shift each field alone, modulo 2^3. ``m``: the number of zeros per row (the layer's output width)."""
    if bits == 3:
        return pack_cols((unpack_cols(packed, bits, m) + 1) & 7, bits)
    ones = sum(1 << s for s in range(0, 32, bits))
    word = ((packed.to(torch.int64) & 0xFFFFFFFF) + ones) & 0xFFFFFFFF
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # back to int32's two's complement
