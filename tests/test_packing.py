"""GPTQ packing: round trips for every bit width and the exact word layout of GPTQ's reference packer."""

import pytest
import torch

from qatlm.errors import QatlmError
from qatlm.quant.packing import pack_cols, pack_rows, unpack_cols, unpack_rows


def gptq_reference_pack(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's original row-by-row packer (written as the loop it is), for the layout check."""
    iw = intweight.to(torch.int64)
    rows = iw.shape[0] * bits // 32
    out = torch.zeros(rows, iw.shape[1], dtype=torch.int64)
    i = row = 0
    if bits in (2, 4, 8):
        while row < rows:
            for j in range(i, i + 32 // bits):
                out[row] |= iw[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
    else:  # 3 bits: 10 values, a straddling value, 10 values, a straddling value, 10 values
        while row < rows:
            for j in range(i, i + 10):
                out[row] |= iw[j] << (3 * (j - i))
            i += 10
            out[row] |= iw[i] << 30
            row += 1
            out[row] |= (iw[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                out[row] |= iw[j] << (3 * (j - i) + 1)
            i += 10
            out[row] |= iw[i] << 31
            row += 1
            out[row] |= (iw[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                out[row] |= iw[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    out = out & 0xFFFFFFFF
    return (out - ((out >> 31) & 1) * (1 << 32)).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randint(0, 2**bits, (96, 40), generator=g, dtype=torch.int32)
    x[0, 0], x[1, 0] = 2**bits - 1, 0  # extremes, incl. the sign bit of a full word
    p = pack_rows(x, bits)
    assert p.dtype == torch.int32 and p.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_rows(p, bits), x)
    pc = pack_cols(x.t(), bits)
    assert pc.shape == (40, 96 * bits // 32)
    assert torch.equal(unpack_cols(pc, bits), x.t())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_equals_gptq_reference(bits):
    g = torch.Generator().manual_seed(10 + bits)
    x = torch.randint(0, 2**bits, (64, 7), generator=g, dtype=torch.int32)
    assert torch.equal(pack_rows(x, bits), gptq_reference_pack(x, bits))


def test_values_out_of_range_are_clamped_before_packing():
    x = torch.tensor([[5], [-1], [3], [0]] * 4, dtype=torch.int32)
    assert unpack_rows(pack_rows(x, 2), 2).flatten().tolist() == [3, 0, 3, 0] * 4


def test_unpackable_width_is_a_clear_error():
    with pytest.raises(QatlmError, match="multiple of 32"):
        pack_rows(torch.zeros(48, 4, dtype=torch.int32), 3)
