"""Mixture-of-experts models quantized whole: fused experts become one linear layer per expert (defuser), every
expert is on the grid, the packed checkpoint reloads to the same logits, Block-AP trains the experts."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import MOE_FAMILIES, tiny_ids, tiny_model, tiny_tokenizer

from qatlm import BlockAPConfig, RTNConfig, load_quantized, quantize, save_quantized
from qatlm.cli import main
from qatlm.model.arch import defuse_experts, find_parts, fused_expert_params
from qatlm.model.layers import attach_fake_quant, pack_model
from qatlm.quant.linear import PackedLinear


def packed_fraction(model) -> float:
    """Share of the decoder blocks' weights (by count) held as packed integers."""
    blocks = find_parts(model).layers
    packed = sum(m.in_features * m.out_features for m in blocks.modules() if isinstance(m, PackedLinear))
    return packed / (packed + sum(p.numel() for p in blocks.parameters()))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_are_packed_and_reload_to_the_fake_quantized_logits(family, tmp_path):
    model = tiny_model(family)
    ids = tiny_ids()
    with torch.no_grad():
        ref = model(ids).logits
    assert fused_expert_params(model)  # transformers 5 holds the experts as fused 3-D tensors
    assert defuse_experts(model) > 0 and not fused_expert_params(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # the same function, one linear layer per expert
    spec = RTNConfig(4, 32).spec
    layers = attach_fake_quant(model, spec)
    assert sum(".experts." in n for n in layers) >= 2 * 4 * 3  # every expert's three projections, in both blocks
    assert not any(n.endswith((".gate", "shared_expert_gate")) for n in layers)  # routers stay in full precision
    with torch.no_grad():
        fake = model(ids).logits
    pack_model(model)
    assert packed_fraction(model) >= 0.95
    save_quantized(model, tmp_path / "q", spec, tokenizer=tiny_tokenizer())
    back = load_quantized(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, fake, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_block_ap_trains_the_experts_and_reports_the_unrouted_ones(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    calib = (torch.randint(3, 320, (8, 24), generator=g), torch.randint(3, 320, (2, 24), generator=g))
    s = quantize(model, BlockAPConfig(bits=2, group_size=32, epochs=2, lr_quant=2e-3, lr_weight=2e-4), calib=calib, progress=False)
    assert all(b.trained_rel_error < b.rtn_rel_error for b in s.block_ap.blocks)
    assert packed_fraction(model) >= 0.95
    assert s.block_ap.experts_without_tokens is not None and all(b.experts_without_tokens is not None for b in s.block_ap.blocks)


@pytest.mark.parametrize("method", ["e2e-qp", "dl-qat"])
def test_end_to_end_methods_train_the_experts(method, tmp_path):
    from qatlm import DLQATConfig, E2EQPConfig

    model = tiny_model("qwen2_moe")
    quantize(model, RTNConfig(4, 32))
    before = {n: b.clone() for n, b in model.state_dict().items() if ".experts." in n and n.endswith(".scales")}
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"the cat sat on the mat number {i}" for i in range(400)))
    cls = E2EQPConfig if method == "e2e-qp" else DLQATConfig
    rates = {"lr": 1e-2} if method == "e2e-qp" else {}  # DL-QAT has its own rates
    quantize(model, cls(data=str(text), samples=8, seqlen=32, val_samples=2, batch_size=4, **rates),
             tokenizer=tiny_tokenizer(), progress=False, cache_dir=tmp_path / "c")
    after = model.state_dict()
    assert sum(not torch.equal(before[n], after[n]) for n in before) >= len(before) // 2


def test_an_expert_no_token_reaches_keeps_its_rtn_grid():
    """Route every token to experts 0 and 1 (the router's other logits at -inf): experts 2 and 3 are reported and
    their integers are exactly RTN's."""
    model = tiny_model("qwen2_moe", num_hidden_layers=1)
    hooks = [model.model.layers[0].mlp.gate.register_forward_hook(_only_first_two)]
    rtn = tiny_model("qwen2_moe", num_hidden_layers=1)
    quantize(rtn, RTNConfig(2, 32))
    g = torch.Generator().manual_seed(0)
    calib = (torch.randint(3, 320, (8, 24), generator=g), torch.randint(3, 320, (2, 24), generator=g))
    s = quantize(model, BlockAPConfig(bits=2, group_size=32, epochs=2, lr_quant=2e-3, lr_weight=2e-4), calib=calib, progress=False)
    for h in hooks:
        h.remove()
    assert s.block_ap.experts_without_tokens == ["model.layers.0.mlp.experts.2", "model.layers.0.mlp.experts.3"]
    sd, ref = model.state_dict(), rtn.state_dict()
    for e in (2, 3):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            k = f"model.layers.0.mlp.experts.{e}.{proj}"
            assert torch.equal(sd[k + ".qweight"], ref[k + ".qweight"]) and torch.equal(sd[k + ".scales"], ref[k + ".scales"])
    k = "model.layers.0.mlp.experts.0.gate_proj.qweight"
    assert not torch.equal(sd[k], ref[k])  # a routed expert trained


def _only_first_two(module, inputs, output):
    """Router output with the top-2 of every token forced to experts 0 and 1."""
    logits, weights, index = output if isinstance(output, tuple) and len(output) == 3 else (None, None, None)
    if index is None:
        return output
    index = torch.zeros_like(index)
    index[..., 1] = 1
    return logits, weights, index


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_cli_streams_an_moe_model_block_by_block(family, tmp_path, capsys):
    """After defusing, the per-expert layers are found in the checkpoint by name (Mixtral's w1/w3/w2 through defuser's
    renamings): the model streams block by block (it fell back to a whole load) and the result equals the in-memory run."""
    fp = tmp_path / "fp"
    tiny_model(family).save_pretrained(fp)
    tiny_tokenizer().save_pretrained(fp)
    assert main(["quantize", "--model", str(fp), "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", str(tmp_path / "q")]) == 0
    err = capsys.readouterr().err
    assert "block by block" in err and "whole model instead" not in err
    names = json.loads((tmp_path / "q" / "config.json").read_text())
    assert names["quantization_config"]["bits"] == 4
    back = load_quantized(tmp_path / "q")
    assert packed_fraction(back) >= 0.95
    ref = tiny_model(family)
    quantize(ref, RTNConfig(4, 32))
    ids = tiny_ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_info_says_where_an_moe_checkpoint_loads(tmp_path, capsys):
    model = tiny_model("qwen2_moe")
    quantize(model, RTNConfig(4, 32))
    save_quantized(model, tmp_path / "q", RTNConfig(4, 32).spec, tokenizer=tiny_tokenizer())
    assert main(["info", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "GPTQModel.load" in out and "24 per-expert layers are NOT read by transformers" in out


def test_gptqmodel_loads_the_packed_moe_checkpoint(tmp_path):
    """The per-expert GPTQ layout is what GPTQModel's own loader reads (it splits the fused experts the same way). In
    a process of its own: GPTQModel patches transformers' MoE classes globally when it loads."""
    pytest.importorskip("gptqmodel")
    model = tiny_model("qwen2_moe", hidden_size=128, intermediate_size=256, moe_intermediate_size=128)
    quantize(model, RTNConfig(4, 32))
    save_quantized(model, tmp_path / "q", RTNConfig(4, 32).spec, tokenizer=tiny_tokenizer())
    ids = tiny_ids()
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch\nfrom gptqmodel import GPTQModel\nids = torch.load(sys.argv[2])\n"
            "m = GPTQModel.load(sys.argv[1], device='cpu', dtype=torch.float16).model\n"
            "with torch.no_grad():\n    torch.save(m(ids).logits.float(), sys.argv[3])\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                       capture_output=True, text=True, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        ref = load_quantized(tmp_path / "q")(ids).logits
    assert (got - ref).abs().max().item() < 5e-3 * ref.abs().max().item()  # its CPU kernel computes in fp16
