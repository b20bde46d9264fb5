"""Mixed precision (--target-bpw): the accounting against the files' bytes, the allocation against its budget and a
brute-force optimum, the sensitivity against a planted outlier, and a mixed model through every method, the loaders
and the exports."""

import itertools
import json
import random

import pytest
import torch
from safetensors import safe_open
from tiny import check_one_clear_line, need_llama_cpp, tiny_ids, tiny_model, tiny_tokenizer

from qatlm import RTNConfig, load_quantized, quantize
from qatlm.errors import QatlmError
from qatlm.export import export_checkpoint
from qatlm.methods.block_ap import BlockAPConfig
from qatlm.methods.dl_qat import DLQATConfig
from qatlm.methods.e2e_qp import E2EQPConfig
from qatlm.methods.mixed import allocate, plan
from qatlm.model.arch import quant_targets
from qatlm.model.checkpoint import checkpoint_info
from qatlm.model.layers import packed_layers
from qatlm.quant.grid import QuantSpec

SYM_MENU = "w2g32-sym,w4g32-sym,w8g32-sym"  # every grid llama.cpp holds (Q4_0 / Q8_0)


def ids(n=4, length=32):
    return tiny_ids(n, length)


def mixed(tmp_path, target=4.0, menu=SYM_MENU, name="m", model=None, config=RTNConfig, tie_fused=False, **kw):
    model = model if model is not None else tiny_model("llama")
    x = ids()
    cfg = config(grid=QuantSpec(target_bpw=target, menu=menu, tie_fused=tie_fused), **kw)
    s = quantize(model, cfg, calib=(x, x[:1]), out=tmp_path / name, tokenizer=tiny_tokenizer(), progress=False)
    return tmp_path / name, s, model


@torch.no_grad()
def logits(model, x=None):
    return model(ids(1, 24) if x is None else x).logits.float()


