"""One pipeline under every entry point: the Python API takes a path or a model and keeps every guarantee of the
command line (no replaced input, no replaced finished output, no lost unfinished run, one run per output), and the
same recipe through both gives the same checkpoint byte for byte."""

import json
import subprocess

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer, tree_hash

import qatlm
from qatlm import BlockAPConfig, QatlmError, RTNConfig, load_fp_model
from qatlm.cli import main


@pytest.fixture()
def model_dir(tmp_path):
    d = tmp_path / "m"
    tiny_model("llama", num_hidden_layers=2).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture()
def text(tmp_path):
    t = tmp_path / "calib.txt"
    t.write_text(" ".join(f"the cat sat on the mat number {i} and a man is sitting on a roof" for i in range(600)))
    return t


def test_resume_never_replaces_a_finished_output_nor_the_users_files_in_it(model_dir, tmp_path):
    done = tmp_path / "done"
    qatlm.quantize(str(model_dir), RTNConfig(4, 32), out=done, progress=False)
    (done / "my-notes.txt").write_text("mine")
    before = tree_hash(done)
    with pytest.raises(QatlmError, match="already exists"):
        qatlm.quantize(load_fp_model(model_dir), RTNConfig(2, 32), out=done, resume=True, progress=False)
    assert tree_hash(done) == before and (done / "my-notes.txt").read_text() == "mine"


def test_an_output_that_is_the_models_own_folder_is_refused_even_with_overwrite(model_dir):
    before = tree_hash(model_dir)
    for source in (load_fp_model(model_dir), str(model_dir)):  # a model object: the folder it was loaded from is its input
        with pytest.raises(QatlmError, match="is the input"):
            qatlm.quantize(source, RTNConfig(4, 32), out=model_dir, overwrite=True, progress=False)
        with pytest.raises(QatlmError, match="contains the input"):
            qatlm.quantize(source, RTNConfig(4, 32), out=model_dir.parent, overwrite=True, progress=False)
    assert tree_hash(model_dir) == before


def test_an_unfinished_run_is_kept_unless_resume_or_overwrite(model_dir, text, tmp_path, monkeypatch):
    from qatlm.methods.block_ap.state import RunState

    out = tmp_path / "q"
    cfg = BlockAPConfig(bits=2, group_size=32, epochs=1, calib=str(text), calib_samples=4, calib_seqlen=32, val_samples=1)
    real = RunState.finish_block

    def finish_then_stop(self, bi, *a):  # interrupted (a user's Ctrl-C) once block 0 is finished and recorded
        real(self, bi, *a)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunState, "finish_block", finish_then_stop)
    with pytest.raises(KeyboardInterrupt):
        qatlm.quantize(str(model_dir), cfg, out=out, progress=False)
    monkeypatch.setattr(RunState, "finish_block", real)
    work = tmp_path / "q.work"
    finished = tree_hash(work / "blocks")
    for stage in (cfg, RTNConfig(2, 32)):  # the same recipe, and another one that would write into the same blocks/
        with pytest.raises(QatlmError, match="unfinished run"):
            qatlm.quantize(str(model_dir), stage, out=out, progress=False)
        assert tree_hash(work / "blocks") == finished and not out.exists()
    with pytest.raises(QatlmError, match="cannot resume"):  # resume belongs to the recipe and grid that started it
        qatlm.quantize(str(model_dir), RTNConfig(2, 32), out=out, resume=True, progress=False)
    s = qatlm.quantize(str(model_dir), cfg, out=out, resume=True, progress=False)
    assert s.block_ap.resumed_from_block == 1 and out.is_dir() and not work.exists()
    qatlm.quantize(str(model_dir), RTNConfig(2, 32), out=tmp_path / "r", progress=False)
    (tmp_path / "r.work").mkdir()
    (tmp_path / "r.work" / "progress.json").write_text(json.dumps({"fingerprint": "x", "done": 1}))
    qatlm.quantize(str(model_dir), RTNConfig(2, 32), out=tmp_path / "r", overwrite=True, progress=False)  # overwrite starts over
    assert not (tmp_path / "r.work").exists()


def test_a_live_run_on_the_same_output_refuses_a_second_api_run(model_dir, tmp_path):
    other = subprocess.Popen(["sleep", "60"])  # another process that holds the output's lock
    try:
        (tmp_path / ".q.lock").write_text(str(other.pid))
        with pytest.raises(QatlmError, match=f"another qatlm run \\(pid {other.pid}\\) is writing"):
            qatlm.quantize(str(model_dir), RTNConfig(4, 32), out=tmp_path / "q", progress=False)
        assert not (tmp_path / "q").exists() and not (tmp_path / "q.work").exists()
    finally:
        other.kill()
        other.wait()
    qatlm.quantize(str(model_dir), RTNConfig(4, 32), out=tmp_path / "q", progress=False)  # a dead owner's lock is taken over
    assert (tmp_path / "q" / "config.json").is_file() and not (tmp_path / ".q.lock").exists()


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in ("seconds", "train_flops_per_s")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


@pytest.mark.parametrize("method", ["rtn", "block-ap"])
def test_the_api_and_the_cli_write_the_same_checkpoint(model_dir, text, tmp_path, method, capsys):
    flags = ["--bits", "2", "--group-size", "32"]
    fields = {}
    if method == "block-ap":
        flags += ["--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "32", "--val-samples", "1", "--epochs", "2"]
        fields = {"block_ap": {"calib": str(text), "calib_samples": 4, "calib_seqlen": 32, "val_samples": 1, "epochs": 2}}
    assert main(["quantize", "--model", str(model_dir), "--method", method, *flags, "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    stages = qatlm.recipe(method, grid=qatlm.QuantSpec(2, 32), **fields)
    summary = qatlm.quantize(str(model_dir), stages, out=tmp_path / "api", progress=False)
    assert summary.method == method
    cli, api = tmp_path / "cli", tmp_path / "api"
    names = sorted(p.name for p in cli.iterdir())
    assert names == sorted(p.name for p in api.iterdir())
    for name in names:
        if name == "training_summary.json":  # the same run, apart from how long it took
            a, b = (json.loads((d / name).read_text()) for d in (cli, api))
            assert _without_timings(a) == _without_timings(b) and str(tmp_path) not in (api / name).read_text()
        elif name not in ("training_log.jsonl", "training_loss.png"):  # the log records each block's seconds
            assert (cli / name).read_bytes() == (api / name).read_bytes(), name
    assert "model.safetensors" in names and "config.json" in names


def test_the_api_on_a_model_in_memory_writes_what_the_path_run_writes(model_dir, tmp_path):
    qatlm.quantize(str(model_dir), RTNConfig(4, 32), out=tmp_path / "path", progress=False)
    model = load_fp_model(model_dir)
    qatlm.quantize(model, RTNConfig(4, 32), out=tmp_path / "object", tokenizer=tiny_tokenizer(), progress=False)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "path" / name).read_bytes() == (tmp_path / "object" / name).read_bytes(), name
    with torch.no_grad():
        ids = torch.randint(3, 320, (1, 12))
        torch.testing.assert_close(qatlm.load_quantized(tmp_path / "path")(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
