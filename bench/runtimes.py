"""The serving matrix: every export of every grid, run in every runtime that could load it, checked in that runtime.

    python bench/runtimes.py [--vllm-python /path/to/vllm-venv/bin/python] [--windows 8] [--fresh]

Checkpoints: the built-in SmolLM2-135M-Instruct quantized with ``qatlm quantize --method rtn`` on each grid (the
layout is the same whatever the method), and a tiny random Qwen2-MoE; each exported with ``qatlm export --format``
gptq, compressed-tensors and gguf. Runtimes: vLLM (CPU build, its own virtualenv, default settings: ``dtype=auto``),
llama.cpp (llama-cpp-python), transformers (+gptqmodel / compressed-tensors / its GGUF reader). Per cell, run by
``bench/runtime_worker.py`` under the runtime's own Python: loads or the runtime's refusal in its words; 32 greedy
tokens against qatlm's own (``load_quantized``, float32); held-out perplexity (Shakespeare, the same token windows
everywhere; vLLM through ``prompt_logprobs``) against qatlm's; tokens/s against the same runtime's full-precision
model. The ``--for`` column is what ``qatlm export --for RUNTIME`` picks for that grid (``qatlm.export.runtimes``),
and the run checks that the pick is a green cell and that every refusal of ``--for`` is a runtime that loads none.

Writes bench/results/runtimes.{json,md} after every cell (a rerun continues; --fresh starts again).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work" / "runtimes"
RESULTS = HERE / "results"
WORKER = HERE / "runtime_worker.py"
sys.path.insert(0, str(HERE))

GRIDS = [("w2g64", "2", "64", False), ("w3g128", "3", "128", False), ("w4g64", "4", "64", False), ("w4g128", "4", "128", False),
         ("w8g64", "8", "64", False), ("w4g64-sym", "4", "64", True), ("w4g128-sym", "4", "128", True),
         ("w8g64-sym", "8", "64", True), ("q4_k", None, None, False), ("q2_k", None, None, False)]
MOE_GRIDS = [("moe-w4g64", "4", "64", False)]
# mixed precision (--target-bpw): a grid per layer, chosen by measured sensitivity; the name says the budget and the menu
MIXED = {"mixed-3.21": ["--target-bpw", "3.21"],  # the default menu (2/3/4/8 bits): the size of uniform w3g128
         "mixed-4.40-w4": ["--target-bpw", "4.4", "--bit-menu", "w4g32,w4g64,w4g128"],  # 4-bit groups only: vLLM's kernels
         "mixed-4.40-w4-tied": ["--target-bpw", "4.4", "--bit-menu", "w4g32,w4g64", "--tie-fused"],  # vLLM: fused layers alike, groups that divide 576
         "k-mix-5.00": ["--grid", "k", "--target-bpw", "5.0"]}  # llama.cpp's own types, one per tensor
EXPORTS = {"gptq": ["vllm", "transformers"], "compressed-tensors": ["vllm", "transformers"], "gguf": ["llama.cpp", "transformers"]}
NEW_TOKENS, SPEED_TOKENS = 32, 64
PROMPT = "The history of the city begins with"


def qatlm(*args, timeout=1800) -> tuple[bool, str]:
    """Run the qatlm command line; (ok, its last stderr line)."""
    p = subprocess.run([sys.executable, "-m", "qatlm.cli", *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    last = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return p.returncode == 0, (last[-1] if last else "")


def run_worker(python: str, job: dict, timeout: int = 900) -> dict:
    path = WORK / "job.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(job.get("threads", 2)), "TOKENIZERS_PARALLELISM": "false"}
    try:
        p = subprocess.run([python, str(WORKER), str(path)], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            if "root cause above" in out.get("error", ""):  # vLLM's engine process said why, on stderr
                logs = (p.stderr + "\n" + p.stdout).splitlines()  # (vLLM's processes log to either)
                causes = [ln for ln in logs if re.search(r"\b\w*(Error|Exception): ", ln) and "root cause" not in ln]
                if causes:
                    out["error"] = re.sub(r"^.*?(\w*(Error|Exception): )", r"\1", causes[-1])[:400]
                why = [ln.split("cannot implement due to: ")[-1] for ln in logs if "CPUWNA16LinearKernel cannot" in ln]
                if why:  # which kernel would have served it on this CPU, and why it did not
                    out["error"] = "no CPU kernel: " + why[-1][:300]
            return out
    tail = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
    return {"error": f"exit {p.returncode}: " + (tail[-1][:300] if tail else "no output")}


def qatlm_reference(ckpt: Path, prompt: list[int], windows: list[list[int]]) -> dict:
    """qatlm's own greedy tokens and perplexity for a packed checkpoint (float32, the figures qatlm reports)."""
    import torch

    from qatlm.model.checkpoint import load_quantized

    torch.set_num_threads(2)
    model = load_quantized(ckpt, dtype=torch.float32)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        g = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        nll = 0.0
        for w in windows:
            x = torch.tensor([w])
            logits = model(input_ids=x).logits[0].double()
            nll += torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()
    return {"greedy": g[0, ids.shape[1]:].tolist(), "ppl": math.exp(nll / sum(len(w) - 1 for w in windows))}