def quant_file_bytes(folder):
    """The bytes of the packed tensors, read from the safetensors files (not from qatlm's accounting)."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
                    t = fh.get_tensor(k)
                    total += t.numel() * t.element_size()
    return total


def test_accounting_of_a_mixed_checkpoint_equals_the_files_bytes(tmp_path):
    path, s, _ = mixed(tmp_path)
    info = checkpoint_info(path)
    fp = tiny_model("llama")
    weights = sum(lin.in_features * lin.out_features for b in fp.model.layers for lin in quant_targets(b).values())
    assert info["quantized_params"] == weights
    assert info["bits_per_quantized_weight"] * weights / 8 == pytest.approx(quant_file_bytes(path), abs=1e-6)
    assert s.mixed.bits_per_weight == pytest.approx(info["bits_per_quantized_weight"], abs=1e-9)  # predicted = stored
    assert s.mixed.bits_per_weight <= 4.0
    assert len(info["layer_grids"]) >= 2, info["layer_grids"]  # a real mix, counted per grid
    assert sum(info["layer_grids"].values()) == 14
    from qatlm.describe import info_rows

    rows = dict(info_rows(info))  # qatlm info: the grids, and the allocation's predicted and measured error
    assert rows["grid"].startswith("mixed precision, budget 4 bits/weight: ")
    assert f"{s.mixed.bits_per_weight:.3f} bits/weight" in rows["allocation"] and "measured" in rows["allocation"]
    assert (path / "allocation.png").stat().st_size > 1000
    for name, layer in packed_layers(load_quantized(path)).items():  # and layer by layer
        own = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx))
        assert layer.spec.layer_bytes(layer.in_features, layer.out_features) == own, name
        assert layer.spec.tag == s.mixed.layers[name]


def _random_table(rng, n, tags, sizes=None):
    table = {}
    for i in range(n):
        size = sizes[i] if sizes else rng.choice([64, 256, 1024])
        err = rng.uniform(0.5, 5.0)
        opts = {}
        for j, (t, bpw) in enumerate(tags):
            err *= rng.uniform(0.15, 0.6) if j else 1.0
            opts[t] = (int(size * bpw / 8), err * (rng.uniform(0.9, 1.3) if rng.random() < 0.2 else 1.0))
        table[f"l{i}"] = opts
    return table


def test_the_allocation_never_exceeds_its_budget():
    rng = random.Random(0)
    tags = [("w2", 2.3), ("w3", 3.2), ("w4", 4.2), ("w8", 8.2)]
    for _ in range(300):
        table = _random_table(rng, rng.randint(1, 30), tags)
        lo = sum(min(b for b, _ in o.values()) for o in table.values())
        hi = sum(max(b for b, _ in o.values()) for o in table.values())
        budget = rng.uniform(lo, hi * 1.05)
        pick = allocate(table, budget, 1)
        assert sum(table[n][t][0] for n, t in pick.items()) <= budget
    table = _random_table(rng, 5, tags)
    with pytest.raises(QatlmError, match="below what the menu's smallest grids take"):
        allocate(table, sum(min(b for b, _ in o.values()) for o in table.values()) - 1, 1000)


def test_the_allocation_is_the_optimum_where_upgrades_cost_the_same():
    """Equal-size layers, grids a byte step apart, errors convex in bytes: the greedy choice is provably optimal;
    checked against brute force over every assignment."""
    rng = random.Random(1)
    for _ in range(40):
        n = rng.randint(2, 5)
        table = {}
        for i in range(n):
            e0 = rng.uniform(1, 10)
            drops = sorted((rng.uniform(0.1, 1.0) * e0 for _ in range(3)), reverse=True)
            errs = [e0]
            for d in drops:
                errs.append(max(errs[-1] - d * 0.3, 0.0))
            table[f"l{i}"] = {f"g{j}": (10 * (j + 1), errs[j]) for j in range(4)}
        budget = rng.randint(10 * n, 40 * n)
        pick = allocate(table, budget, 1)
        got = sum(table[k][t][1] for k, t in pick.items())
        best = min(sum(table[k][t][1] for k, t in zip(table, combo)) for combo in itertools.product([f"g{j}" for j in range(4)], repeat=n)
                   if sum(table[k][t][0] for k, t in zip(table, combo)) <= budget)
        assert got == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_tied_allocation_gives_each_fused_group_one_grid_within_budget():
    """--tie-fused: q/k/v and gate/up of every block get one grid (their bytes and errors summed), the budget holds, and
    where the groups tie exactly (equal widths, equal upgrades) the tied choice is the brute-force optimum over groups."""
    rng = random.Random(2)
    names = [f"model.layers.{b}.{n}" for b in range(3) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    tags = [("w2", 2.3), ("w3", 3.2), ("w4", 4.2), ("w8", 8.2)]
    for _ in range(100):
        table = dict(zip(names, _random_table(rng, len(names), tags).values()))
        lo = sum(min(b for b, _ in o.values()) for o in table.values())
        hi = sum(max(b for b, _ in o.values()) for o in table.values())
        budget = rng.uniform(lo, hi)
        pick = allocate(table, budget, 1, tie_fused=True)
        assert set(pick) == set(table) and sum(table[n][t][0] for n, t in pick.items()) <= budget
        for b in range(3):
            assert len({pick[f"model.layers.{b}.self_attn.{m}"] for m in ("q_proj", "k_proj", "v_proj")}) == 1
            assert pick[f"model.layers.{b}.mlp.gate_proj"] == pick[f"model.layers.{b}.mlp.up_proj"]
    # brute force on one block: every group's upgrade costs 30 bytes (q/k/v 10 each, gate/up 15 each, o and down 30) and
    # every layer's errors are convex in bytes, so the greedy choice over groups is the optimum
    block = names[:7]
    groups = [block[:3], block[3:4], block[4:6], block[6:]]
    for _ in range(30):
        table = {}
        for g in groups:
            for n in g:
                e = [rng.uniform(1, 10)]
                for d in sorted((rng.uniform(0.1, 1.0) for _ in range(3)), reverse=True):
                    e.append(max(e[-1] - d * 0.3 * e[0], 0.0))
                table[n] = {f"g{j}": (30 // len(g) * (j + 1), e[j]) for j in range(4)}
        budget = rng.randint(120, 480)
        pick = allocate(table, budget, 1, tie_fused=True)
        got = sum(table[n][t][1] for n, t in pick.items())
        best = min(sum(table[n][f"g{j}"][1] for g, j in zip(groups, combo) for n in g) for combo in itertools.product(range(4), repeat=4)
                   if sum(30 * (j + 1) for j in combo) <= budget)
        assert got == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_tie_fused_makes_a_4bit_mix_that_vllm_can_load(tmp_path):
    """Untied, a 4-bit mix gives q/k/v or gate/up different group sizes (vLLM refuses it); tied, the same budget gives each
    fused group one grid, routes to compressed-tensors for vLLM, and stays within the budget."""
    from qatlm.export.runtimes import route

    menu = "w4g32,w4g64,w4g128"
    _, split, _ = mixed(tmp_path, target=4.8, menu=menu, name="split")
    path, tied, _ = mixed(tmp_path, target=4.8, menu=menu, name="tied", tie_fused=True)
    spec_split = QuantSpec(4, 128, layers=tuple(split.mixed.layers.items()))
    assert route("vllm", spec_split, [128, 256]).format is None  # the contrast: the untied mix splits a fused group
    layers = tied.mixed.layers
    for b in range(2):
        assert len({layers[f"model.layers.{b}.self_attn.{m}"] for m in ("q_proj", "k_proj", "v_proj")}) == 1
        assert layers[f"model.layers.{b}.mlp.gate_proj"] == layers[f"model.layers.{b}.mlp.up_proj"]
    assert tied.mixed.bits_per_weight <= 4.8 and len(tied.mixed.grids) >= 2
    assert route("vllm", QuantSpec(4, 128, layers=tuple(layers.items())), [128, 256]).format == "compressed-tensors"
    assert checkpoint_info(path)["bits_per_quantized_weight"] == pytest.approx(tied.mixed.bits_per_weight)


def test_a_mix_that_leaves_out_the_base_grid_names_only_grids_in_use(tmp_path):
    """A menu without the base grid (w4g128): the checkpoint stores its most common layer grid as the base, so its config,
    the reloaded model and `export --for` name only grids some layer is on; logits are unchanged by the reload."""
    from qatlm.export.runtimes import checkpoint_widths, route
    from qatlm.model.checkpoint import read_quant_config, spec_from_config

    path, s, model = mixed(tmp_path, target=4.8, menu="w4g32,w4g64", tie_fused=True)
    assert "w4g128" not in s.mixed.grids and len(s.mixed.grids) == 2
    qc = read_quant_config(path)[1]
    spec = spec_from_config(qc)
    assert spec.plain.tag in s.mixed.grids
    assert (qc["bits"], qc["group_size"]) == (spec.plain.bits, spec.plain.group_size)
    assert s.mixed.grids[spec.plain.tag] + len(spec.layers) == sum(s.mixed.grids.values())  # the base's layers are not listed
    back = load_quantized(path)
    assert {n: m.spec.tag for n, m in packed_layers(back).items()} == s.mixed.layers
    assert torch.equal(logits(back), logits(model))
    r = route("vllm", spec, checkpoint_widths(path))
    assert r.format == "compressed-tensors" and "w4g128" not in r.why
    assert checkpoint_info(path)["layer_grids"] == s.mixed.grids


def test_sensitivity_puts_more_bits_where_a_planted_outlier_layer_is():
    menu = "w2g32,w3g32,w4g32,w8g32"

    def bits_of(model):
        spec, s = plan(model, QuantSpec(target_bpw=3.6, menu=menu), ids())
        return {n: int(t[1]) for n, t in s.layers.items()}, s

    base, _ = bits_of(tiny_model("llama"))
    planted = tiny_model("llama")
    w = planted.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        w[::7, ::5] *= 25.0  # a few outliers stretch every group's range
    got, s = bits_of(planted)
    name = "model.layers.1.mlp.up_proj"
    assert got[name] > base[name]
    others = sorted(b for n, b in got.items() if n != name)
    assert got[name] > others[len(others) // 2]  # above the median layer
    assert s.bits_per_weight <= 3.6
    assert s.sensitivity[name]["w2g32"] > 5 * _sens(tiny_model("llama"), name, menu)


def _sens(model, name, menu):
    return plan(model, QuantSpec(target_bpw=3.6, menu=menu), ids())[1].sensitivity[name]["w2g32"]


def test_block_ap_e2e_qp_and_dl_qat_train_a_mixed_model_on_its_own_grids(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the cat sat on the mat number {i}" for i in range(400)))
    path, s, model = mixed(tmp_path, menu="w2g32,w4g32,w8g32", config=BlockAPConfig, epochs=1, val_samples=1, calib_samples=4,
                           calib_seqlen=32)
    assert s.block_ap is not None and s.mixed is not None
    assert {n: m.spec.tag for n, m in packed_layers(model).items()} == s.mixed.layers  # Block-AP trained each on its grid
    for stage, name in ((E2EQPConfig(data=str(text), samples=8, seqlen=32, val_samples=2, epochs=1, batch_size=4), "e2e"),
                        (DLQATConfig(data=str(text), samples=8, seqlen=32, val_samples=2, epochs=1, batch_size=4, rank=2), "dl")):
        quantize(path, stage, out=tmp_path / name, progress=False, cache_dir=tmp_path)
        back = load_quantized(tmp_path / name)
        assert {n: m.spec.tag for n, m in packed_layers(back).items()} == s.mixed.layers, name
        assert checkpoint_info(tmp_path / name)["layer_grids"] == s.mixed.grids


def test_a_mixed_model_reloads_and_exports_with_the_same_logits(tmp_path):
    path, s, model = mixed(tmp_path)
    ref = logits(model)
    back = load_quantized(path)
    assert torch.equal(logits(back), ref)
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    from qatlm.model.checkpoint import spec_from_config

    base = spec_from_config(cfg).plain.tag  # a grid some layer is on (SYM_MENU leaves out the default w4g128)
    assert base in s.mixed.grids
    assert len(cfg["dynamic"]) == len(packed_layers(back)) - sum(1 for t in s.mixed.layers.values() if t == base)
    rep = export_checkpoint(path, "gptq", tmp_path / "gptq")  # the export reloads it and compares (raises otherwise)
    assert rep["reload_max_logit_diff"] == 0.0
    export_checkpoint(path, "compressed-tensors", tmp_path / "ct")
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == sorted({int(t[1]) for t in s.mixed.layers.values()})
    from transformers import AutoModelForCausalLM

    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    torch.testing.assert_close(logits(ct), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_a_mixed_model_runs_in_llama_cpp(tmp_path):
    need_llama_cpp()
    from tiny import llama_cpp_logits

    path, s, model = mixed(tmp_path)
    rep = export_checkpoint(path, None, tmp_path / "g", runtime="llama.cpp")
    assert set(rep["ggml_types"]) == {"Q4_0", "Q8_0"} if any(t.startswith("w8") for t in s.mixed.layers.values()) else True
    x = ids(1, 24)
    got = llama_cpp_logits(tmp_path / "g" / rep["file"], x)
    ref = logits(model, x)[0]
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_export_for_vllm_names_the_layer_grid_it_has_no_kernel_for(tmp_path):
    path, s, _ = mixed(tmp_path)
    with pytest.raises(QatlmError, match=r"its w2g32-sym layers: vLLM has no kernel for 2-bit"):
        export_checkpoint(path, None, tmp_path / "v", runtime="vllm")
    assert not (tmp_path / "v").exists()


def test_a_resumed_run_keeps_its_allocation(tmp_path, monkeypatch):
    spec = QuantSpec(target_bpw=4.0, menu=SYM_MENU)
    first, s1 = plan(tiny_model("llama"), spec, ids(), work_dir=tmp_path, resume=False)
    assert (tmp_path / "allocation.json").is_file()
    import qatlm.methods.mixed as mx

    monkeypatch.setattr(mx, "measure", lambda *a, **k: pytest.fail("a resumed run measured again"))
    again, s2 = plan(tiny_model("llama"), spec, ids(), work_dir=tmp_path, resume=True)
    assert again == first and s2.layers == s1.layers


def test_a_lazily_loaded_model_streams_to_the_same_mixed_model(tmp_path):
    src = tmp_path / "fp"
    tiny_model("llama").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    x = ids()
    spec = QuantSpec(target_bpw=4.0, menu=SYM_MENU)
    s = quantize(src, RTNConfig(grid=spec), calib=(x, x[:1]), out=tmp_path / "lazy", progress=False)
    _, s_mem, model = mixed(tmp_path, name="mem")
    assert s.mixed.layers == s_mem.mixed.layers
    assert torch.equal(logits(load_quantized(tmp_path / "lazy")), logits(model))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed-src")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(" ".join(f"the cat sat on the mat number {i}" for i in range(400)))
    return root


Q = ["quantize", "--model", "{src}/model", "--method", "rtn", "--out", "{tmp}/q"]


@pytest.mark.parametrize("extra,message", [
    (["--target-bpw", "0.5"], "--target-bpw 0.5 is not a budget qatlm can meet"),
    (["--target-bpw", "2.5", "--bit-menu", "w4x64"], "'w4x64' is not a grid"),
    (["--target-bpw", "2.5", "--bit-menu", "w5g64"], "bits=5 is not supported"),
    (["--grid", "k"], "--grid k mixes llama.cpp's types within a budget: give --target-bpw"),
    (["--tie-fused"], "--tie-fused ties the grids a --target-bpw allocation chooses: give --target-bpw too"),
    (["--grid", "k", "--target-bpw", "3", "--method", "efficientqat"], "trains uniform grids only, not --grid k"),
    (["--method", "block-ap", "--target-bpw", "1.5", "--calib", "{src}/text.txt", "--calib-samples", "4", "--calib-seqlen", "16",
      "--val-samples", "1"], "below what the menu's smallest grids take"),
])
def test_bad_mixed_precision_input_is_one_clear_line(extra, message, src, tmp_path, capsys, monkeypatch):
    check_one_clear_line(Q + [a.replace("{src}", str(src)) for a in extra], message, src, tmp_path, capsys, monkeypatch)


def test_a_mixed_gptq_checkpoint_loads_in_gptqmodel(tmp_path, monkeypatch):
    """GPTQModel.load reads the per-module bits from the checkpoint's ``dynamic`` config (its fp16 kernels: close, not
    equal); the route says so, since transformers' from_pretrained gives every layer the base grid."""
    pytest.importorskip("gptqmodel")
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel

    from qatlm.export.runtimes import checkpoint_widths, route
    from qatlm.model.checkpoint import read_quant_config, spec_from_config

    path, s, model = mixed(tmp_path, menu="w2g32,w4g32,w8g32")
    r = route("transformers", spec_from_config(read_quant_config(path)[1]), checkpoint_widths(path))
    assert r.format == "gptq" and "GPTQModel.load" in r.why
    g = GPTQModel.load(str(path), device="cpu")
    ref = logits(model)
    got = logits(g.model)
    assert (got - ref).abs().max() < 2e-2 * ref.abs().max()


