"""Recipes are lists of stages; the CLI is generated from the stage configs: every flag reaches its stage or is refused."""

import dataclasses
import json

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

import qatlm
from qatlm import BlockAPConfig, DLQATConfig, E2EQPConfig, QatlmError, QuantSpec, RTNConfig
from qatlm.cli import build_parser, main
from qatlm.options import recipe_from_args
from qatlm.options import field_default
from qatlm.recipes import RECIPES, TRAINERS


def parse(*args):
    return build_parser().parse_args(["quantize", "--out", "o", *args])


@pytest.mark.parametrize("name", list(RECIPES))
def test_cli_defaults_are_the_api_defaults(name):
    """One source of defaults: the CLI's recipe without flags equals the API's (they differed: bits 2/g64 vs 4/128)."""
    assert recipe_from_args(parse("--method", name), "quantize") == qatlm.recipe(name)


def _typed_value(f):
    """A value unlike the field's default, of the field's type, that its validation accepts."""
    d = field_default(f)
    if "choices" in f.metadata:
        return next(c for c in f.metadata["choices"] if c != d)
    if isinstance(d, bool):
        return not d
    if f.name == "calib":
        return "wikipedia-like.txt"
    if isinstance(d, float) or f.type in ("float | None", "float"):
        return 0.5 if f.name in ("min_lr_ratio",) else 3e-3
    if isinstance(d, int) or f.type in ("int | None", "int"):
        return 3
    return "x"


def test_every_block_ap_flag_reaches_the_block_ap_stage_of_every_recipe():
    """The efficientqat+dl-qat recipe dropped Block-AP's lr, batch, loss, norms, early stop, RAM budget and v1 zeros."""
    from qatlm.options import config_flags

    flags = [f for f in config_flags(BlockAPConfig) if f.path[0] != "grid"]
    for name in ("block-ap", "efficientqat", "efficientqat+dl-qat"):
        args, want = ["--method", name, "--v1-zeros", "--bits", "2", "--group-size", "64"], {}
        for fl in flags:
            v = _typed_value(fl.field)
            want[fl.path[0]] = v
            if isinstance(v, bool):
                args.append(fl.flag if v else "--no-" + fl.flag[2:])
            else:
                args += [fl.flag, str(v)]
        stage = recipe_from_args(parse(*args), "quantize")[0]
        assert isinstance(stage, BlockAPConfig)
        assert {k: getattr(stage, k) for k in want} == want, name
        assert stage.grid == QuantSpec(2, 64, zero_min=1), name


def test_end_to_end_stage_takes_its_own_flags_and_follows_the_calibration_data():
    stages = recipe_from_args(parse("--method", "efficientqat", "--calib", "c.txt", "--calib-samples", "16", "--epochs", "3",
                                     "--e2e-epochs", "2", "--e2e-lr", "1e-4", "--train-zeros"), "quantize")
    bap, e2e = stages
    assert bap.epochs == 3 and bap.calib == "c.txt"
    assert e2e == E2EQPConfig(data="c.txt", samples=16, epochs=2, lr=1e-4, train_zeros=True)
    # its own source, when given, wins
    _, e2e = recipe_from_args(parse("--method", "efficientqat", "--calib", "c.txt", "--e2e-data", "d.jsonl"), "quantize")
    assert e2e.data == "d.jsonl"


def test_dl_qat_recipe_reads_the_calibration_flags_as_its_training_data():
    """`quantize --method dl-qat --calib FILE` trained on the built-in Wikipedia text (the flag was dropped)."""
    rtn, dl = recipe_from_args(parse("--method", "dl-qat", "--calib", "mine.txt", "--calib-samples", "32", "--calib-seqlen", "128",
                                      "--epochs", "2", "--rank", "4", "--bits", "3"), "quantize")
    assert rtn == RTNConfig(3, 128, pack=False)
    assert (dl.data, dl.samples, dl.seqlen, dl.epochs, dl.rank) == ("mine.txt", 32, 128, 2, 4)


@pytest.mark.parametrize("method,flag", [("rtn", "--epochs"), ("rtn", "--e2e-lr"), ("block-ap", "--rank"), ("block-ap", "--e2e-data"),
                                         ("dl-qat", "--lr-quant"), ("efficientqat", "--lr-lora"), ("efficientqat+dl-qat", "--lm-head")])
def test_a_flag_the_recipe_does_not_take_is_refused(method, flag, capsys):
    value = [] if flag == "--lm-head" else ["1"]
    assert main(["quantize", "--method", method, "--out", "o", flag, *value]) == 2
    assert capsys.readouterr().err.strip() == f"qatlm: error: {flag} does not apply to --method {method}"


def test_train_flags_are_generated_from_the_trainer_configs():
    for name, cls in TRAINERS.items():
        a = build_parser().parse_args(["train", "--from", "x", "--out", "o", "--method", name, "--samples", "9"])
        [cfg] = recipe_from_args(a, "train")
        assert cfg == dataclasses.replace(cls(), samples=9)
    a = build_parser().parse_args(["train", "--from", "x", "--out", "o", "--method", "e2e-qp", "--lr", "1e-4", "--train-zeros"])
    assert recipe_from_args(a, "train") == [E2EQPConfig(lr=1e-4, train_zeros=True)]
    a = build_parser().parse_args(["train", "--from", "x", "--out", "o", "--method", "e2e-qp", "--rank", "8"])
    with pytest.raises(QatlmError, match="--rank does not apply to --method e2e-qp"):
        recipe_from_args(a, "train")


