"""llama.cpp block types (K-quants Q2_K..Q6_K, Q5_0, Q5_1): trained like the uniform grid, stored as the GGUF blocks themselves,
decoded identically by qatlm, the gguf package's dequantizer, transformers' GGUF loader (and llama.cpp where present)."""

import json

import gguf
import numpy as np
import pytest
import torch
from tiny import need_llama_cpp, tiny_ids, tiny_model, tiny_tokenizer

from qatlm import BlockAPConfig, QatlmError, QuantSpec, RTNConfig, load_quantized, quantize, save_quantized
from qatlm.cli import main
from qatlm.export import export_checkpoint
from qatlm.quant.kquant import (KFakeQuantLinear, KPackedLinear, dequantize_blocks, kquant_integers, kquant_weight, pack_blocks,
                                unpack_blocks)
from qatlm.quant.linear import FakeQuantLinear, PackedLinear

GRIDS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q5_0", "q5_1", "q8_0")


def _weights(out_f=12, in_f=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[:, :64] += 0.03  # sub-blocks of positive weights (a min of 0) and of mixed sign
    w[:3, 256:] -= 0.05  # negative-heavy super-blocks (Q3_K: the other sign)
    return w


def _gguf_decode(blocks: torch.Tensor, grid: str, shape) -> torch.Tensor:
    qt = getattr(gguf.GGMLQuantizationType, QuantSpec(format=grid).kformat.name)
    return torch.from_numpy(np.array(gguf.quants.dequantize(blocks.numpy(), qt), dtype=np.float32)).reshape(shape)


@pytest.mark.parametrize("grid", GRIDS)
def test_blocks_decode_bit_exactly_in_gguf_and_equal_the_training_weight(grid):
    """The weight training sees (hierarchy re-fitted, STE) == qatlm's decode of the packed bytes == the gguf
    package's own dequantizer, bit for bit, after the step sizes and offsets moved off their RTN values."""
    spec = QuantSpec(format=grid)
    lin = torch.nn.Linear(512, 12, bias=False)
    lin.weight.data = _weights()
    fq = KFakeQuantLinear(lin, spec)
    with torch.no_grad():  # as after training: steps and offsets anywhere, the codes then re-derived
        fq.scale.mul_(torch.empty_like(fq.scale).uniform_(0.7, 1.3, generator=torch.Generator().manual_seed(1)))
        fq.zero.add_(torch.empty_like(fq.zero).uniform_(-0.6, 0.6, generator=torch.Generator().manual_seed(2)))
    w_train = fq.quantized_weight().detach()
    pk = fq.to_packed()
    assert isinstance(pk, KPackedLinear) and pk.kblocks.dtype == torch.uint8
    assert pk.kblocks.shape == (12, 512 // spec.kformat.block * spec.kformat.block_bytes)
    assert torch.equal(pk.dequantized_weight(), w_train)
    assert torch.equal(_gguf_decode(pk.kblocks, grid, (12, 512)), w_train)
    ints = fq.kquant_integers()  # the stored integers are in the format's ranges
    k = spec.kformat
    assert int(ints["q"].max()) <= spec.qmax
    if grid == "q3_k":  # both signs of the sub-block scale occur (stored as sc + 32)
        assert int(ints["sc"].max()) <= 63 and (ints["sc"] < 32).any() and (ints["sc"] > 32).any()
    elif grid == "q6_k":  # int8 scales of both signs
        assert ints["sc"].dtype == torch.int8 and (ints["sc"] < 0).any() and (ints["sc"] > 0).any()
    elif grid in ("q4_0", "q5_0", "q8_0"):  # the sign is the fp16 step's
        assert (ints["d"] < 0).any() and (ints["d"] > 0).any()
    elif grid == "q5_1":  # an fp16 min of either sign (blocks of positive weights have a positive min)
        assert ints["m"].dtype == torch.float16 and (ints["m"] < 0).any() and (ints["m"] > 0).any()
    else:
        assert int(ints["sc"].max()) <= k.sc_max
        assert int(ints["m"].max()) <= k.m_max and (ints["m"] == 0).any() and (ints["m"] > 0).any()


@pytest.mark.parametrize("grid", GRIDS)
def test_grid_is_the_format_hierarchy(grid):
    """Every decoded sub-block is d·sc·code − dmin·m with d, dmin fp16 per 256 weights and small integers (Q5_0/Q5_1:
    an fp16 step, and min, per 32 weights): checked from the integers sub-block by sub-block, no byte layout involved."""
    spec = QuantSpec(format=grid)
    k = spec.kformat
    w = _weights(4, 256, seed=3)
    scale, zero = torch.rand(4, 256 // spec.group_size) * 0.01 + 0.002, torch.rand(4, 256 // spec.group_size) * 3
    if not k.mins:
        zero = torch.where(zero > 1.5, float(k.half), float(k.half - 1))
    ints = kquant_integers(w, scale, zero, spec)
    blocks = pack_blocks(ints, spec)
    assert ints["d"].dtype == torch.float16
    d = ints["d"].float().reshape(4, -1)  # one fp16 factor per block: per row of 256 (K types), per 32 weights (Q5_x)
    p = unpack_blocks(blocks, spec, 256)
    if k.flat:
        torch.testing.assert_close(p["s"], d, rtol=0, atol=0)
        if k.mins:
            torch.testing.assert_close(p["b"], -ints["m"].float().reshape(4, -1), rtol=0, atol=0)
    else:
        sc = ints["sc"].float() - (32 if grid == "q3_k" else 0)
        torch.testing.assert_close(p["s"], d * sc, rtol=0, atol=0)
        if k.mins:
            torch.testing.assert_close(p["b"], ints["dmin"].float().reshape(4, 1) * ints["m"].float(), rtol=0, atol=0)
    wq = dequantize_blocks(blocks, spec, 256)
    n = spec.group_size
    for o in range(4):
        for j in range(256 // n):
            q = ints["q"][o, j * n:(j + 1) * n].float()
            if k.flat:
                want = d[o, j] * q + ints["m"][o, j].float() if k.mins else d[o, j] * (q - k.half)
            elif k.mins:
                want = (d[o, 0] * ints["sc"][o, j].float()) * q - ints["dmin"][o].float() * ints["m"][o, j].float()
            else:
                want = (d[o, 0] * (ints["sc"][o, j].float() - (32 if grid == "q3_k" else 0))) * (q - k.half)
            assert torch.equal(wq[o, j * n:(j + 1) * n], want), (o, j)


def test_ste_gradients_reach_weights_steps_and_offsets():
    spec = QuantSpec(format="q2_k")
    w = _weights(4, 256).requires_grad_(True)
    scale, zero = (t.clone().requires_grad_(True) for t in (torch.full((4, 16), 0.02), torch.full((4, 16), 1.5)))
    kquant_weight(w, scale, zero, spec).pow(2).sum().backward()
    assert w.grad.abs().sum() > 0 and scale.grad.abs().sum() > 0 and zero.grad.abs().sum() > 0


def test_grid_flag_fixes_bits_and_refuses_conflicts():
    assert QuantSpec(format="q3_k").bits == 3 and QuantSpec(format="q3_k").group_size == 16 and QuantSpec(format="q3_k").tag == "q3_k"
    with pytest.raises(QatlmError, match="drop --bits/--group-size"):
        QuantSpec(bits=3, group_size=64, format="q2_k")
    with pytest.raises(QatlmError, match="unknown grid"):
        QuantSpec(format="q7_k")
    with pytest.raises(QatlmError, match="bits=5 is not supported"):  # 5 and 6 bits are llama.cpp's types, not uniform grids
        QuantSpec(bits=5)
    assert QuantSpec(format="q6_k").bits == 6 and QuantSpec(format="q5_0").group_size == 32
    assert QuantSpec(format="q2_k").layer_spec(576) == QuantSpec(4, 32, sym=True)  # width not a multiple of 256
    assert QuantSpec(format="q2_k").layer_spec(512).kformat.name == "Q2_K"
    # as llama.cpp's quantizer: rows Q5_K / Q6_K cannot hold go to Q5_1 / Q8_0; Q5_0 / Q5_1 hold any multiple of 32
    assert QuantSpec(format="q5_k").layer_spec(576) == QuantSpec(format="q5_1")
    assert QuantSpec(format="q6_k").layer_spec(576) == QuantSpec(8, 32, sym=True)
    assert QuantSpec(format="q5_0").layer_spec(576) == QuantSpec(format="q5_0")
    for grid, bpw in (("q5_k", 5.5), ("q6_k", 6.5625), ("q4_0", 4.5), ("q5_0", 5.5), ("q5_1", 6.0), ("q8_0", 8.5)):
        assert QuantSpec(format=grid).layer_bytes(512, 10) * 8 / (512 * 10) == bpw


def _model():  # 256-wide attention (K-quant), 320-wide MLP input of down_proj... widths mixed on purpose
    return tiny_model("llama", hidden_size=256, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("grid", ["q2_k", "q3_k"])
def test_block_ap_on_k_grid_saves_reloads_and_exports_bit_exactly(tmp_path, grid):
    """Block-AP trains on the K grid (lowers every block's error), the saved checkpoint reloads with the same logits,
    the GGUF holds K-quant tensors for 256-multiple widths and Q4_0 for the rest, decodes to qatlm's weights exactly,
    and transformers' GGUF loader gives qatlm's logits."""
    from transformers import AutoModelForCausalLM

    model = _model()
    ids = tiny_ids(4, 32)
    cfg = BlockAPConfig(grid=QuantSpec(format=grid), epochs=2, batch_size=2, val_samples=0)
    summary = quantize(model, cfg, calib=(ids, ids[:0]))
    assert all(b.trained_rel_error < b.rtn_rel_error for b in summary.block_ap.blocks)
    kinds = {type(m) for m in model.modules() if isinstance(m, PackedLinear)}
    assert kinds == {KPackedLinear, PackedLinear}  # down_proj (320 wide) falls back to Q4_0's grid
    ref = model(tiny_ids()).logits.detach()
    save_quantized(model, tmp_path / "q", cfg.spec, tokenizer=tiny_tokenizer(), meta={"method": "block-ap"})
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qatlm_kquant" and qc["grid"] == grid
    back = load_quantized(tmp_path / "q")
    torch.testing.assert_close(back(tiny_ids()).logits, ref, rtol=0, atol=1e-6)
    rep = export_checkpoint(tmp_path / "q", "gguf", tmp_path / "g", float_type="f32")
    k = QuantSpec(format=grid).kformat.name
    assert rep["ggml_types"] == {k: 12, "Q4_0": 2} and rep["max_abs_error"] == 0.0
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=rep["file"], dtype=torch.float32)
    torch.testing.assert_close(m(tiny_ids()).logits, ref, rtol=1e-4, atol=1e-5)
    reader = gguf.GGUFReader(str(tmp_path / "g" / rep["file"]))
    q_proj = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert q_proj.tensor_type.name == k and int(q_proj.n_bytes) == 256 * QuantSpec(format=grid).kformat.block_bytes


def test_k_grid_from_the_cli_and_its_refusals(tmp_path, capsys):
    fp = tmp_path / "fp"
    _model().save_pretrained(fp)
    tiny_tokenizer().save_pretrained(fp)
    assert main(["quantize", "--model", str(fp), "--method", "rtn", "--grid", "q2_k", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "q"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["grid"] == "q2_k" and info["format"] == "qatlm_kquant"
    # 12 of 14 layers at 2.625 bits, two 320-wide ones at 4.5: measured from the files
    assert 2.625 < info["bits_per_quantized_weight"] < 4.5
    for args, msg in (
        (["quantize", "--model", str(fp), "--grid", "q2_k", "--method", "efficientqat", "--out", str(tmp_path / "x")], "trains uniform grids only"),
        (["quantize", "--model", str(fp), "--grid", "q2_k", "--bits", "3", "--out", str(tmp_path / "x")], "drop --bits"),
        (["export", str(tmp_path / "q"), "--format", "gptq", "--out", str(tmp_path / "x")], "exports to gguf only"),
        (["train", "--from", str(tmp_path / "q"), "--data", "wikipedia", "--out", str(tmp_path / "x")], "trains uniform grids only"),
    ):
        assert main(args) != 0
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "x").exists()


def test_streamed_rtn_on_k_grid_equals_in_memory(tmp_path):
    """A lazily loaded model quantized block by block gives the same K-quant bytes as the in-memory run."""
    from qatlm.model.lazy import load_lazy_model

    fp = tmp_path / "fp"
    _model().save_pretrained(fp)
    cfg = RTNConfig(grid=QuantSpec(format="q3_k"))
    a = _model()
    quantize(a, cfg)
    b = load_lazy_model(fp)
    quantize(b, cfg, out=tmp_path / "s")
    sb = load_quantized(tmp_path / "s").state_dict()
    for k, v in a.state_dict().items():
        if k.endswith(".kblocks"):
            assert torch.equal(sb[k], v), k


def test_llama_cpp_runs_the_k_quant_gguf(tmp_path):
    """llama.cpp itself loads the exported
    Q2_K file and its logits follow qatlm's (its matmuls quantize activations to 8 bits: close, not equal)."""
    need_llama_cpp()
    from tiny import llama_cpp_logits

    model = _model()
    quantize(model, RTNConfig(grid=QuantSpec(format="q2_k")))
    save_quantized(model, tmp_path / "q", QuantSpec(format="q2_k"), tokenizer=tiny_tokenizer())
    rep = export_checkpoint(tmp_path / "q", "gguf", tmp_path / "g", float_type="f32")
    ids = tiny_ids(1, 24)
    got = llama_cpp_logits(tmp_path / "g" / rep["file"], ids)
    ref = model(ids).logits[0].detach()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("grid", GRIDS)
def test_search_start_is_never_worse_than_min_max_per_sub_block(grid):
    """The clipping search keeps, per sub-block, the best of candidates that include min-max's own codes refitted by
    least squares: its squared error (before the super-block rounding) is at most min-max's, sub-block by sub-block."""
    from qatlm.quant.kquant import kquant_init, kquant_search_init

    spec = QuantSpec(format=grid)
    w = _weights(8, 512, seed=5) + torch.randn(8, 512, generator=torch.Generator().manual_seed(6)) ** 3 * 0.01  # heavy tails

    def err(scale, zero):
        x = w.reshape(8, -1, spec.group_size)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        if spec.kformat.mins:
            q = torch.clamp(torch.round((x + s * z) / s), 0, spec.qmax)
            return ((s * q - s * z - x) ** 2).sum(-1)
        q = torch.clamp(torch.round(x / s) + z, 0, spec.qmax)
        return ((s * (q - z) - x) ** 2).sum(-1)

    e_mm, e_s = err(*kquant_init(w, spec)), err(*kquant_search_init(w, spec))
    assert (e_s <= e_mm * (1 + 1e-5) + 1e-12).all()
    assert e_s.sum() < 0.9 * e_mm.sum() or spec.bits >= 4  # and clearly better at 2 and 3 bits


def test_q5_k_rows_of_other_widths_are_q5_1_blocks_and_info_counts_them(tmp_path, capsys):
    """Under --grid q5_k, rows Q5_K cannot hold are Q5_1 blocks (as llama.cpp's quantizer does): saved, reloaded with the
    same logits, exported bit-exactly; `qatlm info` counts each layer's type from the files even where a row's byte length
    fits both types (768-wide Q5_K rows and 704-wide Q5_1 rows are both 528 bytes)."""
    model = tiny_model("llama", hidden_size=768, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2)
    spec = QuantSpec(format="q5_k")
    quantize(model, RTNConfig(grid=spec))
    types = {n.rsplit(".", 1)[-1]: m.spec.format for n, m in model.named_modules() if isinstance(m, KPackedLinear)}
    assert types["down_proj"] == "q5_1" and types["q_proj"] == "q5_k" and len(types) == 7
    ref = model(tiny_ids()).logits.detach()
    save_quantized(model, tmp_path / "q", spec, tokenizer=tiny_tokenizer(), meta={"method": "rtn"})
    torch.testing.assert_close(load_quantized(tmp_path / "q")(tiny_ids()).logits, ref, rtol=0, atol=1e-6)
    assert main(["info", str(tmp_path / "q"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    lins = [m for m in model.modules() if isinstance(m, KPackedLinear)]
    want = 8 * sum(m.spec.layer_bytes(m.in_features, m.out_features) for m in lins) / sum(m.in_features * m.out_features for m in lins)
    assert info["bits_per_quantized_weight"] == pytest.approx(want, rel=1e-12) and 5.5 < want < 6.0
    rep = export_checkpoint(tmp_path / "q", "gguf", tmp_path / "g", float_type="f32")
    n = model.config.num_hidden_layers
    assert rep["ggml_types"] == {"Q5_K": 6 * n, "Q5_1": n} and rep["max_abs_error"] == 0.0


def test_llama_cpp_type_per_layer_mix_exports_those_types_and_runs_in_llama_cpp(tmp_path):
    """A mix naming llama.cpp's own type for every layer (as ``bench/kquant.py --same-types`` reads them from a llama.cpp
    file): Block-AP trains each layer on its type, the GGUF holds exactly those types, decodes to qatlm's weights bit for
    bit, transformers' GGUF loader gives qatlm's logits, and llama.cpp runs it."""
    from transformers import AutoModelForCausalLM

    model = _model()  # attention/gate/up 256 wide, down_proj 320 wide
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    tags = {"q_proj": "q5_k", "k_proj": "q6_k", "v_proj": "q5_0", "o_proj": "q4_k", "gate_proj": "w4g32-sym",
            "up_proj": "q3_k", "down_proj": "q5_1"}
    layers = {n: tags[n.rsplit(".", 1)[-1]] for n in names}
    layers[next(n for n in names if n.endswith("down_proj"))] = "w8g32-sym"  # one Q8_0 layer
    layers = tuple(layers.items())
    spec = QuantSpec(format="q2_k", layers=layers)
    summary = quantize(model, BlockAPConfig(grid=spec, epochs=2, batch_size=2, val_samples=0), calib=(tiny_ids(4, 32), tiny_ids(4, 32)[:0]))
    assert all(b.trained_rel_error < b.rtn_rel_error for b in summary.block_ap.blocks)
    got = {n: m.spec.tag for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert got == dict(layers)
    ref = model(tiny_ids()).logits.detach()
    save_quantized(model, tmp_path / "q", spec, tokenizer=tiny_tokenizer(), meta={"method": "block-ap"})
    torch.testing.assert_close(load_quantized(tmp_path / "q")(tiny_ids()).logits, ref, rtol=0, atol=1e-6)
    rep = export_checkpoint(tmp_path / "q", "gguf", tmp_path / "g", float_type="f32")
    n = model.config.num_hidden_layers
    assert rep["max_abs_error"] == 0.0
    assert rep["ggml_types"] == {"Q5_K": n, "Q6_K": n, "Q5_0": n, "Q4_K": n, "Q4_0": n, "Q3_K": n, "Q5_1": n - 1, "Q8_0": 1}
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=rep["file"], dtype=torch.float32)
    torch.testing.assert_close(m(tiny_ids()).logits, ref, rtol=1e-4, atol=1e-5)
    need_llama_cpp()
    from tiny import llama_cpp_logits

    ids = tiny_ids(1, 24)
    lc = llama_cpp_logits(tmp_path / "g" / rep["file"], ids)
    want = model(ids).logits[0].detach()
    assert (lc - want).abs().max() < 0.05 * want.abs().max()
    assert (lc.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
