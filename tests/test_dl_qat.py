"""DL-QAT: starts at the quantized model, merges bit-exactly, trains < 1 % of the parameters, runs end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from tiny import tensor_bytes, tiny_model, tiny_tokenizer

from qatlm import RTNConfig, load_quantized, quantize, save_quantized
from qatlm.methods.dl_qat import DLQATConfig, auto_rank, dlqat_trainable, parameter_cost, train_dl_qat
from qatlm.model.layers import attach_fake_quant, target_names
from qatlm.quant.grid import QuantSpec
from qatlm.quant.linear import DLQATLinear, PackedLinear


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("start", ["rtn-fp", "packed"])
def test_merge_is_bit_exact(bits, start, tmp_path):
    model = tiny_model("qwen2")
    spec = QuantSpec(bits, 32)
    ids = torch.randint(3, 320, (2, 16))
    if start == "packed":
        quantize(model, RTNConfig(bits, 32))
    else:
        attach_fake_quant(model, spec)
    with torch.no_grad():
        initial = model(ids).logits
    t = dlqat_trainable(model, DLQATConfig(rank=4), total_steps=10)
    layers = [m for m in model.modules() if isinstance(m, DLQATLinear)]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, initial, rtol=0, atol=0)  # B = 0, m = 1: exactly the start
        g = torch.Generator().manual_seed(bits)
        for m in layers:  # what training would do: move codes across grid points, rescale groups
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.7)
            m.m.copy_(1 + 0.1 * torch.randn(m.m.shape, generator=g))
        trained = model(ids).logits
    assert not torch.equal(trained, initial)
    t.merge()
    assert not any(isinstance(m, DLQATLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained)
    save_quantized(model, tmp_path / "q", spec)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q")(ids).logits, trained)


def shapes_of(config):
    with torch.device("meta"):
        m = transformers.AutoModelForCausalLM.from_config(config)
    return [(m.get_submodule(n).out_features, m.get_submodule(n).in_features) for n in target_names(m)], sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,config", [
    ("llama-7b", transformers.LlamaConfig()),
    ("smollm2-135m", transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                              num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)),
])
def test_default_trains_under_one_percent_at_g128(name, config):
    shapes, total = shapes_of(config)
    rank = auto_rank(shapes)
    c = parameter_cost(shapes, 128, rank, total_params=total)
    assert c["fraction_of_model"] < 0.01, c


@pytest.mark.parametrize("magnitude,lora", [("group", True), ("channel", False)])
def test_parameter_cost_equals_the_parameters_that_really_train(magnitude, lora):
    """The cost the report gives is what the built layers hold: counted from the model's own parameters that
    require gradients after DL-QAT is attached, and from the model's parameter count (not from the formula)."""
    model = tiny_model("llama")
    quantize(model, RTNConfig(4, 32))
    shapes = [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(shapes) == 7 * model.config.num_hidden_layers
    for p in model.parameters():  # as the end-to-end loop does before attaching
        p.requires_grad_(False)
    t = dlqat_trainable(model, DLQATConfig(rank=4, magnitude=magnitude, lora=lora), total_steps=10)
    trains = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert t.info["cost"]["trainable_params"] == trains == sum(p.numel() for g in t.groups for p in g["params"])
    c = parameter_cost(shapes, 32, 4, magnitude, lora)
    assert c["trainable_params"] == trains


def test_training_lowers_validation_loss(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"the cat sat on the mat number {i} and a man is sitting on a roof" for i in range(600)))
    model = tiny_model("llama")
    quantize(model, RTNConfig(3, 32))
    s = train_dl_qat(model, DLQATConfig(data=str(text), samples=16, seqlen=32, val_samples=4, epochs=3, batch_size=4, lr_lora=2e-2,
                                        lr_magnitude=1e-2), tiny_tokenizer(), progress=False, cache_dir=tmp_path)
    assert s.val_losses[-1] < s.val_loss_before
    assert all(isinstance(model.get_submodule(n), PackedLinear) for n in target_names(model))
    assert s.cost["trainable_params"] == s.trainable_params
    assert s.cost["fraction_of_model"] == pytest.approx(s.trainable_fraction)