def test_every_field_has_help_and_every_flag_is_documented():
    from qatlm.options import config_flags

    for cls in (RTNConfig, BlockAPConfig, E2EQPConfig, DLQATConfig, QuantSpec):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    text = build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()
    for cls in (RTNConfig, BlockAPConfig):
        for fl in config_flags(cls):
            assert fl.flag in text


def test_api_runs_a_list_of_stages_and_refuses_a_trainer_on_a_float_model(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"the cat sat on the mat number {i}" for i in range(400)))
    with pytest.raises(QatlmError, match="trains a quantized model"):
        qatlm.quantize(tiny_model("llama"), E2EQPConfig(data=str(text)), tokenizer=tiny_tokenizer())
    model = tiny_model("llama")
    stages = [RTNConfig(2, 32), E2EQPConfig(data=str(text), samples=8, seqlen=32, val_samples=2, batch_size=4, lr=1e-3)]
    s = qatlm.quantize(model, stages, tokenizer=tiny_tokenizer(), progress=False, cache_dir=tmp_path / "c")
    assert s.method == "rtn+e2e-qp" and s.stages == ["rtn", "e2e-qp"] and s.e2e_qp.steps == 2
    assert s.rtn.layers == 14


def test_dl_qat_from_the_cli_trains_on_the_given_file_and_on_the_given_device(tmp_path, monkeypatch):
    """Both end to end: the calibration file is DL-QAT's data (an empty asset cache: the built-in text cannot be
    read without the network, so training on it would fail), and the stage runs on --device (was ignored)."""
    fp = tmp_path / "fp"
    tiny_model("llama").save_pretrained(fp)
    tiny_tokenizer().save_pretrained(fp)
    text = tmp_path / "mine.txt"
    text.write_text(" ".join(f"the cat sat on the mat number {i}" for i in range(400)))
    import qatlm.train.end_to_end as train

    seen = {}
    real = train.train_end_to_end

    def spy(*a, **kw):
        seen["device"] = kw.get("device")
        return real(*a, **kw)

    monkeypatch.setattr(train, "train_end_to_end", spy)
    monkeypatch.setenv("QATLM_CACHE", str(tmp_path / "empty-cache"))
    code = main(["quantize", "--model", str(fp), "--method", "dl-qat", "--bits", "3", "--group-size", "32", "--calib", str(text),
                 "--calib-samples", "8", "--calib-seqlen", "32", "--val-samples", "2", "--batch-size", "4", "--rank", "2",
                 "--device", "cpu", "--out", str(tmp_path / "o")])
    assert code == 0
    assert seen["device"] == "cpu"
    s = json.loads((tmp_path / "o" / "training_summary.json").read_text())
    assert s["method"] == "dl-qat" and s["stages"] == ["rtn", "dl-qat"] and s["dl_qat"]["steps"] == 2
    assert s["dl_qat"]["config"]["data"] == "mine.txt"  # the file's name (shared artefacts carry no local paths)
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("*.txt"))


def test_positional_and_keyword_grids_are_the_same_config():
    assert RTNConfig(4, 32) == RTNConfig(bits=4, group_size=32) == RTNConfig(grid=QuantSpec(4, 32))
    assert BlockAPConfig(2, 64, v1_zeros=True, epochs=1).grid == QuantSpec(2, 64, zero_min=1)
    assert BlockAPConfig(bits=3).spec.tag == "w3g128" and BlockAPConfig(bits=3).bits == 3
    with pytest.raises(QatlmError, match="bits=5"):
        RTNConfig(bits=5)
    torch.manual_seed(0)


@pytest.mark.parametrize("argv,flag", [(["train", "--from", "x", "--out", "o", "--method", "dl-qat", "--lr", "1e-4"], "--lr"),
                                       (["train", "--from", "x", "--out", "o", "--method", "dl-qat", "--train-zeros"], "--train-zeros"),
                                       (["quantize", "--out", "o", "--method", "dl-qat", "--e2e-lr", "1e-4"], "--e2e-lr"),
                                       (["quantize", "--out", "o", "--method", "efficientqat+dl-qat", "--train-zeros"], "--train-zeros")])
def test_dl_qat_refuses_the_e2e_qp_fields_it_does_not_read(argv, flag, capsys):
    """DL-QAT has its own rates (--lr-lora, --lr-magnitude) and trains no zero points: E2E-QP's --lr and --train-zeros
    were accepted and ignored; now they are refused in one line, and its config has no such fields."""
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"qatlm: error: {flag} does not apply to --method {argv[argv.index('--method') + 1]}"
    assert not {"lr", "train_zeros"} & {f.name for f in dataclasses.fields(DLQATConfig)}
    with pytest.raises(QatlmError, match="DLQATConfig has no field 'lr'"):
        qatlm.recipe("dl-qat", dl_qat={"lr": 1e-4})
