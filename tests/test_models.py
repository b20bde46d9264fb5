"""Any architecture without per-model code: block-by-block equals the full forward; RTN saves, reloads, generates."""

import pytest
import torch
from tiny import FAMILIES, tiny_ids, tiny_model

from qatlm import RTNConfig, load_quantized, quantize, save_quantized
from qatlm.model.arch import capture_layer_inputs, find_parts, run_layer
from qatlm.model.layers import attach_fake_quant, pack_model, target_names
from qatlm.quant.linear import PackedLinear


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_by_block_reproduces_full_forward(family):
    model = tiny_model(family)
    ids = tiny_ids(1, 20)
    parts = find_parts(model)
    hidden, kwargs = capture_layer_inputs(model, ids, parts)
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
        x = hidden
        for layer, kw, ref in zip(parts.layers, kwargs, full.hidden_states[1:]):
            x = run_layer(layer, x, kw)
        # hidden_states[-1] is the final norm's output: chaining layers then the norm we found must match
        torch.testing.assert_close(parts.norm(x), full.hidden_states[-1], rtol=1e-5, atol=1e-5)
        # and the batch-1 kwargs serve a batch of 3 as well
        ids3 = tiny_ids(3, 20, seed=1)
        h3, _ = capture_layer_inputs(model, ids3, parts)
        y = h3
        for layer, kw in zip(parts.layers, kwargs):
            y = run_layer(layer, y, kw)
        torch.testing.assert_close(parts.norm(y), model(ids3, output_hidden_states=True).hidden_states[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_targets_are_all_block_linears_but_routers(family):
    model = tiny_model(family)
    names = target_names(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert names and set(names) <= set(linears)
    left_out = set(linears) - set(names)
    assert all(n.rsplit(".", 1)[-1] in ("gate", "shared_expert_gate") for n in left_out), left_out
    assert not any("lm_head" in n or "embed" in n for n in names)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rtn_saves_reloads_and_generates(family, tmp_path):
    model = tiny_model(family)
    ids = tiny_ids(2, 16)
    quantize(model, RTNConfig(bits=4, group_size=32))
    assert all(isinstance(model.get_submodule(n), PackedLinear) for n in target_names(model))
    with torch.no_grad():
        ref = model(ids).logits
    save_quantized(model, tmp_path / "q", RTNConfig(4, 32).spec)
    loaded = load_quantized(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=1e-5)
    out = loaded.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    expect = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expect)


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 128), (2, 64), (8, -1), (4, 32)])
@pytest.mark.parametrize("sym", [False, True])
def test_fake_quant_logits_equal_reloaded_packed_logits(bits, group, sym, tmp_path):
    """A width (160) that 128 does not divide: the last group is short, as GPTQ allows."""
    model = tiny_model("llama", hidden_size=160, intermediate_size=224, num_attention_heads=5, num_key_value_heads=5)
    ids = tiny_ids(2, 16)
    cfg = RTNConfig(bits=bits, group_size=group, sym=sym)
    attach_fake_quant(model, cfg.spec)
    with torch.no_grad():
        fake = model(ids).logits
    pack_model(model)
    save_quantized(model, tmp_path / "q", cfg.spec)
    with torch.no_grad():
        reloaded = load_quantized(tmp_path / "q")(ids).logits
    assert (reloaded - fake).abs().max() < 1e-3 * fake.abs().max()


def test_packed_and_fake_layers_agree_for_same_integers():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64, bias=True)
    from qatlm.quant.grid import QuantSpec
    from qatlm.quant.linear import FakeQuantLinear

    fq = FakeQuantLinear(lin, QuantSpec(3, 32))
    with torch.no_grad():
        fq.scale.mul_(1.1)  # a trained-looking, non-min-max grid
    packed = fq.to_packed()
    x = torch.randn(5, 96)
    torch.testing.assert_close(packed(x), fq(x), rtol=1e-5, atol=1e-5)
    q, z, s16 = fq.integers()
    q2, z2, s2 = packed.integers()
    assert torch.equal(q, q2) and torch.equal(z, z2) and torch.equal(s16, s2)


def test_lm_head_option_quantizes_untied_head(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    ids = tiny_ids(1, 12)
    quantize(model, RTNConfig(bits=8, group_size=64, lm_head=True))
    assert isinstance(model.lm_head, PackedLinear)
    assert not isinstance(model.get_input_embeddings(), PackedLinear)
    with torch.no_grad():
        ref = model(ids).logits
    save_quantized(model, tmp_path / "q", RTNConfig(8, 64).spec)
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "q")(ids).logits, ref, rtol=0, atol=1e-5)


def test_dtype_casts_keep_fp16_step_sizes(tmp_path):
    """Casting a packed model (as Block-AP does after training a block, or to bf16 on a GPU) keeps scales fp16."""
    model = tiny_model("llama")
    quantize(model, RTNConfig(bits=2, group_size=64))
    before = {n: m.scales.clone() for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    model.to(torch.float64).to(torch.bfloat16).float()
    for n, m in model.named_modules():
        if isinstance(m, PackedLinear):
            assert m.scales.dtype == torch.float16 and torch.equal(m.scales, before[n])
    save_quantized(model, tmp_path / "q", RTNConfig(2, 64).spec)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert all(v.dtype == torch.float16 for k, v in stored.items() if k.endswith(".scales"))


def test_every_layer_class_keeps_one_integers_and_to_packed_contract():
    """FakeQuant, Packed, ScaleTrain and DLQAT layers: ``integers()`` is (q, z, fp16 scale) exactly as ``to_packed()``
    stores it, and the packed layer computes what the layer computed (DL-QAT: after a LoRA step that moves codes)."""
    from qatlm.quant.grid import QuantSpec
    from qatlm.quant.linear import DLQATLinear, FakeQuantLinear, PackedLinear, ScaleTrainLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64)
    fq = FakeQuantLinear(lin, QuantSpec(3, 32))
    st = ScaleTrainLinear(fq.to_packed(), train_zeros=True)
    dl = DLQATLinear.from_fake_quant(fq, rank=2)
    with torch.no_grad():
        st.scale.mul_(1.05)
        st.zero.add_(0.3)
        dl.B.normal_(0, 2.0)
        dl.m.mul_(0.9)
    x = torch.randn(5, 96)
    for layer in (fq, fq.to_packed(), st, dl):
        q, z, s16 = layer.integers()
        packed = layer.to_packed()
        assert isinstance(packed, PackedLinear)
        q2, z2, s2 = packed.integers()
        assert q.shape == (64, 96) and z.shape == s16.shape == (64, 3) and s16.dtype == torch.float16
        assert torch.equal(q.int(), q2.int()) and torch.equal(z.int(), z2.int()) and torch.equal(s16, s2)
        with torch.no_grad():
            torch.testing.assert_close(packed(x), layer(x), rtol=1e-4, atol=1e-4)