def text_job(tok_dir: Path, windows: int, seqlen: int = 512) -> tuple[list[int], list[list[int]]]:
    from qatlm.data.text import token_ids
    from qatlm.model.checkpoint import load_tokenizer

    tok = load_tokenizer(tok_dir)
    ids = token_ids(tok, "shakespeare")
    return tok(PROMPT, add_special_tokens=False)["input_ids"], [ids[i * seqlen:(i + 1) * seqlen].tolist() for i in range(windows)]


def build_moe() -> Path:
    from gpu_check import MOE, build_tokenizer, save_random_model, synthetic_text

    folder = WORK / "model-moe"
    if not (folder / "config.json").is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        text = synthetic_text(WORK / "moe-text.txt", 60_000)
        save_random_model(folder, "Qwen2MoeConfig", MOE, build_tokenizer(text, 320))
    return folder


def checkpoints(model: Path, moe: Path, commands: dict) -> dict:
    """Quantize each grid once (RTN); {name: folder or the refusal}. ``commands`` gets each one's command by name."""
    out = {}
    for name, bits, group, sym in GRIDS + MOE_GRIDS + [(n, None, None, False) for n in MIXED]:
        folder = WORK / name
        src = moe if name.startswith("moe") else model
        args = ["quantize", "--model", str(src), "--method", "rtn", "--out", str(folder), "--device", "cpu"]
        if name in MIXED:
            args += MIXED[name]
        else:
            args += ["--grid", name] if bits is None else ["--bits", bits, "--group-size", group] + (["--sym"] if sym else [])
        commands[name] = "qatlm " + " ".join(a.replace(str(ROOT) + "/", "") for a in args)
        stamp = WORK / f"{name}.command"  # the command that made the folder: another one (a changed row) quantizes again
        if not (folder / "config.json").is_file() or (stamp.is_file() and stamp.read_text() != commands[name]):
            for old in WORK.glob(f"{name}--*"):  # its exports belong to the old checkpoint
                shutil.rmtree(old)
            ok, msg = qatlm(*args, "--overwrite")
            if not ok:
                out[name] = msg
                continue
            stamp.write_text(commands[name])
        out[name] = folder
    trained = HERE / "work" / "block-ap-w3g128"  # a trained checkpoint beside the RTN ones (bench/run.py writes it)
    commands["w3g128 (Block-AP)"] = "python bench/run.py --recipes block-ap --settings w3g128  # -> bench/work/block-ap-w3g128"
    if (trained / "config.json").is_file():
        out["w3g128 (Block-AP)"] = trained
    return out


def export(ckpt: Path, fmt: str) -> tuple[Path | None, str]:
    folder = ckpt.parent / f"{ckpt.name}--{fmt}"
    if not (folder / "export_report.json").is_file():
        ok, msg = qatlm("export", str(ckpt), "--format", fmt, "--out", str(folder), "--overwrite")
        if not ok:
            return None, msg.removeprefix("qatlm: error: ")
    if fmt == "gguf":
        return next(folder.glob("*.gguf")), ""
    return folder, ""


