"""Block-AP's compiled training step (``--compile-step``: torch.compile of fake-quant + block + loss) computes what
the eager step computes: the same loss and gradients up to float rounding, and a run ends at the same block errors."""

import torch
from tiny import tiny_model

from qatlm.methods.block_ap import BlockAPConfig, quantize_block_ap
from qatlm.methods.block_ap.block import block_fake_quant, compiled_forward_loss, forward_loss
from qatlm.model.arch import capture_layer_inputs, find_parts
from qatlm.quant.grid import QuantSpec


def _loss_and_grads(fn, block, x, y, kw):
    for p in block.parameters():
        p.grad = None
    loss = fn(block, x, y, kw, "mse", False)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}


def test_the_compiled_step_equals_the_eager_step():
    model = tiny_model("llama", num_hidden_layers=2)
    parts = find_parts(model)
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = capture_layer_inputs(model, ids[:1], parts)
    block = parts.layers[0]
    block_fake_quant(block, QuantSpec(2, 32), "model.layers.0")
    for p in block.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 64, generator=g)
    y = x + 0.1 * torch.randn(2, 24, 64, generator=g)
    eager_loss, eager_grads = _loss_and_grads(forward_loss, block, x, y, kwargs[0])
    comp_loss, comp_grads = _loss_and_grads(compiled_forward_loss(), block, x, y, kwargs[0])
    assert eager_grads.keys() == comp_grads.keys() and any(n.endswith(".scale") for n in eager_grads)
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=0)  # stated tolerance: 1e-5 relative
    for n, grad in eager_grads.items():
        torch.testing.assert_close(comp_grads[n], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max())), n
    assert float(eager_loss) > 0


def test_a_compiled_run_ends_at_the_eager_runs_block_errors():
    ids = torch.randint(3, 320, (40, 24), generator=torch.Generator().manual_seed(0))
    calib = (ids[:32], ids[32:])
    runs = {}
    for compiled in (False, True):
        cfg = BlockAPConfig(bits=2, group_size=32, epochs=2, batch_size=4, lr_quant=2e-3, lr_weight=2e-4, compile_step=compiled)
        runs[compiled] = quantize_block_ap(tiny_model("llama", num_hidden_layers=2), cfg, calib=calib, progress=False).blocks
    for eager, comp in zip(runs[False], runs[True]):
        # block 0 starts from the same RTN grid on the same inputs; later blocks see inputs that differ by float rounding
        assert comp.rtn_rel_error == eager.rtn_rel_error if comp.block == 0 else abs(comp.rtn_rel_error / eager.rtn_rel_error - 1) < 1e-4
        assert comp.trained_rel_error < 0.95 * comp.rtn_rel_error and not comp.rtn_fallback
        assert abs(comp.trained_rel_error / eager.trained_rel_error - 1) < 1e-3, (comp, eager)
