"""Learning-rate sweep of the end-to-end methods on the bench model: where their defaults come from.

    python bench/lr_sweep.py --recipe rtn+dl-qat --points w3g128:2e-2:1e-3,w4g128:2e-2:1e-3   # setting:lr_lora:lr_magnitude
    python bench/lr_sweep.py --recipe rtn+e2e-qp --points w3g128:3e-4                         # setting:lr (step sizes)

Each point is one ``bench/run.py`` row (same data, 16 steps and protocol as the main table, held-out
perplexity only), written to ``bench/results/lr_sweep/<recipe>-<setting>-<lrs>/``. The summary
``bench/results/lr_sweep.{md,json}`` lists every point measured so far: the validation loss on the
held-back split of the training text (Wikipedia) — what a default is chosen by — next to the held-out
(Shakespeare) perplexity.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWEEP = HERE / "results" / "lr_sweep"


def point(recipe: str, spec: str) -> tuple[str, list[str], str]:
    """(setting, run.py options, folder name) of one ``setting:lr...`` point."""
    setting, *lrs = spec.split(":")
    if recipe.endswith("+dl-qat") and len(lrs) == 2:
        return setting, [f"--dl-lr-lora={lrs[0]}", f"--dl-lr-magnitude={lrs[1]}"], \
            f"{recipe}-{setting}-lora{float(lrs[0]):g}-mag{float(lrs[1]):g}"
    if recipe.endswith("+e2e-qp") and len(lrs) == 1:
        return setting, [f"--e2e-lr={lrs[0]}"], f"{recipe}-{setting}-lr{float(lrs[0]):g}"
    raise SystemExit(f"bad point {spec!r} for {recipe}: use setting:lr_lora:lr_magnitude (dl-qat) or setting:lr (e2e-qp)")


def learning_rates(r: dict) -> str:
    if r["recipe"].endswith("+dl-qat"):
        return f"LoRA {r['dl_lr_lora']:g}, magnitude {r['dl_lr_magnitude']:g}"
    return f"step sizes {r['e2e_lr']:g}"


def summarize() -> list[dict]:
    rows = []
    for path in sorted(SWEEP.glob("*/results.json")):
        for r in json.loads(path.read_text()):
            rows.append({"recipe": r["recipe"], "setting": r["setting"], "learning_rates": learning_rates(r),
                         "lr": [r.get("dl_lr_lora"), r.get("dl_lr_magnitude")] if "dl_lr_lora" in r else [r["e2e_lr"]],
                         "val_loss_before": r["e2e_val_loss"][0], "val_loss_after": r["e2e_val_loss"][1],
                         "heldout_ppl": r["heldout_ppl"], "train_s": r.get("e2e_wall_s"), "device": r["device"]})
    rows.sort(key=lambda r: (r["recipe"], r["setting"], r["lr"][::-1]))
    (HERE / "results" / "lr_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| recipe | setting | learning rates | val loss before → after | held-out ppl | train s | device |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['setting']} | {r['learning_rates']} | "
                     f"{r['val_loss_before']:.3f} → {r['val_loss_after']:.3f} | {r['heldout_ppl']:,.2f} | "
                     f"{r['train_s']:.0f} | {r['device']} |")
    lines.append("\n16 steps of 4x512 Wikipedia tokens from RTN. Val loss: held-back Wikipedia windows; held-out ppl: "
                 "Shakespeare, 40 windows x 512, as in the main table. Train seconds vary with what else ran on the 2 cores.\n")
    (HERE / "results" / "lr_sweep.md").write_text("\n".join(lines))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="", help="comma-separated points, see above")
    ap.add_argument("--recipe", default="rtn+dl-qat")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    for spec in filter(None, a.points.split(",")):
        setting, opts, name = point(a.recipe, spec)
        out = SWEEP / name
        if (out / "results.json").exists():
            print(f"== {name}: already measured", file=sys.stderr)
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        cmd = [sys.executable, str(HERE / "run.py"), "--recipes", a.recipe, "--settings", setting, "--tasks=",
               "--limit=0", f"--device={a.device}", *opts]
        subprocess.run(cmd, check=False, env={**os.environ, "QATLM_BENCH_RESULTS": str(out)})
    for r in summarize():
        print(f"{r['recipe']} {r['setting']} {r['learning_rates']}: val {r['val_loss_after']:.3f}  ppl {r['heldout_ppl']:.2f}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