def judge(cell: dict, ref: dict, fp: dict | None) -> dict:
    if "error" in cell:
        return {"status": "refused", "why": cell["error"]}
    g, r = cell["greedy"], ref["greedy"]
    same = next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), min(len(g), len(r)))
    out = {"status": "ok", "greedy_equal": same, "ppl": cell["ppl"], "ppl_vs_qatlm_pct": 100 * (cell["ppl"] / ref["ppl"] - 1),
           "load_s": cell.get("load_s"), "dtype": cell.get("dtype"), "gen_tok_s": cell.get("gen_tok_s"),
           "prompt_tok_s": cell.get("prompt_tok_s"), "loader": cell.get("loader")}
    if fp and fp.get("gen_tok_s") and cell.get("gen_tok_s"):
        out["gen_speed_vs_fp"] = cell["gen_tok_s"] / fp["gen_tok_s"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=os.environ.get("QATLM_VLLM_PYTHON", ""), help="python of the vLLM CPU virtualenv")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens per cell")
    ap.add_argument("--only", default="", help="comma-separated grid names (default: all)")
    ap.add_argument("--fresh", action="store_true", help="forget earlier cells")
    ap.add_argument("--markdown", action="store_true", help="only rewrite runtimes.md (and the route check) from runtimes.json")
    a = ap.parse_args()
    if a.markdown:
        from qatlm.export.runtimes import checkpoint_widths, route
        from qatlm.model.checkpoint import read_quant_config, spec_from_config

        state = json.loads((RESULTS / "runtimes.json").read_text())
        for name, row in state["cells"].items():  # the routes as the code now picks them
            folder = HERE / "work" / "block-ap-w3g128" if name.endswith("(Block-AP)") else WORK / name
            if "routes" in row and (folder / "config.json").is_file():
                spec, widths = spec_from_config(read_quant_config(folder)[1]), checkpoint_widths(folder)
                row["routes"] = {rt: {"format": r.format, "why": r.why, "regroup": r.regroup}
                                 for rt in ("vllm", "llama.cpp", "transformers") for r in [route(rt, spec, widths)]}
        state["route_check"] = route_check(state["cells"])
        (RESULTS / "runtimes.json").write_text(json.dumps(state, indent=2) + "\n")
        (RESULTS / "runtimes.md").write_text(markdown(state))
        return 0
    from qatlm.data.assets import default_model_dir
    from qatlm.export.runtimes import checkpoint_widths, route
    from qatlm.model.checkpoint import read_quant_config, spec_from_config

    WORK.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "runtimes.json"
    state = {} if a.fresh or not json_path.is_file() else json.loads(json_path.read_text())
    cells = state.setdefault("cells", {})
    commands: dict[str, str] = {}  # checkpoint name -> the command that makes it
    model = default_model_dir()
    pythons = {"vllm": a.vllm_python, "llama.cpp": sys.executable, "transformers": sys.executable}
    t0 = time.time()

    def save():
        state.update(commands=list(commands.values()), windows=a.windows, vllm_python=bool(a.vllm_python))
        json_path.write_text(json.dumps(state, indent=2) + "\n")
        (RESULTS / "runtimes.md").write_text(markdown(state))

    # full-precision references: each runtime's own speed on the unquantized model
    fp_gguf = WORK / "fp--gguf"
    if not fp_gguf.is_dir():
        qatlm("export", str(model), "--format", "gguf", "--out", str(fp_gguf), "--overwrite")
    prompt, windows = text_job(model, a.windows)
    base = {"prompt": prompt, "new_tokens": NEW_TOKENS, "windows": windows, "threads": 2, "speed_tokens": SPEED_TOKENS}
    fp = state.setdefault("fp", {})
    for rt, path in (("vllm", model), ("transformers", model), ("llama.cpp", next(fp_gguf.glob("*.gguf")))):
        if rt not in fp and pythons[rt]:
            fp[rt] = run_worker(pythons[rt], {**base, "runtime": rt, "model": str(path)})
            save()
    moe = build_moe()
    ckpts = checkpoints(model, moe, commands)
    only = set(filter(None, a.only.split(",")))
    for name, ckpt in ckpts.items():
        if only and name not in only:
            continue
        if not isinstance(ckpt, Path):
            cells[name] = {"quantize": ckpt}
            continue
        spec = spec_from_config(read_quant_config(ckpt)[1])
        widths = checkpoint_widths(ckpt)
        row = cells.setdefault(name, {})
        if row.get("command", commands[name]) != commands[name]:
            row.clear()  # measured on a checkpoint another command made
        row["command"] = commands[name]
        row["routes"] = {rt: {"format": r.format, "why": r.why, "regroup": r.regroup} for rt in ("vllm", "llama.cpp", "transformers")
                         for r in [route(rt, spec, widths)]}
        p, w = (text_job(ckpt, a.windows, seqlen=256) if name.startswith("moe") else (prompt, windows))  # (its context: 512)
        job = {**base, "prompt": p, "windows": w}
        if "qatlm" not in row:
            row["qatlm"] = qatlm_reference(ckpt, p, w)
        for fmt, runtimes in EXPORTS.items():
            key = f"{fmt}"
            if key in row and all(rt in row[key] for rt in runtimes if pythons[rt]):
                continue
            path, why = export(ckpt, fmt)
            row[key] = row.get(key) or {}
            for rt in runtimes:
                if rt in row[key] or not pythons[rt]:
                    continue
                if path is None:
                    row[key][rt] = {"status": "not exported", "why": why}
                else:
                    res = run_worker(pythons[rt], {**job, "runtime": rt, "model": str(path)})
                    row[key][rt] = judge(res, row["qatlm"], None if name.startswith("moe") else fp.get(rt))
                print(f"[{time.time() - t0:6.0f}s] {name:>14} {fmt:>18} {rt:>12}: {short(row[key][rt])}", flush=True)
                save()
        # a grid the runtimes' kernels need regrouped: the --for export itself (each group split, exact), run there
        for rt, r in row["routes"].items():
            if r.get("regroup") and pythons[rt] and rt not in row.setdefault("for", {}):
                folder = ckpt.parent / f"{ckpt.name}--for-{rt}"
                ok, msg = True, ""
                if not (folder / "export_report.json").is_file():
                    ok, msg = qatlm("export", str(ckpt), "--for", rt, "--out", str(folder), "--overwrite")
                res = run_worker(pythons[rt], {**job, "runtime": rt, "model": str(folder)}) if ok else {"error": msg}
                row["for"][rt] = judge(res, row["qatlm"], None if name.startswith("moe") else fp.get(rt))
                print(f"[{time.time() - t0:6.0f}s] {name:>14} {'--for ' + rt:>18} {rt:>12}: {short(row['for'][rt])}", flush=True)
                save()
    state["route_check"] = route_check(cells)
    save()
    print(f"routes: {state['route_check']['summary']}")
    return 0


