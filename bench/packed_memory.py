"""Evaluation and E2E-QP training of a packed model whose float weights do not fit in the memory they run in.

    python bench/packed_memory.py                      # eval in 1.5 GiB, E2E-QP in 2 GiB
    python bench/packed_memory.py --eval-cap-gib 1.5 --train-cap-gib 2

The model is ``bench/big_model.py``'s random-weight Llama (hidden 1024, 96 layers, ~1.2 B parameters, 4.5 GiB
in fp32), quantized once with RTN at w2g64 (streaming, outside any cap). Then, each inside its own cgroup
v1 memory limit (page cache counted): ``qatlm eval`` (held-out perplexity, default kernel ``auto``) and
``qatlm train --method e2e-qp`` (a few steps, default gradient checkpointing). Reports exit code, cgroup
peak, peak RSS and wall time to ``bench/results/packed_memory.{json,md}``.
Needs root (cgroup) and the built-in assets (tokenizer, texts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from big_model import build, run_capped  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=96)
    ap.add_argument("--eval-cap-gib", type=float, default=1.5)
    ap.add_argument("--train-cap-gib", type=float, default=2.0)
    ap.add_argument("--train-args", default="--samples 8 --seqlen 256 --batch-size 2 --val-samples 1 --epochs 1",
                    help="budget of the E2E-QP run")
    ap.add_argument("--eval-args", default="--tasks none --ppl-windows 8 --seqlen 512", help="what qatlm eval measures")
    a = ap.parse_args()
    work = HERE / "work" / "big"
    work.mkdir(parents=True, exist_ok=True)
    fp = work / f"llama-h1024-l{a.layers}"
    build(fp, a.layers)
    packed = work / f"{fp.name}-rtn-w2g64"
    if not (packed / "config.json").exists():
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "qatlm.cli", "quantize", "--model", str(fp), "--method", "rtn", "--bits", "2",
                            "--group-size", "64", "--out", str(packed), "--overwrite"], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        print(f"quantized {fp.name} with RTN w2g64 in {time.time() - t0:.0f}s", file=sys.stderr)
    fp_bytes = sum(f.stat().st_size for f in fp.glob("*.safetensors"))
    packed_bytes = sum(f.stat().st_size for f in packed.glob("*.safetensors"))
    rows = []
    ev = run_capped([sys.executable, "-m", "qatlm.cli", "eval", str(packed), *a.eval_args.split()], int(a.eval_cap_gib * 2**30), "eval")
    rows.append({"job": "qatlm eval " + a.eval_args, **ev})
    out = work / f"{packed.name}-e2e"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f"{out.name}.work", ignore_errors=True)
    tr = run_capped([sys.executable, "-m", "qatlm.cli", "train", "--method", "e2e-qp", "--from", str(packed), "--out", str(out),
                     *a.train_args.split()], int(a.train_cap_gib * 2**30), "train")
    if tr["exit"] == 0:
        tr["trained_steps"] = json.loads((out / "training_summary.json").read_text())["steps"]
    rows.append({"job": "qatlm train --method e2e-qp " + a.train_args, **tr})
    shutil.rmtree(out, ignore_errors=True)
    meta = {"model": fp.name, "fp32_gib": round(fp_bytes / 2**30, 2), "packed_mib": round(packed_bytes / 2**20), "rows": rows}
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    (res / "packed_memory.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [f"Model {fp.name} (random weights; fp32 {meta['fp32_gib']} GiB), RTN w2g64 checkpoint {meta['packed_mib']:,} MiB.", "",
             "| job | cap | exit | peak (cgroup, page cache incl.) | peak RSS | wall s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['job']}` | {r['cap_mib']:,} MiB | {r['exit']} | {r['cgroup_peak_mib']:,} MiB | "
                     f"{'–' if r['peak_rss_mib'] is None else format(r['peak_rss_mib'], ',')} MiB | {r['wall_s']} |")
    (res / "packed_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for r in rows:
        print(r["job"], r["stderr_tail"], file=sys.stderr)


if __name__ == "__main__":
    main()
