"""CLI: the happy path on a tiny model folder, and a one-line error for each kind of bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import tiny_model

from qatlm.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp") / "tiny-llama"
    tiny_model("llama", hidden_size=128, intermediate_size=256).save_pretrained(d)
    return d


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_then_info_reports_true_size(model_dir, tmp_path, capsys):
    out = tmp_path / "w2g64"
    code, _, err = run_cli(["quantize", "--model", model_dir, "--method", "rtn", "--bits", 2, "--group-size", 64, "--out", out], capsys)
    assert code == 0, err
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights are as readable as the config (was 0600)
    code, text, _ = run_cli(["info", out, "--json"], capsys)
    info = json.loads(text)
    assert info["size_on_disk_bytes"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert info["bits"] == 2 and info["group_size"] == 64 and info["method"] == "rtn"
    # 2 bits + fp16 scale/64 + 2-bit zero/64 (+ a negligible g_idx) per weight
    assert 2.25 < info["bits_per_quantized_weight"] <= 2.6
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq_v2" and cfg["desc_act"] is False
    code, text, _ = run_cli(["info", out], capsys)
    assert "x vs fp16" in text and "2-bit, group 64" in text and "full precision" in text and "llama.cpp" in text
    # the parameters kept in full precision, counted from the tiny model itself
    fp_params = sum(p.numel() for n, p in tiny_model("llama", hidden_size=128, intermediate_size=256).named_parameters()
                    if "_proj" not in n)  # embeddings, norms and the untied LM head
    assert info["other_params"] == fp_params and "embeddings" in info["kept_in_full_precision"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "{tmp}/nope"], "does not exist"),
        (["--model", "{tmp}"], "not a Hugging Face model folder"),
        (["--bits", "5"], "bits=5 is not supported"),
        (["--group-size", "100"], "group size 100 is invalid"),
        (["--group-size", "0"], "group size 0 is invalid"),
        (["--method", "magic"], "unknown method 'magic'"),
        (["--out", "{model}"], "is the input"),
    ],
)
def test_bad_input_is_one_line_error(args, message, model_dir, tmp_path, capsys):
    full = ["quantize", "--model", str(model_dir), "--out", str(tmp_path / "out")]
    for i in range(0, len(args), 2):
        v = args[i + 1].format(tmp=tmp_path, model=model_dir)
        if args[i] in full:
            full[full.index(args[i]) + 1] = v
        else:
            full += [args[i], v]
    code, _, err = run_cli(full, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("qatlm: error")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_one_line_error(tmp_path, capsys):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    code, _, err = run_cli(["quantize", "--model", d, "--out", tmp_path / "o"], capsys)
    errors = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert code == 2 and len(errors) == 1 and "unsupported model" in errors[0] and "Traceback" not in err


def test_pickled_weights_are_refused(tmp_path, model_dir, capsys):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((model_dir / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not really")
    code, _, err = run_cli(["quantize", "--model", d, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "no .safetensors weights" in err


def test_info_on_fp_folder_is_clear_error(model_dir, capsys):
    code, _, err = run_cli(["info", model_dir], capsys)
    assert code == 2 and "not a qatlm/GPTQ checkpoint" in err


def test_failed_save_leaves_nothing_behind(model_dir, tmp_path, monkeypatch, capsys):
    """A crash while writing leaves neither the output folder nor a temporary one, and is one line naming the file
    that holds its traceback."""
    import qatlm.model.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "write_shards", boom)
    assert main(["quantize", "--model", str(model_dir), "--out", str(tmp_path / "o")]) == 1
    assert list(tmp_path.iterdir()) == []
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("qatlm: error:")]
    assert len(err) == 1 and "qatlm quantize failed unexpectedly (RuntimeError: disk full)" in err[0]
    trace = err[0].rsplit("the full traceback is in ", 1)[1]
    assert "Traceback" in Path(trace).read_text() and "disk full" in Path(trace).read_text()


def test_overwrite_replaces_existing_checkpoint(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(["quantize", "--model", model_dir, "--bits", 8, "--group-size", -1, "--out", out], capsys)[0] == 0
    assert run_cli(["quantize", "--model", model_dir, "--bits", 3, "--out", out, "--overwrite"], capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 3


def test_console_script_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "qatlm.cli", "quantize", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--model", "--method", "--bits", "--group-size", "--out", "--overwrite"):
        assert flag in r.stdout


def test_save_dtype_float16_halves_unquantized_tensors(model_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from qatlm import load_quantized

    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(["quantize", "--model", model_dir, "--bits", 4, "--group-size", 64, "--out", a], capsys)[0] == 0
    assert run_cli(["quantize", "--model", model_dir, "--bits", 4, "--group-size", 64, "--out", b, "--save-dtype", "float16"], capsys)[0] == 0
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sb["model.embed_tokens.weight"].dtype == torch.float16 and sa["model.embed_tokens.weight"].dtype == torch.float32
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.endswith((".qweight", ".qzeros", ".scales")))
    ids = torch.randint(3, 320, (1, 12))
    with torch.no_grad():
        la, lb = load_quantized(a)(ids).logits, load_quantized(b)(ids).logits
    assert lb.dtype == torch.float32 and (la - lb).abs().max() < 1e-2 * la.abs().max()


def test_compare_writes_table_json_and_chart(tmp_path, capsys):
    from tiny import tiny_tokenizer

    fp = tmp_path / "fp"
    tiny_model("llama").save_pretrained(fp)
    tiny_tokenizer().save_pretrained(fp)
    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(f"the cat sat on the mat number {i}" for i in range(400)))
    q = tmp_path / "q"
    assert run_cli(["quantize", "--model", fp, "--bits", 4, "--group-size", 32, "--out", q], capsys)[0] == 0
    out = tmp_path / "report"
    code, table, err = run_cli(["compare", fp, q, "--heldout", text, "--seqlen", 64, "--ppl-windows", 4, "--tasks", "none",
                                "--out", out, "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    rows = json.loads((out / "report.json").read_text())
    assert [r["recipe"] for r in rows] == ["fp", "rtn"] and rows[1]["setting"] == "w4g32"
    assert all(r["heldout_ppl"] > 1 for r in rows) and rows[1]["size_on_disk_mib"] < rows[0]["size_on_disk_mib"]
    assert "| fp32 |" in table and "| w4g32 |" in table and (out / "report.png").stat().st_size > 1000
    assert (out / "report.md").read_text().count("\n|") >= 3
