"""Text named as a Hugging Face dataset (``NAME:CONFIG:SPLIT[:FIELD]``), resolved by ``datasets.load_dataset`` with
streaming, here on a local dataset folder (the same resolving call as a hub id, offline), and the papers' presets."""

import json

import pytest
from tiny import tiny_model, tiny_tokenizer

from qatlm.cli import main
from qatlm.data import hub


@pytest.fixture()
def ds(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("QATLM_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "mydata"
    (d / "data").mkdir(parents=True)
    for split, word in (("train", "cat"), ("test", "dog")):
        rows = [{"body": f"the {word} sat on the mat number {i} and looked at the door", "id": str(i)} for i in range(300)]
        (d / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = tmp_path / "m"
    tiny_model("llama").save_pretrained(m)
    tiny_tokenizer().save_pretrained(m)
    return d, m


def test_a_split_and_field_are_read_by_name(ds):
    d, _ = ds
    text = open(hub.dataset_text_file(f"{d}::test:body")).read()
    assert "the dog sat" in text and "cat" not in text  # the test split, its body field
    assert "the cat sat" in open(hub.dataset_text_file(f"{d}::train:body")).read()


def test_block_ap_calibrates_and_eval_reads_held_out_text_by_dataset_name(ds, tmp_path, capsys):
    d, m = ds
    code = main(["quantize", "--model", str(m), "--method", "block-ap", "--bits", "4", "--group-size", "32", "--calib",
                 f"{d}::train:body", "--calib-samples", "4", "--calib-seqlen", "32", "--val-samples", "1", "--epochs", "1",
                 "--out", str(tmp_path / "q")])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "q"), "--heldout", f"{d}::test:body", "--seqlen", "32", "--ppl-windows", "4",
                 "--tasks", "none"]) == 0
    out = capsys.readouterr().out
    row = json.loads(out[out.index("{"):])
    assert 1 < row["heldout_ppl"] < 1e6 and "test" in row["heldout"]


@pytest.mark.parametrize("source,message", [
    ("{d}::nosuch:body", "has no split 'nosuch'"),
    ("{d}::test:nofield", "has no field 'nofield'"),
    ("{d}::test", "which field holds the text"),
    ("org/absent-dataset:en:test", "dataset org/absent-dataset could not be loaded"),
    ("a:b:c:d:e", "write it NAME[:CONFIG[:SPLIT[:FIELD]]]"),
])
def test_dataset_errors_are_one_line(ds, tmp_path, capsys, source, message):
    d, m = ds
    code = main(["quantize", "--model", str(m), "--method", "block-ap", "--calib", source.format(d=d), "--calib-samples", "4",
                 "--calib-seqlen", "32", "--val-samples", "1", "--out", str(tmp_path / "q")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("qatlm: error:")]
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.work").exists()


def test_the_papers_presets_name_their_split_and_context_length():
    assert hub.parse("wikitext2") == ("wikitext", "wikitext-2-raw-v1", "test", "text")
    assert hub.parse("c4") == ("allenai/c4", "en", "validation", "text")
    assert hub.parse("wikitext2-train")[2] == "train" and hub.context_length("c4") == 2048
    assert hub.parse("org/name:cfg") == ("org/name", "cfg", "train", None)
    assert hub.context_length("shakespeare") is None
