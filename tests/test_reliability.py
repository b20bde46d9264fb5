"""Never destroy a user's data, never mix two runs: outputs that are inputs, resume of a finished run,
kill -9 during a replace, two runs on one output, resume from another source model."""

import json
import subprocess
import sys
import textwrap

import pytest
from tiny import tiny_model, tiny_tokenizer, tree_hash

from qatlm.cli import main



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    a, b = root / "model-a", root / "model-b"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(a)
    tiny_model("llama", num_hidden_layers=3, seed=1).save_pretrained(b)  # same architecture, other weights
    for d in (a, b):
        tiny_tokenizer().save_pretrained(d)
    text = root / "calib.txt"
    text.write_text(" ".join(f"the cat sat on the mat number {i} and a man is sitting on a roof" for i in range(600)))
    return a, b, text


def run(args, capsys):
    code = main([str(x) for x in args])
    return code, capsys.readouterr().err


def rtn(model, out, *extra):
    return ["quantize", "--model", model, "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", out, *extra]


def test_an_output_that_is_or_contains_or_lies_inside_the_input_is_refused(models, tmp_path, capsys):
    a, _, _ = models
    before = tree_hash(a)
    for out, msg in ((a, "is the input"), (a.parent, "contains the input"), (a / "q", "lies inside the input")):
        code, err = run(rtn(a, out, "--overwrite"), capsys)
        assert code == 2 and msg in err and "Traceback" not in err, err
    assert tree_hash(a) == before  # the source model is untouched
    code, _ = run(rtn(a, tmp_path / "q"), capsys)
    assert code == 0
    q_before = tree_hash(tmp_path / "q")
    code, err = run(["export", tmp_path / "q", "--format", "gptq", "--out", tmp_path / "q", "--overwrite"], capsys)
    assert code == 2 and "is the input" in err
    assert tree_hash(tmp_path / "q") == q_before


def test_resume_never_redoes_or_replaces_a_finished_output(models, tmp_path, capsys):
    a, _, text = models
    out = tmp_path / "done"
    assert run(rtn(a, out), capsys)[0] == 0
    (out / "my-notes.txt").write_text("mine")  # a user's file inside the finished output
    before = tree_hash(out)
    code, err = run(rtn(a, out, "--resume"), capsys)
    assert code == 2 and "already exists" in err
    assert tree_hash(out) == before


def test_resume_from_another_source_model_is_refused(models, tmp_path, capsys):
    a, b, text = models
    out = tmp_path / "o"
    work = tmp_path / "o.work"
    args = ["--method", "block-ap", "--bits", "2", "--group-size", "32", "--calib", text, "--calib-samples", "4",
            "--calib-seqlen", "32", "--val-samples", "2", "--epochs", "1", "--out", out]
    # an unfinished run of model a: its work folder, as a kill leaves it
    from qatlm.io import claim_work_dir, source_fingerprint

    claim_work_dir(work, source_fingerprint(a), resume=False)
    (work / "progress.json").write_text(json.dumps({"fingerprint": "x", "done": 1, "blocks": 3}))
    code, err = run(["quantize", "--model", b, *args, "--resume"], capsys)
    assert code == 2 and "another source model" in err
    assert source_fingerprint(a) != source_fingerprint(b)
    assert not out.exists()


KILL_AT = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    from qatlm import io as qio
    final, stage = Path(sys.argv[1]), sys.argv[2]
    calls = {"n": 0}
    real = os.replace
    def replace(a, b):
        calls["n"] += 1
        if stage == "between" and calls["n"] == 2:  # the old folder is aside, the new one not yet in
            os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b)
    qio.os.replace = replace
    def build(tmp):
        (tmp / "a.txt").write_text("new")
        if stage == "build":  # killed while the new folder is half written
            os.kill(os.getpid(), signal.SIGKILL)
        (tmp / "b.txt").write_text("new")
    qio.atomic_dir(final, build)
''')


@pytest.mark.parametrize("stage", ["build", "between"])
def test_kill_9_during_a_replace_leaves_the_complete_old_folder(tmp_path, stage):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a.txt").write_text("old")
    (final / "b.txt").write_text("old")
    r = subprocess.run([sys.executable, "-c", KILL_AT, str(final), stage])
    assert r.returncode == -9
    from qatlm.io import atomic_dir, tidy_output

    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert leftovers  # the kill left a partial (or an aside) folder behind
    tidy_output(final)  # what the next run on this output does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {f.name: f.read_text() for f in final.iterdir()} == {"a.txt": "old", "b.txt": "old"}  # old, complete
    atomic_dir(final, lambda t: (t / "c.txt").write_text("new"))  # and a normal replace still works
    assert [f.name for f in final.iterdir()] == ["c.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_lives(models, tmp_path, capsys):
    a, _, _ = models
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom qatlm.io import output_lock\n"
                               "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run(rtn(a, out, "--overwrite"), capsys)
        assert code == 2 and f"(pid {holder.pid}) is writing" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the owner is dead now: its stale lock is taken over and the run goes through
    assert (tmp_path / ".busy.lock").exists()
    code, _ = run(rtn(a, out), capsys)
    assert code == 0 and (out / "config.json").exists() and not (tmp_path / ".busy.lock").exists()


def test_no_local_paths_in_the_written_config(models, tmp_path, capsys):
    a, _, _ = models
    assert run(rtn(a, tmp_path / "q"), capsys)[0] == 0
    text = (tmp_path / "q" / "config.json").read_text()
    assert str(a.parent) not in text and json.loads(text)["quantization_config"]["meta"]["qatlm"]["source"] == "model-a"


def test_nan_weights_in_the_source_are_refused(tmp_path, capsys):
    import torch

    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    m.save_pretrained(tmp_path / "broken")
    tiny_tokenizer().save_pretrained(tmp_path / "broken")
    calib = ["--calib", tmp_path / "broken" / "tokenizer.json", "--calib-samples", "2", "--calib-seqlen", "16", "--val-samples", "1"]
    for method, extra in (("rtn", []), ("block-ap", calib)):
        code, err = run(["quantize", "--model", tmp_path / "broken", "--method", method, "--bits", "4", "--group-size", "32",
                         *extra, "--out", tmp_path / f"q-{method}"], capsys)
        assert code == 2 and "model.layers.1.mlp.up_proj: the source weight has 1 NaN/inf values" in err, err
        assert not (tmp_path / f"q-{method}").exists() and not (tmp_path / f"q-{method}.work").exists()


def test_training_summary_names_the_data_file_not_its_directory(models, tmp_path, capsys):
    a, _, text = models
    out = tmp_path / "bap"
    code, err = run(["quantize", "--model", a, "--method", "block-ap", "--bits", "2", "--group-size", "32", "--calib", text,
                     "--calib-samples", "4", "--calib-seqlen", "32", "--val-samples", "1", "--epochs", "1", "--out", out], capsys)
    assert code == 0, err
    for f in ("training_summary.json", "config.json"):
        assert str(text.parent) not in (out / f).read_text()
    assert json.loads((out / "training_summary.json").read_text())["block_ap"]["config"]["calib"] == "calib.txt"
