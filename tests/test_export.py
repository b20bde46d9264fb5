"""Exports, each checked by an independent reader: GPTQ v1/v2 (qatlm's loader + raw words), GGUF
(transformers' GGUF loader and gguf's dequantizer), compressed-tensors (transformers + the library)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import need_llama_cpp, tiny_ids, tiny_model, tiny_tokenizer

from qatlm import RTNConfig, load_quantized, quantize, save_quantized
from qatlm.errors import QatlmError
from qatlm.export import export_checkpoint
from qatlm.export.gguf_file import encode_layer
from qatlm.model.layers import packed_layers, set_kernel
from qatlm.quant.grid import QuantSpec, dequantize
from qatlm.quant.packing import pack_cols, unpack_cols


def make(tmp_path, family="llama", bits=4, group=32, sym=False, v1_zeros=False, name="q", **over):
    model = tiny_model(family, **over)
    cfg = RTNConfig(bits, group, sym=sym, v1_zeros=v1_zeros)
    quantize(model, cfg)
    save_quantized(model, tmp_path / name, cfg.spec, tokenizer=tiny_tokenizer(), meta={"method": "rtn"})
    return tmp_path / name


@torch.no_grad()
def logits(model, ids=None):
    return model(tiny_ids() if ids is None else ids).logits.float()


@pytest.mark.parametrize("bits,sym", [(2, False), (3, False), (3, True), (4, False), (4, True), (8, True)])
def test_gguf_blocks_decode_with_gguf_dequantizer(bits, sym):
    """Our block bytes, read by the gguf package's reference dequantizer, are our grid's weights."""
    import gguf

    spec = QuantSpec(bits, 64, sym)
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (6, 128), generator=g)
    z = torch.full((6, 2), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (6, 2), generator=g)
    s16 = (torch.rand(6, 2, generator=g) * 0.05 + 0.001).half()
    data, kind = encode_layer(q, z, s16, spec, "x")
    got = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, kind)).reshape(6, 128)
    want = dequantize(q, s16.float(), z, spec).numpy()
    err = np.abs(got - want)
    if kind == "Q4_1":  # the block minimum -s*z is stored in fp16: at most half an fp16 ulp of it
        bound = (s16.float() * z.float()).abs().repeat_interleave(64, 1).numpy() * 2.0**-11 + 1e-12
        assert (err <= bound).all()
    else:
        assert err.max() == 0.0
    assert kind == {8: "Q8_0"}.get(bits, "Q4_0" if sym else "Q4_1")


def test_gguf_refuses_what_it_cannot_hold(tmp_path):
    with pytest.raises(QatlmError, match="multiple of 32"):
        export_checkpoint(make(tmp_path, group=16), "gguf", tmp_path / "g")
    assert not (tmp_path / "g").exists()
    q = torch.zeros(2, 64, dtype=torch.int64)
    q[0, 0] = 255
    with pytest.raises(QatlmError, match="int8 range"):
        encode_layer(q, torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1).half(), QuantSpec(8, 64), "layer.x")
    from types import SimpleNamespace

    from qatlm.export.gguf_file import check_config

    with pytest.raises(QatlmError, match="llama.cpp has no architecture for 'opt'"):
        check_config(SimpleNamespace(model_type="opt", num_hidden_layers=2), QuantSpec(4, 32))
    llama = tiny_model("llama").config
    with pytest.raises(QatlmError, match="model.layers.0.mlp.mystery_proj.qweight.* have no llama.cpp tensor"):
        check_config(llama, QuantSpec(4, 32), ["model.layers.0.mlp.up_proj.qweight", "model.layers.0.mlp.mystery_proj.qweight"])


def test_gguf_refusals_come_before_the_model_is_loaded(tmp_path, monkeypatch):
    import qatlm.model.checkpoint as ckpt

    scaled, g16 = make(tmp_path, name="scaled"), make(tmp_path, group=16)
    cfg = json.loads((scaled / "config.json").read_text())
    cfg["rope_parameters"] = cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (scaled / "config.json").write_text(json.dumps(cfg))

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(ckpt, "load_quantized", no_load)
    with pytest.raises(QatlmError, match="rope scaling 'linear'"):
        export_checkpoint(scaled, "gguf", tmp_path / "p")
    with pytest.raises(QatlmError, match="multiple of 32"):
        export_checkpoint(g16, "gguf", tmp_path / "g")


@pytest.mark.parametrize("family,sym", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", False), ("mistral", False),
                                        ("gemma2", True), ("gemma3", False), ("phi3", True), ("qwen2_moe", True), ("qwen3_moe", False)])
def test_gguf_loads_in_transformers_with_the_same_logits(tmp_path, family, sym):
    """transformers' own GGUF reader (which undoes llama.cpp's q/k row order and Gemma's norm offset) gives qatlm's
    logits, for every dense family qatlm quantizes: the architecture, tensor names and hyperparameter keys come from
    the gguf package and transformers' GGUF key map, not from a table per family."""
    from transformers import AutoModelForCausalLM

    # transformers' GGUF reader ignores qwen3's key_length and assumes head_dim 128, and reads no MoE widths (it takes
    # the config's defaults) and always renormalises Qwen3-MoE's top-k weights: build the tiny models so
    over = {"qwen3": {"head_dim": 128}, "qwen2_moe": {"moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632},
            "qwen3_moe": {"head_dim": 128, "moe_intermediate_size": 768, "norm_topk_prob": True}}.get(family, {})
    src = make(tmp_path, family=family, sym=sym, **over)
    rep = export_checkpoint(src, "gguf", tmp_path / "g", float_type="f32")
    assert rep["ggml_type"] == ("Q4_0" if sym else "Q4_1")
    if "moe" in family:  # each block's experts stacked into one tensor per projection, as llama.cpp wants them
        assert {f"blk.0.ffn_{p}_exps.weight" for p in ("gate", "up", "down")} <= set(rep["layers"])
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=rep["file"], dtype=torch.float32)
    ref = logits(load_quantized(src))
    got = logits(m)
    if sym:  # Q4_0 is bit-exact: only float summation order differs
        assert rep["max_abs_error"] == 0.0
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    else:  # Q4_1 rounds each block's minimum to fp16
        assert (got - ref).abs().max().item() < 5e-3 * ref.abs().max().item()