def short(c: dict) -> str:
    if c["status"] != "ok":
        return f"{c['status']}: {c['why'][:110]}"
    return f"greedy {c['greedy_equal']}/{NEW_TOKENS}, ppl {c['ppl']:.2f} ({c['ppl_vs_qatlm_pct']:+.2f}%)"


def picked(row: dict, rt: str, fmt: str) -> dict | None:
    """The cell of export ``fmt`` in runtime ``rt``: the ``--for`` export where it differs from ``--format`` (regrouped)."""
    if row.get("routes", {}).get(rt, {}).get("format") == fmt and rt in (row.get("for") or {}):
        return row["for"][rt]
    return (row.get(fmt) or {}).get(rt)


def green(c: dict | None) -> bool:
    """Loads and computes qatlm's model: held-out perplexity within 1 % (greedy agreement is shown beside it: a
    runtime that rounds activations, as llama.cpp does to 8 bits, may part from qatlm at a near tie)."""
    return c is not None and c.get("status") == "ok" and abs(c.get("ppl_vs_qatlm_pct", 99)) < 1.0


def route_check(cells: dict) -> dict:
    """Every ``--for`` pick must be a green cell; every ``--for`` refusal a runtime with no green cell."""
    bad = []
    for name, row in cells.items():
        for rt, r in (row.get("routes") or {}).items():
            measured = [fmt for fmt in EXPORTS if rt in (row.get(fmt) or {})]
            if not measured:
                continue
            greens = [fmt for fmt in measured if green(picked(row, rt, fmt))]
            if r["format"] is not None and r["format"] in measured and r["format"] not in greens:
                bad.append(f"{name}: --for {rt} picks {r['format']}, which is not green there")
            if r["format"] is None and greens:
                bad.append(f"{name}: --for {rt} refuses, but {', '.join(greens)} is green there")
    return {"mismatches": bad, "summary": "every --for pick is green and every refusal has no green cell" if not bad else f"{len(bad)} mismatches"}


def cell_text(c: dict | None, picked: bool) -> str:
    if c is None:
        return "–"
    mark = " ◀" if picked else ""
    if c["status"] != "ok":
        return f"✗ {c['why'][:90]}{mark}".replace("|", "/")
    speed = f", {c['gen_speed_vs_fp']:.2f}x fp" if c.get("gen_speed_vs_fp") else ""
    ok = "✓" if green(c) else "≠"
    via = " (GPTQModel.load)" if c.get("loader") == "GPTQModel.load" else ""
    return f"{ok} {c['greedy_equal']}/{NEW_TOKENS}, {c['ppl_vs_qatlm_pct']:+.2f}%{speed}{via}{mark}"


