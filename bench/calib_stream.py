"""Calibration at the paper's budget (4096 samples x 2048 tokens) from a source larger than memory allows
to tokenize whole, under a cgroup memory cap.

    python bench/calib_stream.py                   # ~72 MiB of text, 1 GiB cap: streamed vs whole-text tokenizing

Builds a plain-text corpus by repeating the built-in Wikipedia text (numbered copies, ~72 MiB, so above
``WHOLE_TEXT_LIMIT`` and streamed), then, each in its own cgroup v1 memory group (page cache counted):
(1) ``calibration_samples(tokenizer, corpus, 4096, 2048)`` as qatlm does it now (read and tokenized piece by
piece into a memory-mapped id file, then only the chosen windows read); (2) the same with the whole-text path
forced (the text read whole and tokenized in one call, as before). Reports exit, wall time and peaks to
``bench/results/calib_stream.{json,md}``. Needs root (cgroup) and the built-in assets (``qatlm assets``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from big_model import run_capped  # noqa: E402

PROBE = """
import sys, time
import qatlm.data.text as text
from qatlm.data.assets import default_model_dir
from qatlm.model.checkpoint import load_tokenizer
corpus, cache, mode = sys.argv[1:4]
if mode == "whole":
    text.WHOLE_TEXT_LIMIT = 1 << 62
t0 = time.time()
tr, va = text.calibration_samples(load_tokenizer(default_model_dir()), corpus, 4096, 2048, seed=0, n_val=64, cache_dir=cache)
print("RESULT", tr.shape[0], tr.shape[1], va.shape[0], round(time.time() - t0, 1), file=sys.stderr)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=22, help="copies of the built-in Wikipedia text (~3.3 MB each)")
    ap.add_argument("--cap-gib", type=float, default=1.0)
    ap.add_argument("--modes", default="stream,whole")
    a = ap.parse_args()
    from qatlm.data.assets import wikipedia_text

    work = HERE / "work" / "calib"
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"wikipedia-x{a.copies}.txt"
    if not corpus.exists():
        base = wikipedia_text().read_text(encoding="utf-8")
        with open(corpus.with_suffix(".partial"), "w", encoding="utf-8") as f:
            for k in range(a.copies):
                f.write(f"Copy {k}.\n\n{base}\n\n")
        corpus.with_suffix(".partial").rename(corpus)
    rows = []
    for mode in a.modes.split(","):
        cache = work / f"cache-{mode}"  # a cold token cache for each run: the tokenizing is what is measured
        shutil.rmtree(cache, ignore_errors=True)
        r = run_capped([sys.executable, "-c", PROBE, str(corpus), str(cache), mode], int(a.cap_gib * 2**30), f"calib-{mode}")
        res = [line.split()[1:] for line in r.pop("stderr_tail") if line.startswith("RESULT")]
        row = {"mode": mode, "corpus_mib": round(corpus.stat().st_size / 2**20, 1), **r}
        row["samples"] = f"{res[0][0]}x{res[0][1]} (+{res[0][2]} val)" if res else None
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    out = HERE / "results"
    (out / "calib_stream.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| tokenizing | corpus MiB | exit | samples | wall s | cgroup peak MiB (cap) | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['corpus_mib']} | {r['exit']}{' (OOM-killed)' if r['oom_killed'] else ''} | {r['samples'] or '–'} | "
                     f"{r['wall_s']} | {r['cgroup_peak_mib']:,} ({r['cap_mib']:,}) | {r['peak_rss_mib'] or '–'} |")
    (out / "calib_stream.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