def test_gguf_mixtral_runs_as_llama_with_stacked_experts(tmp_path):
    """transformers' GGUF reader has no llama experts, so Mixtral's file is checked by the gguf package: the stacked
    expert tensors decode to qatlm's weights exactly (Q4_0) and the expert counts are in the metadata."""
    import gguf

    src = make(tmp_path, family="mixtral", sym=True)
    rep = export_checkpoint(src, "gguf", tmp_path / "g")
    assert rep["arch"] == "llama" and rep["max_abs_error"] == 0.0
    assert {f"blk.{b}.ffn_{p}_exps.weight" for b in (0, 1) for p in ("gate", "up", "down")} <= set(rep["layers"])
    reader = gguf.GGUFReader(str(tmp_path / "g" / rep["file"]))
    field = lambda k: int(reader.fields[k].parts[reader.fields[k].data[0]][0])  # noqa: E731
    assert field("llama.expert_count") == 4 and field("llama.expert_used_count") == 2
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
    assert [int(x) for x in t.shape] == [128, 64, 4]  # ggml order: in, out, experts


@pytest.mark.parametrize("family,prefix", [("llama", True), ("phi3", True), ("gemma2", False)])
def test_gguf_carries_a_sentencepiece_tokenizer(tmp_path, family, prefix):
    """A SentencePiece-BPE tokenizer (byte fallback) is written as llama.cpp's 'llama' tokenizer (scores, byte tokens,
    space prefix); transformers' GGUF reader rebuilds it: the same ids for the same text, and the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny import tiny_spm_tokenizer

    tok = tiny_spm_tokenizer(prefix=prefix)
    model = tiny_model(family, vocab_size=len(tok))
    cfg = RTNConfig(4, 32, sym=True)
    quantize(model, cfg)
    save_quantized(model, tmp_path / "q", cfg.spec, tokenizer=tok, meta={"method": "rtn"})
    rep = export_checkpoint(tmp_path / "q", "gguf", tmp_path / "g", float_type="f32")
    back = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file=rep["file"])
    for text in ["the cat sat on the mat", "question: which technology é was developed? 42", "two  spaces, é and 7"]:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    assert 200 <= sum(t.startswith("<0x") for t in back.get_vocab()) <= 256  # byte tokens kept (not merged into text)
    ids = torch.tensor([tok("the cat sat on the mat and looked at the door")["input_ids"]])
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=rep["file"], dtype=torch.float32)
    torch.testing.assert_close(logits(m, ids), logits(load_quantized(tmp_path / "q"), ids), rtol=1e-4, atol=1e-5)


def test_gptq_v2_and_v1_exports_reload_identically(tmp_path):
    src = make(tmp_path, v1_zeros=True)
    ref = logits(load_quantized(src))
    for fmt, stored in (("gptq", "gptq_v2"), ("gptq-v1", "gptq")):
        out = tmp_path / fmt
        rep = export_checkpoint(src, fmt, out)
        assert rep["reload_max_logit_diff"] == 0.0
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert cfg["checkpoint_format"] == stored
        assert torch.equal(logits(load_quantized(out)), ref)
    # the v1 file's stored zeros are the true zeros minus one
    v2, v1 = load_file(tmp_path / "gptq" / "model.safetensors"), load_file(tmp_path / "gptq-v1" / "model.safetensors")
    k = "model.layers.0.self_attn.q_proj.qzeros"
    out_f = v2["model.layers.0.self_attn.q_proj.scales"].shape[1]
    assert torch.equal(unpack_cols(v1[k], 4, out_f), unpack_cols(v2[k], 4, out_f) - 1)


def test_gptq_v1_refuses_zero_points_of_zero_and_v1_zeros_fixes_it(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():  # a group whose weights are all positive gets zero point 0 from min-max
        model.model.layers[1].mlp.up_proj.weight[3, :32] = torch.rand(32) + 0.1
    quantize(model, RTNConfig(4, 32))
    save_quantized(model, tmp_path / "q", QuantSpec(4, 32), tokenizer=tiny_tokenizer())
    with pytest.raises(QatlmError, match=r"zero point of 0.*model\.layers\.1\.mlp\.up_proj.*--v1-zeros"):
        export_checkpoint(tmp_path / "q", "gptq-v1", tmp_path / "v1")
    assert not (tmp_path / "v1").exists()
    src = make(tmp_path, v1_zeros=True, name="q1")
    _, z, _ = packed_layers(load_quantized(src))["model.layers.0.self_attn.q_proj"].integers()
    assert int(z.min()) >= 1


@pytest.mark.parametrize("sym", [False, True])
def test_compressed_tensors_loads_in_transformers(tmp_path, sym):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    src = make(tmp_path, sym=sym)
    export_checkpoint(src, "compressed-tensors", tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["config_groups"]["group_0"]["weights"]["symmetric"] == sym
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    ref = logits(load_quantized(src))
    torch.testing.assert_close(logits(m), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_int4_kernel_matches_dequantized_matmul(tmp_path):
    model = load_quantized(make(tmp_path))
    ref = logits(model)
    counts = set_kernel(model, "int4")
    if "int4" not in counts:
        pytest.skip("this torch build has no CPU int4 matmul")
    torch.testing.assert_close(logits(model), ref, rtol=1e-4, atol=1e-4)
    assert set_kernel(model, "cache") == {"cache": len(packed_layers(model))}
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-5)


def test_auto_kernel_keeps_float_copies_only_within_its_budget(tmp_path):
    model = load_quantized(make(tmp_path))
    layers = list(packed_layers(model).values())
    ref = logits(model)  # plain: nothing cached
    assert all(m._cached is None for m in layers)
    need = sum(m.in_features * m.out_features * 4 for m in layers)  # every layer's fp32 weight
    assert set_kernel(model, "auto", budget_bytes=need) == {"cache": len(layers)}
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=0)
    assert sum(m._cached.numel() * m._cached.element_size() for m in layers) == need
    assert set_kernel(model, "auto", budget_bytes=need - 1) == {"plain": len(layers)}
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=0)
    assert all(m._cached is None for m in layers)


def test_plain_kernel_in_row_chunks_equals_the_whole_weight(tmp_path, monkeypatch):
    import qatlm.quant.linear as lin

    model = load_quantized(make(tmp_path))
    ref = logits(model)
    monkeypatch.setattr(lin, "CHUNK_WEIGHTS", 64 * 5)  # a few output rows at a time
    assert len(lin.row_chunks(128, 64)) > 1
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-5)


def test_available_memory_sees_a_cgroup_limit(monkeypatch):
    from qatlm import memory

    monkeypatch.setattr(memory, "_meminfo_available", lambda: 64 << 30)
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 1 << 30)
    assert memory.available_bytes() == 1 << 30
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    assert memory.available_bytes() == 64 << 30


def test_cli_export_and_generate(tmp_path):
    src = make(tmp_path)
    env = {**os.environ, "QATLM_CACHE": str(tmp_path / "cache")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "qatlm.cli", *a], env=env, capture_output=True, text=True)  # noqa: E731
    r = run("export", str(src), "--format", "gguf", "--out", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr
    assert "decoded with gguf's dequantizer" in r.stderr
    r = run("export", str(src), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.strip().startswith("qatlm: error: unknown export format")
    r = run("export", str(tmp_path / "missing"), "--format", "gguf", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("qatlm: error: model path") and "does not exist" in r.stderr
    outs = []
    for kernel in ("cache", "int4", "plain"):
        r = run("generate", str(src), "--prompt", "the cat sat", "--max-new-tokens", "8", "--kernel", kernel)
        assert r.returncode == 0, r.stderr
        assert "tok/s" in r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[2] and outs[0].strip()  # greedy text is the same whatever the kernel


def test_gptq_loads_in_transformers_with_gptqmodel(tmp_path):
    """transformers' own GPTQ loader (optimum + gptqmodel kernels) reads qatlm's v2 checkpoint."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    src = make(tmp_path, bits=4, group=32)
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, device_map="cpu")
    assert "qatlm" not in type(m.model.layers[0].self_attn.q_proj).__module__  # gptqmodel's layer, not ours
    ref = logits(load_quantized(src))
    torch.testing.assert_close(logits(m), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_tight_memory_is_decided_from_the_checkpoint_size(monkeypatch):
    from qatlm import memory

    calls = []
    monkeypatch.setattr(memory, "return_freed_memory_promptly", lambda: calls.append(1) or True)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10 << 30)
    said = []
    assert not memory.adapt_to_free_memory(1 << 30, say=said.append)  # 10 GiB free for 1 GiB: not tight
    assert memory.adapt_to_free_memory(2 << 30, say=said.append) and calls == [1]  # 10 < 8 x 2 GiB
    assert "memory is tight" in said[0]
    assert not memory.adapt_to_free_memory(8 << 30, device="meta")  # only the CPU heap is concerned


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_v1_files_with_zero_points_of_zero_load_as_gptq_loaders_read_them(tmp_path, bits):
    """GPTQ v1 writers (GPTQModel's v2->v1 conversion) subtract the per-field ones from each packed 32-bit word, so
    a true zero of 0 borrows from the field above; GPTQ loaders add them back the same way (3-bit: each field alone,
    modulo 8). A v1 file written that way, with many zero points of 0, loads into exactly the v2 model. (Adding 1
    to each field and clipping, as before, read every such group with the zero point 2^bits - 1.)"""
    import shutil

    from safetensors.torch import save_file

    model = tiny_model("llama")
    with torch.no_grad():  # groups whose weights are all positive get zero point 0 from min-max
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[::3, :32] = torch.rand_like(layer.mlp.up_proj.weight[::3, :32]) + 0.05
    quantize(model, RTNConfig(bits, 32))
    save_quantized(model, tmp_path / "v2", QuantSpec(bits, 32), tokenizer=tiny_tokenizer())
    sd = load_file(tmp_path / "v2" / "model.safetensors")
    zero_groups = 0
    for k in [k for k in sd if k.endswith(".qzeros")]:
        out_f = sd[k.replace(".qzeros", ".scales")].shape[1]
        z = unpack_cols(sd[k], bits, out_f)
        zero_groups += int((z == 0).sum())
        if bits == 3:
            sd[k] = pack_cols((z - 1) % 8, 3)
        else:  # the writer's word arithmetic, here on Python integers, one word at a time
            ones = sum(1 << s for s in range(0, 32, bits))
            words = [((w & 0xFFFFFFFF) - ones) % 2**32 for w in sd[k].flatten().tolist()]
            sd[k] = torch.tensor([w - 2**32 if w >= 2**31 else w for w in words], dtype=torch.int32).view(sd[k].shape)
    assert zero_groups > 20
    shutil.copytree(tmp_path / "v2", tmp_path / "v1")
    save_file(sd, tmp_path / "v1" / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "v1" / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq"
    (tmp_path / "v1" / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(logits(load_quantized(tmp_path / "v1")), logits(load_quantized(tmp_path / "v2")))


def test_float_model_exports_to_gguf_and_a_gguf_file_evaluates(tmp_path):
    """`qatlm export FP --format gguf` writes the float model (the input of llama.cpp's own quantizer), and
    `qatlm eval FILE.gguf` reads any GGUF through transformers' GGUF loader: both give the fp model's logits."""
    from qatlm.eval.report import load_any

    fp = tmp_path / "fp"
    model = tiny_model("llama")
    model.save_pretrained(fp)
    tiny_tokenizer().save_pretrained(fp)
    rep = export_checkpoint(fp, "gguf", tmp_path / "g", float_type="f32")
    assert rep["ggml_type"] == "F32" and rep["float_max_abs_error"] == 0.0
    back, tok, desc = load_any(tmp_path / "g" / rep["file"])
    assert desc["recipe"] == "gguf" and desc["setting"] == "ALL_F32" and tok is not None
    torch.testing.assert_close(logits(back), logits(model), rtol=1e-5, atol=1e-5)
    _, _, desc_q = load_any(export_checkpoint(make(tmp_path, sym=True), "gguf", tmp_path / "gq", float_type="f32") and tmp_path / "gq")
    assert desc_q["setting"] == "Q4_0" and desc_q["bits_per_weight"] == 4.5  # 18 bytes per 32 weights, read from the file


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "qwen2_moe", "qwen3_moe", "mixtral"])
def test_llama_cpp_runs_every_exported_family(tmp_path, family):
    """llama.cpp itself loads each family's GGUF (Q4_0, bit-exact
    weights) and its logits follow qatlm's (llama.cpp's matmuls quantize activations to 8 bits: close, not equal)."""
    need_llama_cpp()
    from tiny import llama_cpp_logits

    over = {"qwen3": {"head_dim": 128}, "qwen3_moe": {"head_dim": 16, "norm_topk_prob": True}}.get(family, {})
    src = make(tmp_path, family=family, sym=True, **over)
    rep = export_checkpoint(src, "gguf", tmp_path / "g", float_type="f32")
    ids = tiny_ids(1, 24)
    got = llama_cpp_logits(tmp_path / "g" / rep["file"], ids)
    ref = logits(load_quantized(src), ids)[0]
    assert (got - ref).abs().max() < 0.05 * ref.abs().max(), family
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8, family


def test_gguf_refuses_a_gemma_attention_scale_llama_cpp_ignores(tmp_path):
    """llama.cpp's Gemma graphs take the attention scale from the head size, not from the file: a config whose
    query_pre_attn_scalar is neither head_dim nor hidden/heads is refused (llama.cpp's logits were 70 % off)."""
    src = make(tmp_path, family="gemma3", sym=True, head_dim=16, query_pre_attn_scalar=256)
    with pytest.raises(QatlmError, match="query_pre_attn_scalar 256"):
        export_checkpoint(src, "gguf", tmp_path / "g")
    assert not (tmp_path / "g").exists()
