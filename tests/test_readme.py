"""Every `qatlm` command shown in the README and in docs/ runs as written, in their order, on a tiny model, and so
does every Python block of the README.

The built-in assets (model, texts, zero-shot items), the hub model the quickstart names and the papers' dataset
presets are replaced by tiny local stand-ins (a Hugging Face cache laid out as the hub lays it out, read with
HF_HUB_OFFLINE=1) so that nothing is fetched; the placeholders (PATH, DIR, ...) become folders of this test. Nothing
else in a command changes: its flags, budgets and defaults are the documentation's.
"""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from test_zeroshot import FIXTURES, write_stream
from tiny import tiny_model, tiny_tokenizer

from qatlm.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# the pages in the order a reader meets them (a later page's commands use what an earlier one wrote)
DOCS = [ROOT / "docs" / f"{name}.md" for name in ("command-line", "block-ap", "e2e-qp", "dl-qat", "mixed", "memory", "exports", "serving", "results",
                                                 "reliability", "how-it-works", "limitations", "architecture")]
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PLACEHOLDERS = {"PATH", "FP_DIR", "DIR", "DIR1", "DIR2", "DIR-gptq", "DIR-v1", "DIR-gguf", "DIR-ct", "CHECKPOINT"}


def test_every_doc_page_is_in_the_reading_order():
    assert sorted(DOCS) == sorted((ROOT / "docs").glob("*.md"))


def readme_commands() -> list[str]:
    """`qatlm ...` and `torchrun ... -m qatlm.cli ...` lines of the bash blocks of the README and docs/, comments removed."""
    out, in_bash = [], False
    for line in (l for page in [README, *DOCS] for l in page.read_text().splitlines()):
        if line.startswith("```"):
            in_bash = line.strip() in ("```bash", "```sh")
            continue
        if in_bash:
            code = line.strip()  # comments are dropped by to_argv
            if code.startswith("qatlm ") or (code.startswith("torchrun ") and "qatlm.cli" in code):
                out.append(code)
    return out


def to_argv(cmd: str) -> list[str] | None:
    """The argv of a README command; None for an elision (`qatlm quantize ... --resume`)."""
    cmd = re.sub(r"\s\[[^\]]*\]", "", cmd)  # optional parts: [--kernel cache|int4|plain]
    if re.search(r"(^|\s)\.\.\.(\s|$)", cmd.split(" #")[0]):  # a bare ... elides a command; a quoted "..." is a prompt
        return None
    words = shlex.split(cmd, comments=True)
    if words[0] == "torchrun":
        words = words[words.index("qatlm.cli") + 1 :]
    else:
        words = words[1:]
    return words


def test_readme_has_the_commands_this_test_runs():
    cmds = readme_commands()
    verbs = {to_argv(c)[0] for c in cmds if to_argv(c)}
    assert {"quantize", "train", "info", "eval", "compare", "export", "generate", "assets", "install"} <= verbs, verbs
    assert len(cmds) >= 20


def test_every_readme_command_parses():
    parser = build_parser()
    for cmd in readme_commands():
        argv = to_argv(cmd)
        if argv:
            parser.parse_args(argv)  # an unknown or missing argument exits here (README's `eval --limit 100` bug)


@pytest.fixture()
def stand_ins(tmp_path, monkeypatch):
    """Built-in model, texts, instruction set and zero-shot files replaced by tiny local ones."""
    from qatlm.data import assets

    model = tmp_path / "builtin-model"
    tiny_model("llama", max_position_embeddings=4096).save_pretrained(model)
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tok.save_pretrained(model)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the cat sat on the mat number {i} and a man is sitting on a roof" for i in range(12000)))
    sciq = tmp_path / "sciq.jsonl"
    sciq.write_text("".join(json.dumps({"instruction": f"what sat on mat {i}?", "output": "the cat"}) + "\n" for i in range(80)))
    zs = {t: write_stream(rows, tmp_path / f"{t}.arrow") for t, rows in FIXTURES.items()}
    monkeypatch.setattr(assets, "fetch_all", lambda cache_dir=None: None)
    monkeypatch.setattr(assets, "default_model_dir", lambda cache_dir=None: model)
    monkeypatch.setattr(assets, "zeroshot_file", lambda task, cache_dir=None: zs[task])
    for name in list(assets.BUILTIN_TEXT):
        monkeypatch.setitem(assets.BUILTIN_TEXT, name, lambda cache_dir=None: text)
    monkeypatch.setitem(assets.BUILTIN_INSTRUCT, "sciq-instruct", lambda cache_dir=None: sciq)
    monkeypatch.setenv("QATLM_CACHE", str(tmp_path / "cache"))
    from qatlm.data import hub

    monkeypatch.setattr(hub, "dataset_text_file", lambda source, cache_dir=None: text)  # wikitext2, c4: no download
    snapshot = tmp_path / "hf" / f"models--{HUB_MODEL.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(model, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    (work / "alpaca.jsonl").write_text(sciq.read_text())
    tiny_model("llama", seed=1, max_position_embeddings=4096).save_pretrained(work / "PATH")
    tok.save_pretrained(work / "PATH")
    monkeypatch.chdir(work)
    return work