def test_cli_train_dl_qat_from_checkpoint(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"the cat sat on the mat number {i}" for i in range(600)))
    model = tiny_model("llama")
    quantize(model, RTNConfig(4, 32))
    save_quantized(model, tmp_path / "q", RTNConfig(4, 32).spec, tokenizer=tiny_tokenizer(), meta={"method": "rtn"})
    env = {**os.environ, "QATLM_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "qatlm.cli", "train", "--method", "dl-qat", "--from", str(tmp_path / "q"), "--data", str(text),
                        "--samples", "8", "--seqlen", "32", "--val-samples", "2", "--batch-size", "4", "--rank", "2",
                        "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "LoRA rank 2" in r.stderr
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert cfg["meta"]["qatlm"]["method"] == "rtn+dl-qat" and cfg["bits"] == 4


def test_lora_init_comes_from_the_seed_not_the_global_rng():
    """LoRA A is drawn from a generator seeded by --seed, not from the global RNG (whose state depends on
    whatever ran before): two runs with one seed start from the same A, another seed from another A."""

    def lora_a(seed, other_draws):
        model = tiny_model("llama")
        quantize(model, RTNConfig(3, 32))
        torch.randn(other_draws)  # something else used the global RNG in between, differently in each run
        dlqat_trainable(model, DLQATConfig(seed=seed), total_steps=10)
        return [m.A.detach().clone() for m in model.modules() if isinstance(m, DLQATLinear)]

    a, b, c = lora_a(0, 10), lora_a(0, 1000), lora_a(1, 10)
    assert len(a) == 14 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, z) for x, z in zip(a, c))


def _trained_layer(bits=2, start="packed", seed=0):
    model = tiny_model("llama", seed=seed)
    if start == "packed":
        quantize(model, RTNConfig(bits, 32))
    else:
        attach_fake_quant(model, QuantSpec(bits, 32))
    dlqat_trainable(model, DLQATConfig(rank=8), total_steps=10)
    layer = next(m for m in model.modules() if isinstance(m, DLQATLinear))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.7)
        layer.A.copy_(torch.randn(layer.A.shape, generator=g))
    return model, layer


@pytest.mark.parametrize("start", ["rtn-fp", "packed"])
def test_codes_are_the_same_under_bf16_autocast_as_in_merge(start):
    """Training under bf16 autocast must round the same integers that merge() stores (the LoRA product in fp32)."""
    _, layer = _trained_layer(start=start)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes_in_training = layer._codes(ste=True)
        assert (layer.B @ layer.A).dtype == torch.bfloat16  # autocast is really on: a plain product would be bf16
    merged, _, _ = layer.to_packed().integers()
    assert torch.equal(codes_in_training.to(torch.int32), merged.to(torch.int32))


def test_base_is_held_in_at_most_bits_plus_8_bits_per_weight():
    """No full-size fp32 base: packed start = the packed integers; float start = integers + an int8 fraction."""
    for start, budget_bits in (("packed", 2), ("rtn-fp", 2 + 8)):
        model, layer = _trained_layer(bits=2, start=start)
        held = sum(b.numel() * b.element_size() for n, b in layer.named_buffers() if n in ("qweight", "frac"))
        assert held * 8 <= budget_bits * layer.in_features * layer.out_features, (start, held)


def test_float_start_fraction_keeps_the_rtn_codes_and_w_over_s_to_a_255th():
    model = tiny_model("llama")
    attach_fake_quant(model, QuantSpec(3, 32))
    fq = next(m for m in model.modules() if type(m).__name__ == "FakeQuantLinear")
    q, z, s16 = fq.integers()
    exact = fq.weight.detach().float() / s16.float().repeat_interleave(32, dim=1) + z.float().repeat_interleave(32, dim=1)
    layer = DLQATLinear.from_fake_quant(fq, rank=4)
    inside = (exact > -0.5) & (exact < 7.5)  # weights inside the grid (the fraction is clipped at +-127/255 outside)
    assert (layer.base() - exact)[inside].abs().max() <= 0.5 / 255 + 1e-6
    with torch.no_grad():  # B = 0: exactly the RTN codes
        assert torch.equal(layer._codes(ste=False).to(torch.int32), q.to(torch.int32))


def test_static_training_memory_from_a_packed_checkpoint(tmp_path):
    """Tensor bytes while training (weights, buffers, gradients, AdamW state) <= the packed model's bytes +
    LoRA and magnitudes with their gradients and optimizer state, + 5 %."""
    model = tiny_model("llama", hidden_size=256, intermediate_size=512, vocab_size=320)
    quantize(model, RTNConfig(2, 64))
    save_quantized(model, tmp_path / "q", QuantSpec(2, 64))
    model = load_quantized(tmp_path / "q")
    packed = tensor_bytes(model)
    t = dlqat_trainable(model, DLQATConfig(rank=4), total_steps=1)
    params = [p for g in t.groups for p in g["params"]]
    opt = torch.optim.AdamW(t.groups)
    model(torch.randint(3, 320, (1, 16)), labels=torch.randint(3, 320, (1, 16))).loss.backward()
    opt.step()
    trainable = sum(p.numel() * 4 for p in params)  # fp32 values
    static = tensor_bytes(model) + sum(p.grad.numel() * p.grad.element_size() for p in params) + sum(
        v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
    assert static <= 1.05 * (packed + 4 * trainable), (static, packed, trainable)

