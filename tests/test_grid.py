"""The quantization grid: ranges, ragged groups, and gradients against hand-derived formulas."""

import pytest
import torch

from qatlm.errors import QatlmError
from qatlm.quant.grid import QuantSpec, dequantize, fake_quantize, minmax_init, quantize_to_int


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_integers_in_range_and_error_bounded(bits, group, sym):
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    spec = QuantSpec(bits, group, sym)
    s, z = minmax_init(w, spec)
    q, zi = quantize_to_int(w, s, z, spec)
    assert q.min() >= 0 and q.max() <= spec.qmax and zi.min() >= 0 and zi.max() <= spec.qmax
    err = (dequantize(q, s, zi, spec) - w).abs()
    # every weight inside its group's range is at most half a step away (sym may clip one step at the top)
    bound = (s.repeat_interleave(spec.group_width(256), 1)[:, :256]) * (1.0 if sym else 0.5) + 1e-6
    assert bool((err <= bound).all())


def test_minmax_asym_hits_group_extremes():
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.0] * 2])
    spec = QuantSpec(2, 8)
    s, z = minmax_init(w, spec)
    assert torch.allclose(s, torch.tensor([[1.0]]))  # (2 - (-1)) / 3
    assert z.item() == 1.0
    q, zi = quantize_to_int(w, s, z, spec)
    # 0.5 / 1.0 rounds half-to-even to 0, so it lands on the grid point 0.0
    assert q[0, :4].tolist() == [0, 1, 3, 1]
    assert dequantize(q, s, zi, spec)[0, :4].tolist() == [-1.0, 0.0, 2.0, 0.0]


def test_ragged_last_group_matches_separate_quantization():
    """576 columns at g128: 4 full groups and a short one of 64, as GPTQ's g_idx = col // g."""
    torch.manual_seed(1)
    w = torch.randn(8, 576)
    spec = QuantSpec(4, 128)
    s, z = minmax_init(w, spec)
    assert s.shape == (8, 5)
    last = w[:, 512:]
    assert torch.allclose(s[:, 4], (last.amax(1) - last.amin(1)) / 15)
    assert spec.g_idx(576)[-1].item() == 4


def test_gradients_match_hand_derived_formula():
    """ŵ = s(clamp(r(w/s)+z) − z). Inside the range: dŵ/dw = 1, dŵ/ds = r(w/s) − w/s, dŵ/dz = 0.
    Clamped at the top: dŵ/dw = 0, dŵ/ds = qmax − z, dŵ/dz = −s (at the bottom: −z and −s)."""
    torch.manual_seed(2)
    spec = QuantSpec(3, 8)
    w = torch.randn(4, 16) * 2
    s0, z0 = minmax_init(w, spec)
    s0 = s0 * 0.6  # shrink the step so that some weights clip at both ends
    w = w.clone().requires_grad_(True)
    s = s0.clone().requires_grad_(True)
    z = (z0 + 0.2).requires_grad_(True)  # a float zero point, rounded in the forward pass
    out = fake_quantize(w, s, z, spec)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()

    zr = z.detach().round().clamp(0, spec.qmax)
    se, ze = s0.repeat_interleave(8, 1), zr.repeat_interleave(8, 1)
    raw = torch.round(w.detach() / se) + ze
    hi, lo = raw > spec.qmax, raw < 0
    inside = ~(hi | lo)
    assert hi.any() and lo.any() and inside.any()
    dw = upstream * inside
    ds_el = torch.where(inside, torch.round(w.detach() / se) - w.detach() / se, torch.where(hi, spec.qmax - ze, -ze))
    dz_el = torch.where(inside, torch.zeros_like(se), -se)
    ds = (upstream * ds_el).reshape(4, 2, 8).sum(-1)
    dz = (upstream * dz_el).reshape(4, 2, 8).sum(-1)
    assert torch.allclose(w.grad, dw, atol=1e-6)
    assert torch.allclose(s.grad, ds, atol=1e-5)
    assert torch.allclose(z.grad, dz, atol=1e-5)


@pytest.mark.parametrize("bits,group", [(5, 128), (1, 128), (4, 100), (4, 0), (4, -2)])
def test_invalid_spec_is_a_clear_error(bits, group):
    with pytest.raises(QatlmError, match="bits|group size"):
        QuantSpec(bits, group)


@pytest.mark.parametrize("bits,group,in_f", [(2, 32, 128), (3, 64, 192), (4, -1, 96), (4, 128, 160)])
def test_fused_fake_quant_equals_composed_reference(bits, group, in_f):
    """The fused kernel (divisible groups) and the autograd composition agree in values and all gradients."""
    from qatlm.quant.grid import fake_quantize_reference

    torch.manual_seed(bits)
    spec = QuantSpec(bits, group)
    w0 = torch.randn(24, in_f)
    s0, z0 = minmax_init(w0, spec)
    grads = []
    for fn in (fake_quantize, fake_quantize_reference):
        w = w0.clone().requires_grad_(True)
        s = (s0 * 0.7).requires_grad_(True)
        z = (z0 + 0.3).requires_grad_(True)
        out = fn(w, s, z, spec)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), w.grad, s.grad, z.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_f", [128, 160])  # divisible (fused kernel) and ragged last group (composed path)
def test_zero_point_outside_the_range_still_gets_its_gradient(in_f):
    """A zero point pushed out of [0, qmax] is clamped in the forward pass but passes its gradient straight
    through (as the fused kernel and the reference do): dŵ/dz = −s on clamped weights, checked against the
    hand-written formula column by column."""
    torch.manual_seed(1)
    spec = QuantSpec(2, 64)
    w0 = torch.randn(8, in_f)
    s0, z0 = minmax_init(w0, spec)
    z0[0] = spec.qmax + 2.0  # far above the range
    z0[1] = -3.0  # below it
    w = w0.clone().requires_grad_(True)
    s = s0.clone().requires_grad_(True)
    z = z0.clone().requires_grad_(True)
    up = torch.linspace(-1, 1, w0.numel()).view_as(w0)
    (fake_quantize(w, s, z, spec) * up).sum().backward()
    # hand reference: clamped positions are those where round(w/s) + clamp(round(z)) leaves [0, qmax]
    g_idx = spec.g_idx(in_f).long()
    zc = z0.round().clamp(0, spec.qmax)
    raw = torch.round(w0 / s0[:, g_idx]) + zc[:, g_idx]
    clamped = (raw < 0) | (raw > spec.qmax)
    ref = torch.zeros_like(z0).index_add_(1, g_idx, -(up * clamped * s0[:, g_idx]))
    torch.testing.assert_close(z.grad, ref, rtol=1e-5, atol=1e-6)
    assert z.grad[0].abs().sum() > 0 and z.grad[1].abs().sum() > 0