def _k_model():  # 256-wide inputs hold K types; down_proj's 320-wide input only the 32-weight GGUF types
    return tiny_model("llama", hidden_size=256, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2)


def test_a_k_quant_mix_uses_llama_cpp_types_within_budget_and_exports_them_bit_exactly(tmp_path):
    """--grid k --target-bpw: each layer on one of llama.cpp's types (K types where the width allows, Q4_0/Q8_0
    elsewhere), the budget met as the file's bytes count it, the same logits after reloading, one GGUF tensor type per
    layer as allocated, decoded by the gguf package to qatlm's weights exactly."""
    import gguf

    from qatlm.quant.grid import K_MENU, ggml_name, spec_from_tag

    model, x = _k_model(), ids()
    s = quantize(model, RTNConfig(grid=QuantSpec(format="k", target_bpw=3.6)), calib=(x, x[:1]), out=tmp_path / "k",
                 tokenizer=tiny_tokenizer(), progress=False)
    tags = s.mixed.layers
    assert set(tags.values()) <= set(K_MENU.split(",")) and s.mixed.bits_per_weight <= 3.6
    for t in (t for n, t in tags.items() if "down_proj" in n):  # 320 wide: only the types of 32-weight blocks fit
        assert spec_from_tag(t).group_size == 32 and (spec_from_tag(t).kformat is None or spec_from_tag(t).kformat.block == 32), t
    assert len({t for n, t in tags.items() if "down_proj" not in n}) >= 2, tags  # a real mix of K types
    info = checkpoint_info(tmp_path / "k")
    weights = sum(lin.in_features * lin.out_features for b in _k_model().model.layers for lin in quant_targets(b).values())
    stored = 0
    for f in (tmp_path / "k").glob("*.safetensors"):
        with safe_open(f, framework="pt") as fh:
            stored += sum(fh.get_slice(k).get_shape()[0] * fh.get_slice(k).get_shape()[1] for k in fh.keys() if k.endswith(".kblocks"))
    gptq = [t for n, t in tags.items() if "down_proj" in n and spec_from_tag(t).kformat is None]  # stored as GPTQ tensors
    assert stored + sum(spec_from_tag(t).layer_bytes(320, 256) for t in gptq) == \
        pytest.approx(info["bits_per_quantized_weight"] * weights / 8)  # block bytes read from the file + the GPTQ layers
    assert info["bits_per_quantized_weight"] == pytest.approx(s.mixed.bits_per_weight) and info["layer_grids"] == s.mixed.grids
    from qatlm.describe import info_rows

    assert "Q2_K x" in dict(info_rows(info))["grid"]  # llama.cpp's names, as its tools print them
    ref = logits(model)
    back = load_quantized(tmp_path / "k")
    assert torch.equal(logits(back), ref)
    assert {n: m.spec.tag for n, m in packed_layers(back).items()} == tags
    rep = export_checkpoint(tmp_path / "k", None, tmp_path / "g", runtime="llama.cpp")
    assert rep["max_abs_error"] == 0.0
    want = {}
    for t in tags.values():
        want[ggml_name(spec_from_tag(t))] = want.get(ggml_name(spec_from_tag(t)), 0) + 1
    assert rep["ggml_types"] == want
    reader = gguf.GGUFReader(str(tmp_path / "g" / rep["file"]))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.attn_v.weight"] == ggml_name(spec_from_tag(tags["model.layers.1.self_attn.v_proj"]))
    with pytest.raises(QatlmError, match=r"a mix of llama.cpp types \(--grid k\) checkpoint exports to gguf only"):
        export_checkpoint(tmp_path / "k", "gptq", tmp_path / "x")


