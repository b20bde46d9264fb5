"""bench/mixed_sensitivity.py, the sensitivity variants the mixed-precision rows compare: each block's propagation
gain equals the KL divergence a whole-model forward measures for that block's error, divided by its block error;
clipped steps never round a group worse than min-max steps; the propagated plan stays within its budget."""

import pytest
import torch
from tiny import bench_module, tiny_ids, tiny_model

from qatlm.methods import mixed
from qatlm.model.arch import quant_targets
from qatlm.quant.grid import QuantSpec, spec_from_tag


@pytest.fixture()
def variants():
    with bench_module("mixed_sensitivity") as module:
        yield module
    mixed.rtn_weight = module._plain_rtn_weight


@torch.no_grad()
def test_each_blocks_gain_is_the_kl_a_whole_forward_measures_per_unit_of_its_error(variants):
    model, ids = tiny_model("llama"), tiny_ids(3, 24)
    grids = {f"model.layers.{b}.{n}": spec_from_tag("w2g32").layer_spec(lin.in_features)
             for b, blk in enumerate(model.model.layers) for n, lin in quant_targets(blk).items()}
    gains = variants.propagation_gains(model, ids, grids)
    _, errors = mixed.measure(model, QuantSpec(target_bpw=3.0, menu="w2g32,w4g32"), ids, grids=grids)
    p = torch.log_softmax(model(ids).logits.float(), -1)
    assert len(gains) == len(model.model.layers) >= 2
    for b, blk in enumerate(model.model.layers):
        lins = quant_targets(blk)
        saved = {n: lin.weight.data for n, lin in lins.items()}
        for n, lin in lins.items():
            lin.weight.data = mixed.rtn_weight(saved[n], grids[f"model.layers.{b}.{n}"])
        q = torch.log_softmax(model(ids).logits.float(), -1)
        for n, lin in lins.items():
            lin.weight.data = saved[n]
        kl = float((p.exp() * (p - q)).sum())
        assert kl > 0
        assert gains[b] == pytest.approx(kl / errors[b], rel=1e-3)


def test_clipped_steps_round_no_group_worse_than_min_max(variants):
    torch.manual_seed(0)
    w = torch.randn(32, 96) * torch.rand(32, 1) * 3
    w[::5, ::7] *= 20  # outliers: min-max steps waste most of their range on them
    for tag in ("w2g32", "w3g64", "w4g32-sym"):
        spec = spec_from_tag(tag).layer_spec(96)
        plain = variants._group_sum((mixed.rtn_weight(w, spec) - w).pow(2), spec)
        clipped = variants._group_sum((variants.clipped_rtn_weight(w, spec) - w).pow(2), spec)
        assert (clipped <= plain * (1 + 1e-6)).all()
        assert clipped.sum() < 0.95 * plain.sum()


def test_the_propagated_plan_stays_within_its_budget_and_reports_a_gain_per_block(variants):
    model, ids = tiny_model("llama"), tiny_ids(4, 32)
    spec = QuantSpec(target_bpw=3.3, menu="w2g32,w3g32,w4g32,w8g32")
    library_allocation = mixed.allocate
    _, s, gains = variants.plan(model, spec, ids, None, "propagated")
    assert s.bits_per_weight <= 3.3 and len(gains) == len(model.model.layers)
    assert all(g > 0 for g in gains)
    assert mixed.allocate is library_allocation  # the library's allocation is left as it was
