"""The bad-input catalogue: every command, every option a careless user gets wrong, every broken file.

Each case must end with exit code 2 and exactly one ``qatlm: error:`` line naming the option or the file,
no traceback, no output or work folder left behind, and the sources untouched (hash before and after)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny import check_one_clear_line, tiny_model, tiny_tokenizer

from qatlm import RTNConfig, quantize, save_quantized



@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Read-only sources: a good model, a packed checkpoint, texts, and broken variants of each."""
    root = tmp_path_factory.mktemp("sources")
    good = root / "model"
    tiny_model("llama").save_pretrained(good)
    tiny_tokenizer().save_pretrained(good)
    model = tiny_model("llama")
    quantize(model, RTNConfig(4, 32))
    save_quantized(model, root / "packed", RTNConfig(4, 32).spec, tokenizer=tiny_tokenizer())
    (root / "text.txt").write_text(" ".join(f"the cat sat on the mat number {i}" for i in range(400)))
    (root / "empty.txt").write_text("   \n")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02binary\x00" * 50)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 50)
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    (root / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (root / "corrupt.parquet").write_bytes(b"PAR1 this is not really a parquet file PAR1")
    (root / "a-file").write_text("I am a file")
    no_config = root / "no-config"
    no_config.mkdir()

    def variant(name, edit):
        d = root / name
        tiny_model("llama").save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
        edit(d)
        return d

    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])

    def corrupt_header(d):
        f = d / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[:8] + b"{not json" + data[17:])

    def drop_tensor(d):
        from safetensors.torch import load_file

        sd = load_file(d / "model.safetensors")
        sd.pop("model.layers.1.mlp.up_proj.weight")
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})

    def wrong_shape(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] = 96
        (d / "config.json").write_text(json.dumps(cfg))

    def nan_weight(d):
        from safetensors.torch import load_file

        sd = load_file(d / "model.safetensors")
        sd["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})

    def pickled_only(d):
        from safetensors.torch import load_file

        torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()

    def encoder_only(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = ["BertForMaskedLM"]
        (d / "config.json").write_text(json.dumps(cfg))

    def broken_tokenizer(d):
        (d / "tokenizer.json").write_text("{ this is not a tokenizer")

    variant("truncated", truncate)
    variant("corrupt-header", corrupt_header)
    variant("missing-tensor", drop_tensor)
    variant("wrong-shape", wrong_shape)
    variant("nan", nan_weight)
    variant("pickled", pickled_only)
    variant("encoder", encoder_only)
    variant("bad-tokenizer", broken_tokenizer)
    empty = variant("empty-weights", lambda d: (d / "model.safetensors").write_bytes(b""))
    assert empty.exists()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a parquet document about a cat"] * 40}), root / "good.parquet")
    return root


Q = ["quantize", "--model", "{src}/model", "--out", "{tmp}/out"]
BAP = Q + ["--method", "block-ap", "--calib", "{src}/text.txt", "--calib-samples", "4", "--calib-seqlen", "16", "--val-samples", "1"]
DLQ = Q + ["--method", "dl-qat", "--calib", "{src}/text.txt", "--calib-samples", "4", "--calib-seqlen", "16", "--val-samples", "1"]
T = ["train", "--from", "{src}/packed", "--data", "{src}/text.txt", "--samples", "4", "--seqlen", "16", "--val-samples", "1",
     "--out", "{tmp}/out"]
E = ["eval", "{src}/packed", "--tasks", "none", "--ppl-windows", "1", "--heldout", "{src}/text.txt", "--seqlen", "16"]
X = ["export", "{src}/packed", "--format", "gptq", "--out", "{tmp}/out"]

CASES = [
    # quantize: model folder
    (["quantize", "--model", "{src}/nope", "--out", "{tmp}/out"], "does not exist"),
    (["quantize", "--model", "{src}/no-config", "--out", "{tmp}/out"], "not a Hugging Face model folder"),
    (["quantize", "--model", "{src}/truncated", "--out", "{tmp}/out"], "model.safetensors is truncated"),
    (["quantize", "--model", "{src}/corrupt-header", "--out", "{tmp}/out"], "model.safetensors is not a valid safetensors file"),
    (["quantize", "--model", "{src}/empty-weights", "--out", "{tmp}/out"], "model.safetensors is not a valid safetensors file (empty)"),
    (["quantize", "--model", "{src}/missing-tensor", "--out", "{tmp}/out"], "lacks 1 weight(s)"),
    (["quantize", "--model", "{src}/wrong-shape", "--out", "{tmp}/out"], "shapes in its safetensors do not match its config.json"),
    (["quantize", "--model", "{src}/nan", "--out", "{tmp}/out"], "NaN/inf"),
    (["quantize", "--model", "{src}/pickled", "--out", "{tmp}/out"], "no .safetensors weights"),
    (["quantize", "--model", "{src}/encoder", "--out", "{tmp}/out"], "not a causal language model"),
    (["quantize", "--model", "{src}/bad-tokenizer", "--out", "{tmp}/out"], "tokenizer in"),
    # quantize: grid and method
    (Q + ["--bits", "5"], "bits=5 is not supported"),
    (Q + ["--bits", "1"], "bits=1 is not supported"),
    (Q + ["--group-size", "100"], "group size 100 is invalid"),
    (Q + ["--group-size", "0"], "group size 0 is invalid"),
    (Q + ["--group-size", "-8"], "group size -8 is invalid"),
    (Q + ["--method", "magic"], "unknown method 'magic'"),
    (Q + ["--epochs", "3"], "--epochs does not apply to --method rtn"),
    (Q + ["--lr-weight", "1e-3"], "--lr-weight does not apply to --method rtn"),
    (DLQ + ["--lr-quant", "1e-3"], "--lr-quant does not apply to --method dl-qat"),
    # quantize: output folder
    (["quantize", "--model", "{src}/model", "--out", "{src}/model", "--overwrite"], "is the input"),
    (["quantize", "--model", "{src}/model", "--out", "{src}", "--overwrite"], "contains the input"),
    (["quantize", "--model", "{src}/model", "--out", "{src}/model/q"], "lies inside the input"),
    (["quantize", "--model", "{src}/model", "--out", "{src}/packed"], "already exists"),
    (["quantize", "--model", "{src}/model", "--out", "{src}/a-file", "--overwrite"], "is a file"),
    (["quantize", "--model", "{src}/model", "--out", "{src}/a-file/q"], "is not a folder"),
    (BAP + ["--calib", "{src}/text.txt", "--out", "{src}/text.txt", "--overwrite"], "is the input"),
    # quantize: devices
    (Q + ["--device", "cuda"], "--device cuda"),
    (Q + ["--device", "tpu9"], "--device tpu9"),
    # block-ap numbers
    (BAP + ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (BAP + ["--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
    (BAP + ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (BAP + ["--calib-samples", "0"], "--calib-samples must be >= 1"),
    (BAP + ["--calib-seqlen", "1"], "--calib-seqlen must be >= 2"),
    (BAP + ["--val-samples", "-1"], "--val-samples must be >= 0"),
    (BAP + ["--lr-quant=-1e-3"], "--lr-quant must be > 0"),
    (BAP + ["--lr-weight", "0"], "--lr-weight must be > 0"),
    (BAP + ["--lr-weight", "nan"], "--lr-weight must be a finite number"),
    (BAP + ["--block-clip-grad", "-1"], "--block-clip-grad must be >= 0"),
    (BAP + ["--ram-budget-gb", "-1"], "--ram-budget-gb must be >= 0"),
    # block-ap calibration files
    (BAP + ["--calib", "{src}/none.txt"], "none.txt does not exist"),
    (BAP + ["--calib", "{src}/binary.txt"], "binary.txt looks binary"),
    (BAP + ["--calib", "{src}/latin1.txt"], "latin1.txt is not UTF-8 text"),
    (BAP + ["--calib", "{src}/bad.jsonl"], "bad.jsonl:2: not a JSON record"),
    (BAP + ["--calib", "{src}/notext.jsonl"], "notext.jsonl:1:"),
    (BAP + ["--calib", "{src}/corrupt.parquet"], "corrupt.parquet: not a readable parquet file"),
    (BAP + ["--calib", "{src}/empty.txt"], "empty.txt is empty"),
    (BAP + ["--calib-samples", "100000"], "asked for 100000"),
    # dl-qat numbers
    (DLQ + ["--rank", "0"], "--rank must be >= 1"),
    (DLQ + ["--lr-lora", "-1"], "--lr-lora must be > 0"),
    (DLQ + ["--lr-magnitude", "0"], "--lr-magnitude must be > 0"),
    # train
    (["train", "--from", "{src}/nope", "--out", "{tmp}/out"], "nope does not exist"),
    (["train", "--from", "{src}/model", "--out", "{tmp}/out"], "is not a qatlm/GPTQ checkpoint"),
    (T + ["--method", "magic"], "unknown training method 'magic'"),
    (T + ["--rank", "8"], "--rank does not apply to --method e2e-qp"),
    (T + ["--lr-lora", "1e-3"], "--lr-lora does not apply to --method e2e-qp"),
    (T + ["--batch-size", "0"], "--batch-size must be >= 1"),
    (T + ["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (T + ["--seqlen", "1"], "--seqlen must be >= 2"),
    (T + ["--epochs", "0"], "--epochs must be >= 1"),
    (T + ["--samples", "0"], "--samples must be >= 1"),
    (T + ["--lr=-1e-4"], "--lr must be > 0"),
    (T + ["--warmup-ratio", "5"], "--warmup-ratio must be < 1"),
    (T + ["--clip-grad", "-1"], "--clip-grad must be >= 0"),
    (T + ["--val-every", "-1"], "--val-every must be >= 0"),
    (T + ["--save-every", "-1"], "--save-every must be >= 0"),
    (T + ["--save-minutes", "-1"], "--save-minutes must be >= 0"),
    (T + ["--method", "dl-qat", "--rank", "-1"], "--rank must be >= 1"),
    (T + ["--seqlen", "100000"], "above the model's limit of 256 positions"),
    (T + ["--data", "{src}/bad.jsonl"], "bad.jsonl:2"),
    (T + ["--data", "{src}/latin1.txt"], "latin1.txt is not UTF-8 text"),
    (T + ["--out", "{src}/packed", "--overwrite"], "is the input"),
    (T + ["--device", "cuda"], "--device cuda"),
    # eval / compare
    (E + ["--limit", "-1"], "--limit must be >= 0"),
    (E + ["--seqlen", "1"], "--seqlen must be >= 2"),
    (E + ["--ppl-windows", "-1"], "--ppl-windows must be >= 0"),
    (E + ["--seqlen", "4096"], "--seqlen 4096 is above the model's limit of 256 positions"),
    (E + ["--tasks", "piqa,nonsense"], "unknown zero-shot task 'nonsense'"),
    (["eval", "{src}/nope", "--tasks", "none"], "nope does not exist"),
    (["eval", "{src}/truncated", "--tasks", "none"], "model.safetensors is truncated"),
    # export / generate / info
    (X[:3] + ["magic"] + X[4:], "unknown export format 'magic'"),
    (["export", "{src}/nope", "--format", "gptq", "--out", "{tmp}/out"], "nope does not exist"),
    (["export", "{src}/packed", "--format", "gptq", "--out", "{src}/packed", "--overwrite"], "is the input"),
    (["export", "{src}/packed", "--format", "gptq", "--out", "{src}/model"], "already exists"),
    (["generate", "{src}/packed", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["info", "{src}/nope"], "nope does not exist"),
]


def test_the_catalogue_is_large():
    assert len(CASES) >= 60


@pytest.mark.parametrize("argv,message", CASES, ids=[f"{i:02d}-{c[1][:40]}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_clear_line(argv, message, src, tmp_path, capsys, monkeypatch):
    check_one_clear_line(argv, message, src, tmp_path, capsys, monkeypatch)