def test_every_readme_command_runs_as_written(stand_ins, capsys):
    work = stand_ins
    ran = []
    for cmd in readme_commands():
        argv = to_argv(cmd)
        if argv is None or argv[0] == "demo":  # the demo has its own test (test_demo.py)
            continue
        argv = ["PATH" if w == "FP_DIR" else w for w in argv]
        out = argv[argv.index("--out") + 1].rstrip("/") if "--out" in argv else None
        for w in argv[1:]:  # a placeholder input that no earlier line wrote: a copy of the last checkpoint
            if w in PLACEHOLDERS and w != out and not (work / w).exists():
                shutil.copytree(work / "DIR", work / w)
        if out and (work / out).exists():  # each README line is its own example: it writes a fresh output
            shutil.rmtree(work / out)
        if argv[0] == "install":
            argv.append("--dry-run")  # installing packages is not this test's business; the command line is
        code = main(argv)
        err = capsys.readouterr().err
        assert "fatal:" not in err and "Failed to load" not in err  # no third-party noise
        if argv[:3] == ["export", "DIR", "--format"] and argv[3] == "gptq-v1" and code == 2:
            assert "--v1-zeros" in err  # the README says so: needs zero points >= 1
        else:
            assert code == 0, f"README command failed: {cmd}\n{err[-2000:]}"
        ran.append(argv[0])
    assert ran.count("quantize") >= 5 and ran.count("train") >= 3 and ran.count("export") >= 7, ran


def test_every_readme_python_block_runs_as_written(stand_ins, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - the README's own code
    assert (stand_ins / "smollm2-w2" / "training_summary.json").is_file()


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    head = "\n".join(lines[:12])  # the two commands come first
    assert "pip install torch==2.13.0 -e . && qatlm demo" in head and "python -m pytest -q" in head
    for page in DOCS:  # every page the README's documentation list names exists, and is named
        assert f"docs/{page.name}" in README.read_text() or page.name == "architecture.md" and "docs/architecture.md" in README.read_text()


def test_the_manual_speaks_of_the_project_not_of_how_it_was_built():
    for page in [README, *DOCS]:
        words = re.findall(r"\b(sessions?|issues?|this stop)\b", page.read_text(), flags=re.I)
        assert not words, (page.name, words)


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The rows of the first markdown table whose header starts with ``first_cell``, as lists of cells."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_cell} |"))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip().strip("*") for c in ln.strip("|").split("|")])
    return rows


def test_the_readme_demo_table_is_the_demo_report():
    """The README's demo table shows what `docs/demo/report.md` (the demo's own report, from the same run) says: per
    row, the size, the held-out perplexity and the zero-shot average."""
    readme = _table_rows(README.read_text(), "model")
    report = _table_rows((ROOT / "docs" / "demo" / "report.md").read_text(), "model")
    head = [c.strip() for c in next(ln for ln in (ROOT / "docs" / "demo" / "report.md").read_text().splitlines()
                                    if ln.startswith("| model |")).strip("|").split("|")]
    size, ppl, avg = head.index("size (MiB)"), head.index("held-out ppl"), head.index("avg acc")
    assert len(readme) == len(report) >= 3
    for mine, theirs in zip(readme, report):
        assert mine[1] == theirs[head.index("setting")], (mine, theirs)
        assert (mine[2], mine[3], mine[4]) == (theirs[size], theirs[ppl], theirs[avg]), (mine, theirs)


def test_the_readme_serving_table_is_the_measured_matrix():
    """The README's and docs/serving.md's runtime table is the one `bench/runtimes.py` wrote from its runs."""
    measured = (ROOT / "bench" / "results" / "runtimes.md").read_text()
    table = measured.split("## What `qatlm export --for RUNTIME` picks", 1)[1].split("\n\n")[2].strip()
    assert table.startswith("| grid | vLLM") and table.count("\n") >= 8
    assert table in README.read_text() and table in (ROOT / "docs" / "serving.md").read_text()
