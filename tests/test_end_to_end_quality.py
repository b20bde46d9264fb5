"""The end-to-end phases (E2E-QP, DL-QAT): updates that do not depend on the model's weight scale, and a phase that
never hands back a model worse (on validation) than the one it was given."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from qatlm import DLQATConfig, E2EQPConfig, RTNConfig, quantize, train_dl_qat, train_e2e_qp
from qatlm.quant.linear import PackedLinear

TEXT = " ".join(f"the cat sat on the mat number {i} and a man is sitting on a roof" for i in range(600))


def packed_state(model) -> dict:
    return {f"{n}.{k}": v.clone() for n, m in model.named_modules() if isinstance(m, PackedLinear)
            for k, v in (("qweight", m.qweight), ("qzeros", m.qzeros), ("scales", m.scales))}


def rescaled_twin(model, c: float):
    """The same function with other weight scales: q·c with k/c (scores unchanged), v·c with o/c and up·c with down/c
    (attention and the gated MLP are linear in v and up)."""
    with torch.no_grad():
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            for up, down in ((a.q_proj, a.k_proj), (a.v_proj, a.o_proj), (m.up_proj, m.down_proj)):
                up.weight.mul_(c)
                down.weight.div_(c)
    return model


def packed_model(c: float = 1.0, bits: int = 3):
    model = tiny_model("llama")
    rescaled_twin(model, c)
    quantize(model, RTNConfig(bits, 32))
    return model


def e2e(tmp_path, **kw):
    (tmp_path / "t.txt").write_text(TEXT)
    return E2EQPConfig(data=str(tmp_path / "t.txt"), samples=16, seqlen=32, val_samples=4, epochs=4, batch_size=4, val_every=1, **kw)


def test_rescaled_twins_are_the_same_function(tmp_path):
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = tiny_model("llama")
    with torch.no_grad():
        a = ref(ids).logits
        for c in (10.0, 0.1):
            torch.testing.assert_close(rescaled_twin(tiny_model("llama"), c)(ids).logits, a, rtol=1e-4, atol=1e-4)


def test_e2e_qp_trains_a_rescaled_twin_along_the_same_loss_curve(tmp_path):
    """Step sizes trained as log s move by a fraction of themselves: twins whose weights are x10 and x0.1 follow the
    same validation curve (an absolute rate would move the x0.1 twin's step sizes 100 times further, relatively,
    than the x10 twin's)."""
    curves = {}
    for c in (1.0, 10.0, 0.1):
        s = train_e2e_qp(packed_model(c), e2e(tmp_path, lr=0.02), tiny_tokenizer(), progress=False, cache_dir=tmp_path)
        curves[c] = [s.val_loss_before] + [v for _, v in s.periodic_val] + s.val_losses
    assert curves[1.0][-1] < curves[1.0][0] - 0.05  # it trained
    for c in (10.0, 0.1):
        diff = max(abs(x - y) for x, y in zip(curves[c], curves[1.0]))
        assert len(curves[c]) == len(curves[1.0]) and diff < 0.01 * curves[1.0][0], (c, diff, curves[c], curves[1.0])


def test_default_rate_is_relative_and_follows_the_paper_budget():
    cfg = E2EQPConfig()
    assert cfg.learning_rate(2, 128) == pytest.approx(2e-3) and cfg.learning_rate(3, 128) == pytest.approx(1e-3)
    assert cfg.learning_rate(3, 32) == pytest.approx(4e-3) and cfg.learning_rate(2, 1) == 0.02


@pytest.mark.parametrize("method", ["e2e-qp", "dl-qat"])
def test_a_phase_forced_to_diverge_returns_the_model_it_was_given_bit_for_bit(tmp_path, method, monkeypatch):
    """Training made to climb the loss (its gradient reversed; validation untouched): every validated state is worse
    than the start, so the phase hands back the model it was given, every packed tensor equal."""
    from qatlm.train.end_to_end import _Job

    plain = _Job.lm_loss
    monkeypatch.setattr(_Job, "lm_loss", lambda self, m, b: -plain(self, m, b) if torch.is_grad_enabled() else plain(self, m, b))
    model = packed_model()
    before = packed_state(model)
    if method == "e2e-qp":
        s = train_e2e_qp(model, e2e(tmp_path, lr=0.05), tiny_tokenizer(), progress=False, cache_dir=tmp_path)
    else:
        (tmp_path / "t.txt").write_text(TEXT)
        cfg = DLQATConfig(data=str(tmp_path / "t.txt"), samples=16, seqlen=32, val_samples=4, epochs=2, batch_size=4)
        s = train_dl_qat(model, cfg, tiny_tokenizer(), progress=False, cache_dir=tmp_path)
    assert min(s.val_losses) > s.val_loss_before  # it did diverge
    assert s.bought_nothing and s.restored_best and s.best_step == 0 and s.val_loss_after == s.val_loss_before
    after = packed_state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_the_best_validated_state_is_kept_not_the_last(tmp_path):
    """A rate that first helps and then overshoots: the phase returns the state of its best validation."""
    s = train_e2e_qp(packed_model(), e2e(tmp_path, lr=0.3, warmup_ratio=0.0), tiny_tokenizer(), progress=False, cache_dir=tmp_path)
    vals = [v for _, v in s.periodic_val] + s.val_losses
    assert s.best_val_loss == pytest.approx(min([s.val_loss_before] + vals))
    if s.restored_best:
        assert s.val_loss_after < s.val_losses[-1]
