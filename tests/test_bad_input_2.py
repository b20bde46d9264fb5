"""The bad-input catalogue, round 2: hand-edited or corrupt checkpoints and configs, non-regular files, outputs that
cannot be written, absurd numbers, broken caches and devices. Each case ends with exit code 2 and exactly one
``qatlm: error:`` line naming the problem, no traceback, nothing left behind, the sources untouched."""

import json
import os

import pytest
from safetensors.torch import load_file, save_file
from tiny import check_one_clear_line, tiny_model, tiny_tokenizer

from qatlm import RTNConfig, quantize, save_quantized
from qatlm.cli import main


def _packed(d, bits=4, group=32):
    model = tiny_model("llama")
    quantize(model, RTNConfig(bits, group))
    save_quantized(model, d, RTNConfig(bits, group).spec, tokenizer=tiny_tokenizer())
    return d


def _edit_json(path, edit):
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources2")
    good = root / "model"
    tiny_model("llama").save_pretrained(good)
    tiny_tokenizer().save_pretrained(good)
    (root / "text.txt").write_text(" ".join(f"the cat sat on the mat number {i}" for i in range(400)))
    (root / "a-file").write_text("I am a file")
    os.mkfifo(root / "fifo")

    def model_variant(name, edit):
        d = root / name
        tiny_model("llama").save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
        edit(d)

    def weights_folder(d):
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").mkdir()

    def symlink_loop(d):
        (d / "model.safetensors").unlink()
        os.symlink(d / "loop.safetensors", d / "model.safetensors")
        os.symlink(d / "model.safetensors", d / "loop.safetensors")

    def missing_shard(d):
        sd = load_file(d / "model.safetensors")
        names = sorted(sd)
        save_file({k: sd[k] for k in names[: len(names) // 2]}, d / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
        (d / "model.safetensors").unlink()
        index = {"metadata": {}, "weight_map": {k: ("model-00001-of-00002.safetensors" if i < len(names) // 2
                                                    else "model-00002-of-00002.safetensors") for i, k in enumerate(names)}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))

    model_variant("weights-folder", weights_folder)
    model_variant("symlink-loop", symlink_loop)
    model_variant("missing-shard", missing_shard)
    model_variant("config-empty", lambda d: (d / "config.json").write_text(""))
    model_variant("config-list", lambda d: (d / "config.json").write_text("[1, 2]"))
    model_variant("config-garbage", lambda d: (d / "config.json").write_text("{model_type: llama"))
    model_variant("duplicate-weights", lambda d: (d / "backup.safetensors").write_bytes((d / "model.safetensors").read_bytes()))

    packed = _packed(root / "packed")
    for name, edit in (("bits-edited", lambda q: q.update(bits=2)), ("group-edited", lambda q: q.update(group_size=64)),
                       ("bits-five", lambda q: q.update(bits=5)), ("bits-text", lambda q: q.update(bits="four")),
                       ("group-zero", lambda q: q.update(group_size=0))):
        d = _packed(root / name)
        _edit_json(d / "config.json", lambda c, edit=edit: edit(c["quantization_config"]))
    d = _packed(root / "float-qweight")
    sd = load_file(d / "model.safetensors")
    key = next(k for k in sd if k.endswith(".qweight"))
    sd[key] = sd[key].float()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    d = _packed(root / "packed-folder-weights")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()
    d = _packed(root / "bad-summary")
    (d / "training_summary.json").write_text("{ not json")
    d = _packed(root / "list-summary")
    (d / "training_summary.json").write_text("[]")
    (root / "corrupt.gguf").write_bytes(b"GGUF" + b"\x00garbage" * 20)
    (root / "bom.jsonl").write_bytes("\ufeff".encode() + b'{"text": "the cat sat on the mat"}\n' * 200)
    assert packed.exists()
    return root


Q = ["quantize", "--model", "{src}/model", "--out", "{tmp}/out"]
BAP = Q + ["--method", "block-ap", "--calib", "{src}/text.txt", "--calib-samples", "4", "--calib-seqlen", "16", "--val-samples", "1"]
EQ = BAP[:6] + ["efficientqat"] + BAP[7:]
DLQ = BAP[:6] + ["dl-qat"] + BAP[7:]
T = ["train", "--from", "{src}/packed", "--data", "{src}/text.txt", "--samples", "4", "--seqlen", "16", "--val-samples", "1",
     "--out", "{tmp}/out"]
E = ["eval", "{src}/packed", "--tasks", "none", "--ppl-windows", "1", "--heldout", "{src}/text.txt", "--seqlen", "16"]
G = ["generate", "{src}/packed", "--prompt", "the cat", "--max-new-tokens", "2"]


def model_cases(name, message):
    """The same broken float model through every command that reads one."""
    return [(["quantize", "--model", f"{{src}}/{name}", "--out", "{tmp}/out"], message),
            (["eval", f"{{src}}/{name}", "--tasks", "none", "--heldout", "{src}/text.txt", "--seqlen", "16", "--ppl-windows", "1"], message),
            (["export", f"{{src}}/{name}", "--format", "gguf", "--out", "{tmp}/out"], message)]


def packed_cases(name, message):
    """The same broken checkpoint through every command that reads one."""
    return [(["info", f"{{src}}/{name}"], message), (["eval", f"{{src}}/{name}"] + E[2:], message),
            (["export", f"{{src}}/{name}", "--format", "gptq", "--out", "{tmp}/out"], message),
            (["train", "--from", f"{{src}}/{name}"] + T[3:], message), (["generate", f"{{src}}/{name}"] + G[2:], message)]


CASES = [
    *model_cases("weights-folder", "model.safetensors is not a file"),
    *model_cases("symlink-loop", "model.safetensors is a symbolic-link loop"),
    *model_cases("missing-shard", "model-00002-of-00002.safetensors, named by its index, is missing"),
    *model_cases("config-empty", "config.json is empty"),
    *model_cases("config-list", "config.json does not hold a JSON object"),
    *model_cases("config-garbage", "config.json is not valid JSON"),
    *model_cases("duplicate-weights", "backup.safetensors"),
    *packed_cases("bits-edited", "does not match its tensors"),
    *packed_cases("group-edited", "does not match its tensors"),
    *packed_cases("bits-five", "bits=5"),
    *packed_cases("bits-text", "quantization_config"),
    *packed_cases("group-zero", "group size 0"),
    *packed_cases("float-qweight", "qweight is stored as F32"),
    *packed_cases("packed-folder-weights", "model.safetensors is not a file"),
    (["info", "{src}/bad-summary"], "training_summary.json is not valid JSON"),
    (["info", "{src}/list-summary"], "training_summary.json does not hold a run summary"),
    (["eval", "{src}/corrupt.gguf", "--tasks", "none"], "corrupt.gguf is not a readable GGUF file"),
    # files that are not regular files: refused at once, never read (a FIFO would block forever)
    (BAP[:7] + ["--calib", "{src}/fifo"] + BAP[9:], "fifo is not a regular file"),
    (E[:6] + ["--heldout", "{src}/fifo"] + E[8:], "fifo is not a regular file"),
    (T[:4] + ["{src}/fifo"] + T[5:], "fifo is not a regular file"),
    (["quantize", "--model", "{src}/a-file", "--out", "{tmp}/out"], "is not a Hugging Face model folder"),
    # outputs that cannot be written: refused before the work
    (Q[:4] + ["/proc/qatlm-out"], "cannot create output folder /proc/qatlm-out"),
    (E + ["--out", "/proc/qatlm-report"], "cannot create"),
    (["compare", "{src}/packed"] + E[2:] + ["--out", "{src}/a-file"], "is a file"),
    (["export", "{src}/packed", "--format", "gptq", "--out", "/proc/qatlm-out"], "cannot create"),
    # absurd numbers
    (Q + ["--group-size", "1073741824"], "group size 1073741824 is larger than"),
    (BAP + ["--seed", str(2**70)], "--seed must be <="),
    (BAP + ["--seed", "-1"], "--seed must be >= 0"),
    (T + ["--lr", "1e308"], "--lr must be <= 10"),
    (BAP + ["--lr-quant", "1e308"], "--lr-quant must be <= 10"),
    (BAP + ["--lr-weight", "50"], "--lr-weight must be <= 10"),
    (DLQ + ["--lr-lora", "1e9"], "--lr-lora must be <= 10"),
    (BAP + ["--calib-seqlen", "100000"], "--calib-seqlen 100000 is above the model's limit of 256 positions"),
    (BAP + ["--chain-batch", "0"], "--chain-batch must be >= 1"),
    (BAP + ["--ram-budget-gb", "1e308"], "--ram-budget-gb must be <= 1048576"),
    (Q[:4] + [""], "the output folder name is empty"),
    (Q[:4] + [" ", "--overwrite"], "the output folder name is empty"),
    (["export", "{src}/packed", "--format", "gptq", "--out", ""], "name is empty"),
    (E + ["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (G[:4] + ["--max-new-tokens", "-5"], "--max-new-tokens must be at least 1"),
    (["quantize", "--model", "{src}/model", "--method", "dl-qat", "--rank", "100000", "--calib", "{src}/text.txt", "--calib-samples",
      "4", "--calib-seqlen", "16", "--val-samples", "1", "--out", "{tmp}/out"], "--rank 100000 is larger than"),
    # the flag the user typed is the one an error names
    (EQ + ["--e2e-lr=-1"], "--e2e-lr must be > 0"),
    (EQ + ["--e2e-samples", "0"], "--e2e-samples must be >= 1"),
    (EQ + ["--e2e-seqlen", "1"], "--e2e-seqlen must be >= 2"),
    (EQ + ["--e2e-batch-size", "0"], "--e2e-batch-size must be >= 1"),
    # devices, prompts, caches
    (Q + ["--device", ""], "--device '': unknown device"),
    (Q + ["--device", "cuda:abc"], "--device cuda:abc: unknown device"),
    (E + ["--device", " "], "unknown device"),
    (["generate", "{src}/packed", "--prompt", ""], "--prompt is empty"),
    (["generate", "{src}/packed", "--prompt", "   "], "--prompt is empty"),
    (Q[:3] + ["--method", "block-ap", "--calib-seqlen", "16", "--out", "{tmp}/out", "--cache-dir", "{src}/a-file/cache"], "cache folder"),
    (["assets", "--list", "--cache-dir", "{src}/a-file"], "cache folder"),
    (["export", "{src}/packed", "--format", "gguf", "--float-type", "f8", "--out", "{tmp}/out"], "--float-type must be f16 or f32"),
]


def test_the_catalogue_grows_by_at_least_60_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("argv,message", CASES, ids=[f"{i:02d}-{c[0][0]}-{c[1][:30]}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_clear_line(argv, message, src, tmp_path, capsys, monkeypatch):
    check_one_clear_line(argv, message, src, tmp_path, capsys, monkeypatch)


def test_a_jsonl_with_a_utf8_bom_is_read(src, tmp_path, capsys):
    """Valid input accepted: many editors write a byte-order mark at the start of a UTF-8 file."""
    code = main(["quantize", "--model", str(src / "model"), "--method", "block-ap", "--calib", str(src / "bom.jsonl"),
                 "--calib-samples", "4", "--calib-seqlen", "16", "--val-samples", "1", "--epochs", "1", "--out", str(tmp_path / "q")])
    assert code == 0, capsys.readouterr().err
