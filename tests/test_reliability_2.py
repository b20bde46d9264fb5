"""Reliability, round 2: no lost work (a damaged work folder is kept and what verifies is recovered; a work folder
belongs to one method), no silently wrong result (a resumed training continues only on the same tokens), and every
stop is one line: SIGTERM like Ctrl-C, a FIFO refused at once, an unforeseen exception named with its traceback file."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tiny import tiny_model, tiny_tokenizer, tree_hash

from qatlm.cli import main


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel2")
    tiny_model("llama", num_hidden_layers=4).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(" ".join(f"the cat sat on the mat number {i} and a man is on the roof" for i in range(800)))
    return root


def bap(src, out, *extra):
    return ["quantize", "--model", str(src / "model"), "--method", "block-ap", "--bits", "2", "--group-size", "32", "--calib",
            str(src / "text.txt"), "--calib-samples", "8", "--calib-seqlen", "32", "--val-samples", "2", "--epochs", "2",
            "--out", str(out), *extra]


def interrupted_block_ap(src, out, monkeypatch, after_block=1):
    """A Block-AP run stopped (as by Ctrl-C) once block ``after_block`` is finished and recorded."""
    from qatlm.methods.block_ap.state import RunState

    real = RunState.finish_block

    def finish_then_stop(self, bi, *a):
        real(self, bi, *a)
        if bi == after_block:
            raise KeyboardInterrupt
    monkeypatch.setattr(RunState, "finish_block", finish_then_stop)
    assert main(bap(src, out)) == 130
    monkeypatch.setattr(RunState, "finish_block", real)
    return out.parent / f"{out.name}.work"


@pytest.mark.parametrize("damage", ["", "{not json", "[1, 2]"])
def test_a_damaged_progress_file_is_named_and_kept(src, tmp_path, monkeypatch, capsys, damage):
    work = interrupted_block_ap(src, tmp_path / "q", monkeypatch)
    (work / "progress.json").write_text(damage)  # zero bytes, cut, or not an object
    before = tree_hash(work)
    capsys.readouterr()
    assert main(bap(src, tmp_path / "q")) == 2  # without --resume: refused, named, kept
    err = capsys.readouterr().err
    assert "unfinished run" in err and tree_hash(work) == before
    assert main(bap(src, tmp_path / "q", "--overwrite")) == 0 and not work.exists()  # --overwrite starts over


def test_resume_recovers_the_verified_blocks_of_a_damaged_work_folder(src, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    assert main(bap(src, tmp_path / "ref")) == 0
    work = interrupted_block_ap(src, tmp_path / "q", monkeypatch)
    (work / "progress.json").write_bytes(b"")
    capsys.readouterr()
    assert main(bap(src, tmp_path / "q", "--resume")) == 0
    assert "2 finished blocks verified and recovered" in capsys.readouterr().err
    summary = json.loads((tmp_path / "q" / "training_summary.json").read_text())["block_ap"]
    assert summary["resumed_from_block"] == 2 and len(summary["blocks"]) == 4
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "q" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # the run ends where an uninterrupted one ends


def test_a_block_file_of_another_run_is_not_recovered(src, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    work = interrupted_block_ap(src, tmp_path / "q", monkeypatch)

    f = work / "blocks" / "block_0001.safetensors"
    save_file(load_file(f), f, metadata={"fingerprint": "another-run"})  # block 1 from elsewhere: it does not verify
    (work / "progress.json").write_text("")
    capsys.readouterr()
    assert main(bap(src, tmp_path / "q", "--resume")) == 0
    assert "1 finished blocks verified and recovered" in capsys.readouterr().err


def test_rtn_on_the_output_of_an_interrupted_block_ap_run_is_refused_and_its_blocks_kept(src, tmp_path, monkeypatch, capsys):
    work = interrupted_block_ap(src, tmp_path / "q", monkeypatch)
    before = tree_hash(work)
    rtn = ["quantize", "--model", str(src / "model"), "--method", "rtn", "--out", str(tmp_path / "q")]
    capsys.readouterr()
    assert main(rtn) == 2 and "unfinished run" in capsys.readouterr().err
    assert main(rtn + ["--resume"]) == 2 and "cannot resume" in capsys.readouterr().err
    assert tree_hash(work) == before and not (tmp_path / "q").exists()


def test_train_resumes_only_on_the_same_tokens(src, tmp_path, monkeypatch, capsys):
    """The resume check reads the training text's tokens, not its path: edited text is refused, the same text under
    another path continues."""
    import qatlm.train.end_to_end as e2e

    assert main(["quantize", "--model", str(src / "model"), "--bits", "4", "--group-size", "32", "--out", str(tmp_path / "p")]) == 0
    text = tmp_path / "mine.txt"
    text.write_text((src / "text.txt").read_text())
    train = lambda data, *x: ["train", "--from", str(tmp_path / "p"), "--data", str(data), "--samples", "8", "--seqlen", "32",  # noqa: E731
                              "--val-samples", "2", "--batch-size", "4", "--save-every", "1", "--out", str(tmp_path / "t"), *x]
    real = e2e._save_state

    def save_then_stop(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(e2e, "_save_state", save_then_stop)
    assert main(train(text)) == 130
    monkeypatch.setattr(e2e, "_save_state", real)
    text.write_text(text.read_text().replace("cat", "dog"))  # the user edited the text
    capsys.readouterr()
    assert main(train(text, "--resume")) == 2 and "other settings or data" in capsys.readouterr().err
    copy = tmp_path / "copy-of-the-original.txt"
    copy.write_text((src / "text.txt").read_text())
    assert main(train(copy, "--resume")) == 0, capsys.readouterr().err


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "qatlm.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def test_sigterm_stops_like_ctrl_c_on_its_own_line_and_leaves_no_lock(src, tmp_path):
    out = tmp_path / "q"
    argv = bap(src, out)
    argv[argv.index("--epochs") + 1] = "50"  # long enough to be stopped mid-way
    p = _cli(*argv[0:])
    progress = tmp_path / "q.work" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (progress.exists() and json.loads(progress.read_text() or "{}").get("done", 0) >= 1):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    lines = err.replace("\r", "\n").splitlines()
    assert any(ln.startswith("qatlm: interrupted by SIGTERM") and "--resume" in ln for ln in lines), err
    assert not (tmp_path / ".q.lock").exists() and not out.exists()
    assert (tmp_path / "q.work" / "blocks").is_dir()  # the finished block is kept for --resume


def test_a_fifo_as_text_is_refused_at_once(src, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    argv = bap(src, tmp_path / "q")
    argv[argv.index("--calib") + 1] = str(fifo)
    p = _cli(*argv)
    _, err = p.communicate(timeout=60)  # (reading it would block forever)
    assert p.returncode == 2 and "is not a regular file" in err
    assert not (tmp_path / ".q.lock").exists() and not (tmp_path / "q.work").exists()


def test_an_unforeseen_exception_is_one_line_naming_its_traceback_file(src, monkeypatch, capsys):
    import qatlm.describe as describe

    def boom(*a, **k):
        raise IndexError("list index out of range")
    monkeypatch.setattr(describe, "print_info", boom)
    assert main(["info", str(src / "model")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qatlm: error: qatlm info failed unexpectedly (IndexError: list index out of range)")
    trace = err[0].rsplit("the full traceback is in ", 1)[1]
    assert "Traceback (most recent call last)" in open(trace).read()


def test_the_api_raises_qatlm_errors_for_unknown_fields():
    import qatlm

    with pytest.raises(qatlm.QatlmError, match="BlockAPConfig has no field 'epoch'"):
        qatlm.recipe("block-ap", block_ap={"epoch": 5})
    with pytest.raises(qatlm.QatlmError, match="BlockAPConfig has no field 'epoch'"):
        qatlm.BlockAPConfig(epoch=5)


def test_the_api_names_bad_arguments_and_unforeseen_failures_as_qatlm_errors(tmp_path, monkeypatch):
    import qatlm
    from qatlm.model import sequential

    with pytest.raises(qatlm.QatlmError, match="must be a model folder"):
        qatlm.quantize(123, qatlm.RTNConfig(4, 32))
    with pytest.raises(qatlm.QatlmError, match="out must be a folder path"):
        qatlm.quantize(tiny_model("llama"), qatlm.RTNConfig(4, 32), out=5)
    with pytest.raises(qatlm.QatlmError, match="unknown method config"):
        qatlm.quantize(tiny_model("llama"), "rtn")

    def boom(*a, **k):
        raise AssertionError("an internal check failed")
    d = tmp_path / "m"
    tiny_model("llama").save_pretrained(d)
    monkeypatch.setattr(sequential, "save_block", boom)
    with pytest.raises(qatlm.QatlmError, match=r"qatlm.quantize failed unexpectedly \(AssertionError: an internal check failed\)"):
        qatlm.quantize(str(d), qatlm.RTNConfig(4, 32), out=tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.work").exists()
