"""Every output folder carries a model card (README.md, the hub's convention) that names the runtimes loading that very
folder and the export the others need; ``qatlm upload`` sends only finished qatlm folders, and fails in one line
without credentials or network."""

import pytest
from tiny import tiny_model, tiny_tokenizer

from qatlm.cli import main


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    tiny_model("llama", hidden_size=256, intermediate_size=512).save_pretrained(root / "m")
    tiny_tokenizer().save_pretrained(root / "m")
    (root / "t.txt").write_text(" ".join(f"the cat sat on the mat number {i}" for i in range(400)))
    q = ["quantize", "--model", str(root / "m"), "--group-size", "32"]
    assert main(q + ["--bits", "4", "--out", str(root / "asym4")]) == 0
    assert main(q + ["--bits", "4", "--sym", "--out", str(root / "sym4")]) == 0
    assert main(q + ["--bits", "2", "--out", str(root / "w2")]) == 0
    assert main(["quantize", "--model", str(root / "m"), "--grid", "q2_k", "--out", str(root / "k")]) == 0
    assert main(["train", "--from", str(root / "asym4"), "--data", str(root / "t.txt"), "--samples", "4", "--seqlen", "32",
                 "--val-samples", "1", "--batch-size", "4", "--out", str(root / "trained")]) == 0
    for fmt in ("gguf", "compressed-tensors"):
        assert main(["export", str(root / "asym4"), "--format", fmt, "--out", str(root / f"asym4-{fmt}")]) == 0
    return root


def sections(folder):
    text = (folder / "README.md").read_text()
    front, _, body = text.partition("\n---\n")
    loads = body.split("## Loads in", 1)[1].split("##", 1)[0]
    other = body.split("## Other runtimes", 1)[1].split("##", 1)[0] if "## Other runtimes" in body else ""
    return front, loads, other, body


def test_every_output_has_a_card_in_the_hub_convention(outputs):
    for name in ("asym4", "sym4", "w2", "k", "trained", "asym4-gguf", "asym4-compressed-tensors"):
        front, loads, _, body = sections(outputs / name)
        assert front.startswith("---\nlibrary_name:") and "- qatlm" in front and "pipeline_tag: text-generation" in front, name
        assert "qatlm" in body and loads.strip(), name
    assert "## Training" in sections(outputs / "trained")[3] and "E2E-QP" in sections(outputs / "trained")[3]


def test_a_card_names_only_the_runtimes_that_load_that_folder(outputs):
    _, loads, other, _ = sections(outputs / "asym4")
    assert "transformers + gptqmodel" in loads and "vLLM" not in loads  # vLLM's GPTQ kernels refuse asymmetric grids
    assert "--for vllm --out DIR-vllm` (compressed-tensors" in other and "llama.cpp" in other
    _, loads, other, _ = sections(outputs / "sym4")  # vLLM would serve this folder in bf16 (its dtype=auto): the export
    assert "vLLM" not in loads and "--for vllm" in other  # declares float16, in which the step sizes are exact
    _, loads, other, _ = sections(outputs / "w2")
    assert "vLLM" not in loads and "vLLM: none (vLLM has no kernel for 2-bit weights" in other
    _, loads, other, _ = sections(outputs / "k")
    assert "transformers" not in loads and "vLLM" not in loads and "llama.cpp" in other
    assert "llama.cpp" in sections(outputs / "asym4-gguf")[1] and "vLLM" in sections(outputs / "asym4-compressed-tensors")[1]


def test_upload_dry_run_lists_what_would_be_sent(outputs, capsys):
    assert main(["upload", str(outputs / "asym4"), "org/tiny-w4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would send" in out and "README.md" in out and "model.safetensors" in out and "config.json" in out


@pytest.mark.parametrize("folder,message", [("m", "was not written by qatlm"), ("absent", "does not exist"),
                                            ("t.txt", "is not a folder")])
def test_upload_refuses_a_foreign_or_missing_folder(outputs, capsys, folder, message):
    assert main(["upload", str(outputs / folder), "org/x", "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_upload_refuses_an_unfinished_run(outputs, tmp_path, capsys):
    work = tmp_path / "q.work"
    work.mkdir()
    assert main(["upload", str(work), "org/x", "--dry-run"]) == 2 and "unfinished run" in capsys.readouterr().err


@pytest.mark.parametrize("offline,message", [(True, "HF_HUB_OFFLINE is set"), (False, "no Hugging Face credentials")])
def test_upload_without_network_or_credentials_fails_in_one_line(outputs, monkeypatch, capsys, offline, message):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)  # (never a request from a test)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    sent = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: sent.append(a))
    assert main(["upload", str(outputs / "asym4"), "org/tiny-w4"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("qatlm: error:")]
    assert len(err) == 1 and "upload to org/tiny-w4 failed" in err[0] and message in err[0] and not sent


def test_upload_creates_the_repository_and_sends_the_folder(outputs, monkeypatch, capsys):
    """With credentials: ``create_repo`` (private when asked) then ``upload_folder`` of exactly that folder (the hub
    itself is replaced by recorders: no test reaches the network)."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo, **k: calls.append(("create", repo, k["private"])))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **k: calls.append(("upload", k["repo_id"], k["folder_path"])))
    assert main(["upload", str(outputs / "asym4"), "org/tiny-w4", "--private"]) == 0
    assert calls == [("create", "org/tiny-w4", True), ("upload", "org/tiny-w4", str(outputs / "asym4"))]
    assert "sent" in capsys.readouterr().out


def test_eval_writes_its_figures_into_the_card_when_asked(outputs, tmp_path, capsys):
    import shutil

    q = tmp_path / "q"
    shutil.copytree(outputs / "asym4", q)
    argv = ["eval", str(q), "--heldout", str(outputs / "t.txt"), "--seqlen", "32", "--ppl-windows", "4", "--tasks", "none"]
    assert main(argv) == 0 and "## Evaluation" not in (q / "README.md").read_text()  # not without --card
    assert main(argv + ["--card"]) == 0 and main(argv + ["--card"]) == 0  # twice: the second replaces the first
    card = (q / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and "held-out perplexity on `t.txt` (4 windows x 32 tokens" in card
    assert card.index("## Evaluation") < card.index("## Loads in")
