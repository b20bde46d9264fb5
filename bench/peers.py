"""Peers on the same calibration tokens: auto-round (and GPTQModel where it installs), saved in GPTQ
format, loaded with qatlm's own GPTQ loader and evaluated exactly like qatlm's rows.

    pip install 'qatlm[bench-peers]'        # auto-round
    python bench/peers.py --peers auto-round --settings w2g64,w3g128 --calib-samples 64

Rows are merged into bench/results/results.{json,md} with recipe names `peer:auto-round`, ...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import HERE, device_name, finish_row, parse_setting, save_rows  # noqa: E402


def quantize_auto_round(model, tok, train_ids, bits, group, out: Path, iters: int, lr: float, batch: int):
    from auto_round import AutoRound
    from torch.utils.data import DataLoader

    data = [{"input_ids": row} for row in train_ids]
    loader = DataLoader(data, batch_size=batch, shuffle=False)
    ar = AutoRound(model, tok, bits=bits, group_size=group, sym=False, iters=iters, lr=lr, batch_size=batch,
                   nsamples=len(train_ids), seqlen=train_ids.shape[1], dataset=loader, amp=False, device_map="cpu")
    ar.quantize_and_save(str(out), format="auto_gptq")
    return next(p.parent for p in [out / "config.json", *out.glob("*/config.json")] if p.exists())  # it may add a subfolder


def quantize_gptqmodel(fp_dir, train_ids, bits, group, out: Path):
    # GPTQModel 7.7 sizes its CPU pool as ceil(cores/2) but asks for 2 model-loader workers: on 2 cores it refuses to start
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    cfg = QuantizeConfig(bits=bits, group_size=group, sym=False, desc_act=False)
    m = GPTQModel.load(str(fp_dir), cfg, dtype=torch.float32)  # its default ("auto") is bf16: ~400x slower matmuls on this CPU
    m.quantize([{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in train_ids])
    m.save(str(out))


def run_one(a) -> dict:
    from qatlm.data.assets import MODEL_NAME, default_model_dir
    from qatlm.data.text import calibration_samples
    from qatlm.eval.report import EvalSettings
    from qatlm.model.checkpoint import load_fp_model, load_tokenizer

    fp_dir = default_model_dir()
    bits, group = parse_setting(a.setting)
    tok = load_tokenizer(fp_dir)
    # exactly the training samples Block-AP gets (same source, count, length, seed; its validation split unused)
    train_ids, _ = calibration_samples(tok, "wikipedia", a.calib_samples, a.calib_seqlen, 0, 16)
    out = HERE / "work" / f"peer-{a.peer}-{a.setting}"
    t0 = time.time()
    if a.peer == "auto-round":
        out = quantize_auto_round(load_fp_model(fp_dir), tok, train_ids, bits, group, out, a.iters, a.lr, a.batch)
    elif a.peer == "gptqmodel":
        quantize_gptqmodel(fp_dir, train_ids, bits, group, out)
    else:
        raise SystemExit(f"unknown peer {a.peer}")
    row = {"model": MODEL_NAME, "recipe": f"peer:{a.peer}", "device": device_name(), "bits": bits, "group_size": group,
           "calib": f"{a.calib_samples}x{a.calib_seqlen}", "quant_wall_s": round(time.time() - t0, 1),
           "quant_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    settings = EvalSettings(ppl_windows=a.ppl_windows, limit=a.limit or None)
    return finish_row(row, out, settings, f"{a.peer} {a.setting}", a.limit, t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="auto-round")
    ap.add_argument("--settings", default="w2g64,w3g128")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50, help="auto-round iterations per block")
    ap.add_argument("--lr", type=float, default=5e-3, help="auto-round learning rate")
    ap.add_argument("--batch", type=int, default=8, help="auto-round batch size")
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        a.peer, a.setting = a.one
        print("ROW " + json.dumps(run_one(a)), flush=True)
        return
    for peer in a.peers.split(","):
        for setting in a.settings.split(","):
            cmd = [sys.executable, __file__, "--one", peer, setting, f"--calib-samples={a.calib_samples}",
                   f"--calib-seqlen={a.calib_seqlen}", f"--iters={a.iters}", f"--lr={a.lr}", f"--batch={a.batch}",
                   f"--ppl-windows={a.ppl_windows}", f"--limit={a.limit}"]
            print(f"== {peer} {setting}", file=sys.stderr, flush=True)
            res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            rows = [json.loads(x[4:]) for x in res.stdout.splitlines() if x.startswith("ROW ")]
            if res.returncode or not rows:
                print(f"   failed (exit {res.returncode})", file=sys.stderr)
                continue
            print(f"   ppl {rows[0]['heldout_ppl']:.2f}  wall {rows[0]['quant_wall_s']}s", file=sys.stderr, flush=True)
            save_rows(rows)


if __name__ == "__main__":
    main()