def test_block_ap_trains_a_k_quant_mix_on_its_own_types(tmp_path):
    model, x = _k_model(), ids()
    cfg = BlockAPConfig(grid=QuantSpec(format="k", target_bpw=3.6), epochs=2, batch_size=2, val_samples=0)
    s = quantize(model, cfg, calib=(x, x[:0]), out=tmp_path / "b", tokenizer=tiny_tokenizer(), progress=False)
    assert all(b.trained_rel_error < b.rtn_rel_error for b in s.block_ap.blocks)
    back = load_quantized(tmp_path / "b")
    assert {n: m.spec.tag for n, m in packed_layers(back).items()} == s.mixed.layers
    assert torch.equal(logits(back), logits(model))


def test_llama_cpp_runs_a_k_quant_mix(tmp_path):
    need_llama_cpp()
    from tiny import llama_cpp_logits

    model, x = _k_model(), ids()
    quantize(model, RTNConfig(grid=QuantSpec(format="k", target_bpw=3.6)), calib=(x, x[:1]), out=tmp_path / "k",
             tokenizer=tiny_tokenizer(), progress=False)
    rep = export_checkpoint(tmp_path / "k", None, tmp_path / "g", runtime="llama.cpp")
    assert len(rep["ggml_types"]) >= 3
    x = ids(1, 24)
    got = llama_cpp_logits(tmp_path / "g" / rep["file"], x)
    ref = logits(model, x)[0]
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
