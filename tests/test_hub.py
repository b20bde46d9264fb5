"""Models named by their hub id, resolved offline from a Hugging Face cache laid out as the hub lays it out
(``models--org--name/refs/REV`` -> ``snapshots/COMMIT/``), with ``HF_HUB_OFFLINE=1``: no test reaches the network.
And ``--device auto``: the GPU when torch sees one, else the CPU."""

import json
import shutil

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

import qatlm
from qatlm.cli import build_parser, main

MAIN, V2 = "a" * 40, "b" * 40


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def add(repo, commit, model=None, refs=("main",), pickled=False):
        snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
        (model or tiny_model("llama")).save_pretrained(snap)
        tiny_tokenizer().save_pretrained(snap)
        if pickled:  # a repository that ships only pickled weights
            from safetensors.torch import load_file

            torch.save(load_file(snap / "model.safetensors"), snap / "pytorch_model.bin")
            (snap / "model.safetensors").unlink()
        refs_dir = snap.parent.parent / "refs"
        refs_dir.mkdir(exist_ok=True)
        for r in refs:
            (refs_dir / r).write_text(commit)
        return snap

    add("org/tiny", MAIN)
    add("org/tiny", V2, model=tiny_model("llama", seed=1), refs=("v2",))
    add("org/pickled", MAIN, pickled=True)
    return add


def test_quantize_takes_a_hub_id_and_records_it(hub, tmp_path, capsys):
    assert main(["quantize", "--model", "org/tiny", "--bits", "4", "--group-size", "32", "--out", str(tmp_path / "q")]) == 0
    meta = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["meta"]["qatlm"]
    assert meta["source"] == "org/tiny"
    ref = tiny_model("llama")  # what refs/main names
    qatlm.quantize(ref, qatlm.RTNConfig(4, 32))
    ids = torch.randint(3, 320, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(qatlm.load_quantized(tmp_path / "q")(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_revision_picks_another_snapshot(hub, tmp_path):
    assert main(["quantize", "--model", "org/tiny", "--revision", "v2", "--bits", "4", "--group-size", "32",
                 "--out", str(tmp_path / "v2")]) == 0
    ref = tiny_model("llama", seed=1)  # the v2 snapshot's weights
    qatlm.quantize(ref, qatlm.RTNConfig(4, 32))
    ids = torch.randint(3, 320, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(qatlm.load_quantized(tmp_path / "v2")(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["quantize", "--model", "org/pickled", "--out", "{tmp}/q"], "org/pickled has no safetensors weights (only pytorch_model.bin"),
    (["quantize", "--model", "org/absent", "--out", "{tmp}/q"], "org/absent is not in the local Hugging Face cache"),
    (["quantize", "--model", "org/tiny", "--revision", "v9", "--out", "{tmp}/q"], "org/tiny at revision v9 is not in the local"),
    (["quantize", "--model", "{tmp}", "--revision", "v2", "--out", "{tmp}/q"], "--revision v2 applies to hub ids only"),
    (["info", "org/absent"], "org/absent is not in the local Hugging Face cache"),
    (["eval", "org/absent", "--tasks", "none"], "org/absent is not in the local Hugging Face cache"),
])
def test_hub_errors_are_one_line(hub, tmp_path, capsys, argv, message):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("qatlm: error:")]
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "q").exists()


def test_the_api_takes_a_hub_id_and_a_local_folder_wins(hub, tmp_path, monkeypatch):
    s = qatlm.quantize("org/tiny", qatlm.RTNConfig(4, 32), out=tmp_path / "q", progress=False)
    assert s.method == "rtn" and (tmp_path / "q" / "model.safetensors").is_file()
    local = tmp_path / "org" / "tiny"  # a folder of the same name, here: it is what is meant
    shutil.copytree(hub("org/other", "c" * 40), local)
    monkeypatch.chdir(tmp_path)
    s = qatlm.quantize("org/tiny", qatlm.RTNConfig(4, 32), out=tmp_path / "q2", progress=False)
    meta = json.loads((tmp_path / "q2" / "config.json").read_text())["quantization_config"]["meta"]["qatlm"]
    assert meta["source"] == "tiny"  # the local folder's name, not the hub id


def test_device_auto_picks_cuda_when_torch_sees_a_gpu(monkeypatch, tmp_path, capsys):
    from qatlm.errors import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    q = build_parser()._subparsers._group_actions[0].choices["quantize"]
    assert q.get_default("device") == "auto" and "auto (default" in q.format_help()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU is seen...
    assert resolve_device("auto") == "cuda"
    d = tmp_path / "m"
    tiny_model("llama").save_pretrained(d)
    code = main(["quantize", "--model", str(d), "--out", str(tmp_path / "q")])  # ...but none can be used here
    err = capsys.readouterr().err
    assert code == 2 and "--device cuda: no CUDA GPU is visible" in err and not (tmp_path / "q").exists()