SHORT_WHY = [("no kernel for", "no kernel for {bits}-bit weights"), ("group size to divide", "group {group} ≠ divisor of a width"),
             ("K-quant", "no kernel for K-quant blocks"), ("uniform 4/8-bit grids", "no kernel for K-quant blocks")]


def by_runtime(state: dict) -> str:
    """The README's table: per grid and runtime, what ``--for`` picks and how it ran there, or why nothing does."""
    names = {"vllm": "vLLM (CPU 0.32)", "llama.cpp": "llama.cpp", "transformers": "transformers"}
    lines = ["| grid | " + " | ".join(names.values()) + " |", "|---|---|---|---|"]
    for name, row in state.get("cells", {}).items():
        if "routes" not in row:
            continue
        cells = []
        for rt in names:
            r = row["routes"][rt]
            if r["format"] is None:
                cells.append("— " + r["why"].split(";")[0].split(" (")[0].removeprefix("vLLM has ").removeprefix("vLLM's kernels "))
                continue
            c = picked(row, rt, r["format"])
            if c is None:
                cells.append(f"{r['format']}: not run")
            elif c["status"] != "ok":
                cells.append(f"✗ {r['format']}: {c['why'][:60]}")
            else:
                speed = f", {c['gen_speed_vs_fp']:.2f}x fp speed" if c.get("gen_speed_vs_fp") else ""
                split = f" in groups of {r['regroup']}" if r.get("regroup") else ""
                via = " via GPTQModel.load" if c.get("loader") == "GPTQModel.load" else ""
                cells.append(f"{'✓' if green(c) else '≠'} {r['format']}{split}{via}, ppl {c['ppl_vs_qatlm_pct']:+.2f} %{speed}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(state: dict) -> str:
    cols = [(fmt, rt) for fmt, rts in EXPORTS.items() for rt in rts]
    head = ["grid", "qatlm ppl"] + [f"{fmt} → {rt}" for fmt, rt in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in state.get("cells", {}).items():
        if "quantize" in row:
            lines.append(f"| {name} | quantize refused: {row['quantize']} |")
            continue
        routes = row.get("routes") or {}
        cells = [cell_text((row.get(fmt) or {}).get(rt), routes.get(rt, {}).get("format") == fmt) for fmt, rt in cols]
        lines.append(f"| {name} | {row['qatlm']['ppl']:.2f} | " + " | ".join(cells) + " |")
    fp = state.get("fp", {})
    speeds = "; ".join(f"{rt} {v['gen_tok_s']:.1f} tok/s generating, {v['prompt_tok_s']:.0f} tok/s reading"
                       for rt, v in fp.items() if "gen_tok_s" in v)
    refusals = []
    for name, row in state.get("cells", {}).items():
        for rt, r in (row.get("routes") or {}).items():
            if r["format"] is None:
                refusals.append(f"- {name}, `--for {rt}`: {r['why']}")
    rc = state.get("route_check", {})
    return "\n".join([
        "# Serving matrix", "",
        "## What `qatlm export --for RUNTIME` picks, as it ran there", "",
        "Perplexity against qatlm's own on the same tokens, with the runtime's default settings; speed: generation "
        "tokens/s against the same runtime on the full-precision model (2 CPU threads).", "",
        by_runtime(state), "",
        "## Every export in every runtime", "",
        "Each cell: the export (column) run in the runtime, with its default settings. ✓: held-out perplexity within 1 % of "
        f"qatlm's; n/{NEW_TOKENS}: greedy tokens equal to qatlm's before the first difference; "
        "≠: loads but computes another model; ✗: the runtime's (or the export's) refusal in its words. ◀: what "
        "`qatlm export --for RUNTIME` picks for that grid. \"x fp\": generation speed against the same runtime on the "
        "full-precision model.", "",
        *lines, "",
        f"Full-precision references (SmolLM2-135M, 2 CPU threads): {speeds}.", "",
        f"Routes: {rc.get('summary', 'not checked yet')}" + "".join(f"\n- {m}" for m in rc.get("mismatches", [])), "",
        "`--for` refusals:", "", *refusals, "",
        f"Held-out text: Shakespeare, first {state.get('windows')} windows of 512 tokens, the same token ids in every runtime "
        "(the MoE rows: a random-weight model, perplexity only compares runtimes). Checkpoints: RTN, one command each:", "",
        "```", *state.get("commands", []), "```", "",
        "Reproduce: `python bench/runtimes.py --vllm-python VENV/bin/python --fresh` (vLLM: `qatlm install vllm --venv VENV`).", ""])


if __name__ == "__main__":
    sys.exit(main())
