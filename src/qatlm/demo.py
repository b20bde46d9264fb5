"""``qatlm demo``: the built-in model quantized with RTN and a QAT recipe through the same pipeline as
``qatlm quantize``, both evaluated against full precision, and one report with the table, a chart and the
training curves. Progress is shown the whole way with an estimate of the time left."""

from __future__ import annotations

import sys
import time
from pathlib import Path

# the demo's budget: under 10 minutes on 2 CPU cores from a fresh install, at a setting where QAT's gain over RTN is
# plain (bench/results/demo_budget.md). 32x256 tokens at batch 2 (32 steps per block) reached 84.5 held-out ppl at
# w3g128; short windows at batch 1 give many more steps in the same time (a step's cost here is mostly per step, not
# per token): 64x128 (128 steps) 62.9-65.1 but 12.6 min in all; 48x128 over 2 epochs (96 steps) with a lighter
# evaluation (24 perplexity windows, 25 items per zero-shot task) fits the 10 minutes.
DEMO_BUDGET = {"bits": 3, "group_size": 128, "calib_samples": 48, "calib_seqlen": 128, "epochs": 2, "batch_size": 1, "val_samples": 4}
DEMO_EVAL = {"ppl_windows": 24, "limit": 25}


class StageClock:
    """Overall progress of a multi-stage job with a time estimate: each stage has a prior estimate (seconds on
    a 2-core CPU); the remaining time is the remaining estimates scaled by how fast the done stages went."""

    def __init__(self, stages: list[tuple[str, float]]):
        self.stages, self.t0 = stages, time.time()

    def start(self, i: int):
        name = self.stages[i][0]
        elapsed = time.time() - self.t0
        est_done = sum(e for _, e in self.stages[:i])
        speed = elapsed / est_done if est_done and elapsed > 5 else 1.0
        left = speed * sum(e for _, e in self.stages[i:])
        print(f"[qatlm demo] step {i + 1}/{len(self.stages)}: {name}  (elapsed {elapsed / 60:.1f} min, "
              f"about {left / 60:.1f} min left)", file=sys.stderr, flush=True)


def run_demo(model_dir, out, method: str, recipe: list, settings, device="cpu", cache_dir=None) -> list[dict]:
    """Evaluate the float model, then for RTN and ``method`` (``recipe``'s stages): quantize into ``out`` and evaluate.
    Writes ``out/report.{md,json,png}`` (+ ``training_curves.png``); returns the rows."""
    from qatlm.data import assets
    from qatlm.eval.plots import loss_curve
    from qatlm.eval.report import evaluate, markdown_table, write_report
    from qatlm.io import check_output
    from qatlm.methods.rtn import RTNConfig
    from qatlm.model.source import check_model_dir
    from qatlm.pipeline import run_pipeline
    from qatlm.recipes import grid_of

    grid = grid_of(recipe)
    out = Path(out).expanduser()
    methods = ["rtn"] if method == "rtn" else ["rtn", method]
    stages = [("fetch the built-in assets", 30), ("evaluate full precision", 70)]
    for m in methods:
        stages += [(f"quantize with {m} at {grid.tag}", 10 if m == "rtn" else 300), (f"evaluate {m} {grid.tag}", 70)]
    stages.append(("write the report", 5))
    clock = StageClock(stages)
    clock.start(0)
    assets.fetch_all(cache_dir)
    model_dir = check_model_dir(model_dir if model_dir else assets.default_model_dir(cache_dir))
    check_output(out, [model_dir], overwrite=True, what="demo folder")  # its runs are replaced, never the model
    out.mkdir(parents=True, exist_ok=True)
    clock.start(1)
    rows = [evaluate(model_dir, settings, label=f"{model_dir.name} (full precision)")]
    for k, m in enumerate(methods):
        clock.start(2 + 2 * k)
        qdir = out / f"{model_dir.name}-{m}-{grid.tag}"
        summary = run_pipeline(model_dir, [RTNConfig(grid=grid)] if m == "rtn" else recipe, qdir, overwrite=True, device=device,
                               cache_dir=cache_dir)
        clock.start(3 + 2 * k)
        rows.append(evaluate(qdir, settings, label=f"{m} {grid.tag}"))
        if (qdir / "training_log.jsonl").exists():
            loss_curve(qdir / "training_log.jsonl", out / "training_curves.png", summary.block_ap)
    clock.start(len(stages) - 1)
    files = write_report(rows, out, title=f"qatlm demo: {model_dir.name}, RTN vs {methods[-1]} at {grid.tag}",
                         curves="training_curves.png" if (out / "training_curves.png").exists() else None)
    print(markdown_table(rows))
    print(f"report: {files['markdown']}  {files['chart']}  (total {(time.time() - clock.t0) / 60:.1f} min)", file=sys.stderr)
    return rows
