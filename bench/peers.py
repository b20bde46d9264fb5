"""Peers on the same calibration tokens: auto-round and GPTQModel, each read three ways.

    pip install 'qatlm[bench-peers]'; qatlm install gptq       # auto-round; gptqmodel
    python bench/peers.py --peers gptqmodel,auto-round --settings w2g64,w3g128 --calib-samples 64

Every peer's held-out perplexity is measured (a) on the quantized model the peer library returns, in memory,
with qatlm's perplexity code; (b) on its saved GPTQ checkpoint loaded by qatlm's loader; (c) on the same
checkpoint loaded by transformers + gptqmodel. The row's `heldout_ppl` (and zero-shot) is (a), the peer's own
result; (b) and (c) are kept beside it (`ppl_saved_qatlm`, `ppl_saved_transformers`), with `readings_agree`
(all within 1 %). Where the checkpoint itself differs from the in-memory model (auto-round's GPTQ writer stores
max(zero − 1, 0), so a zero point of 0 is read back as 1), the row says so (`zero_point_0_groups`).
Rows are merged into bench/results/results.{json,md} with recipe names `peer:auto-round`, ...

A mixed setting (``mix3.21``: 3.21 bits per weight) runs auto-round's AutoScheme over the grids of qatlm's
``--bit-menu`` for that budget, then auto-round on the scheme it picked (``--iters 0``: round-to-nearest, the
allocation alone, to set beside ``qatlm quantize --method rtn --target-bpw``); the row keeps the per-layer grids and
their bits per weight as ``qatlm info`` counts them:

    QATLM_BENCH_RESULTS=bench/results/mixed python bench/peers.py --peers auto-round --settings mix3.21 --iters 0 --limit 0
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import HERE, device_name, finish_row, parse_setting, save_rows  # noqa: E402


def zero_point_0_groups(model) -> int:
    """Groups whose zero point auto-round set to 0 (its GPTQ writer stores max(zero - 1, 0): read back as 1)."""
    return sum(int((m.zp == 0).sum()) for m in model.modules() if isinstance(getattr(m, "zp", None), torch.Tensor))


def quantize_auto_round(model, tok, train_ids, bits, group, out: Path, iters: int, lr: float, batch: int, seed: int = 0):
    """Returns (the quantized model as auto-round holds it in memory: its linears carry the quantized-dequantized
    weights, a function that saves it in GPTQ format and returns the folder, the number of groups whose zero point is 0).
    Saving packs the layers in place, so the in-memory model is evaluated first."""
    from auto_round import AutoRound
    from torch.utils.data import DataLoader

    data = [{"input_ids": row} for row in train_ids]
    loader = DataLoader(data, batch_size=batch, shuffle=False)
    ar = AutoRound(model, tok, bits=bits, group_size=group, sym=False, iters=iters, lr=lr, batch_size=batch,
                   nsamples=len(train_ids), seqlen=train_ids.shape[1], dataset=loader, amp=False, device_map="cpu", seed=seed)
    ar.quantize()
    zero0 = zero_point_0_groups(ar.model)

    def save() -> Path:
        ar.save_quantized(str(out), format="auto_gptq")
        return next(p.parent for p in [out / "config.json", *out.glob("*/config.json")] if p.exists())  # it may add a subfolder
    return ar.model, save, zero0


# the --target-bpw menu (qatlm.quant.grid.MENU) in auto-round's preset names: 2/3/4 bits in groups of 128 / 64, 8-bit symmetric
AUTO_SCHEME_OPTIONS = "W2A16,W2A16G64,W3A16,W3A16G64,W4A16,W4A16G64,W8A16"
AUTO_SCHEME_SAMPLES = 8  # samples AutoScheme scores its options on (qatlm's allocation measures on 4 of the same draw)


def quantize_auto_scheme(model, tok, train_ids, target_bpw: float, out: Path, iters: int, lr: float, batch: int, seed: int = 0):
    """auto-round's AutoScheme (its per-layer choice among qatlm's menu for an average bit budget, from its own measured
    loss deltas), then auto-round itself on that scheme. Same returns as ``quantize_auto_round`` plus the per-layer grids.
    AutoScheme reads calibration text by file name only: the same samples are written as JSON lines, one per sample.
    Its bit accounting is qatlm's (codes + 16-bit scale + zero point per group) without the 32-bit group index per
    input column, which costs the same on every grid: the budget it gets is the target less exactly that."""
    from auto_round import AutoRound, AutoScheme

    from qatlm.model.arch import quant_targets
    from qatlm.model.sequential import SequentialBlocks

    out.parent.mkdir(parents=True, exist_ok=True)
    calib = out.parent / f"{out.name}-calib.jsonl"
    calib.write_text("".join(json.dumps({"text": tok.decode(row)}) + "\n" for row in train_ids))
    blocks = SequentialBlocks(model)
    lins = [lin for i in range(len(blocks)) for lin in quant_targets(blocks.parts.layers[i]).values()]
    n_weights = sum(l.in_features * l.out_features for l in lins)
    avg_bits = target_bpw - 32 * sum(l.in_features for l in lins) / n_weights
    scheme = AutoScheme(avg_bits=avg_bits, options=AUTO_SCHEME_OPTIONS, nsamples=min(AUTO_SCHEME_SAMPLES, len(train_ids)), seqlen=train_ids.shape[1],
                        batch_size=batch, dataset=str(calib), device_map="cpu")
    ar = AutoRound(model, tok, scheme=scheme, sym=False, iters=iters, lr=lr, batch_size=batch, nsamples=len(train_ids),
                   seqlen=train_ids.shape[1], dataset=str(calib), amp=False, device_map="cpu", seed=seed)
    ar.quantize()
    grids = {}
    for name, cfg in ar.layer_config.items():
        if cfg.get("bits", 16) < 16 and "layers" in name:
            grids[name] = f"w{cfg['bits']}g{cfg['group_size']}" + ("-sym" if cfg.get("sym") and cfg["bits"] == 8 else "")

    def save() -> Path:
        ar.save_quantized(str(out), format="auto_gptq")
        return next(p.parent for p in [out / "config.json", *out.glob("*/config.json")] if p.exists())
    return ar.model, save, grids


def scheme_bpw(model, grids: dict) -> float:
    """Bits per quantized weight of a per-layer scheme, as ``qatlm info`` counts them (``QuantSpec.layer_bytes``)."""
    from qatlm.quant.grid import QuantSpec, spec_from_tag

    base, total, n = QuantSpec(4, 128), 0, 0
    for name, tag in grids.items():
        lin = model.get_submodule(name)
        f_in, f_out = (lin.in_features, lin.out_features) if hasattr(lin, "in_features") else (lin.infeatures, lin.outfeatures)
        total += spec_from_tag(tag, base).layer_bytes(f_in, f_out)
        n += f_in * f_out
    return 8 * total / n


def quantize_gptqmodel(fp_dir, train_ids, bits, group, out: Path):
    """Returns (None, a function that saves and returns the folder, None). GPTQModel's model right after
    ``quantize()`` is not its inference model on CPU (evaluated, it gave a perplexity of 2.4e9 where its reload gives
    2.9e4): its in-memory reading is the library's own loader, ``GPTQModel.load`` (see ``gptqmodel_in_memory``)."""
    # GPTQModel 7.7 sizes its CPU pool as ceil(cores/2) but asks for 2 model-loader workers: on 2 cores it refuses to start
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    from gptqmodel import GPTQModel, QuantizeConfig

    cfg = QuantizeConfig(bits=bits, group_size=group, sym=False, desc_act=False)
    m = GPTQModel.load(str(fp_dir), cfg, dtype=torch.float32)  # its default ("auto") is bf16: ~400x slower matmuls on this CPU
    m.quantize([{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in train_ids])

    def save() -> Path:
        m.save(str(out))
        return out
    return None, save, None


def gptqmodel_in_memory(folder: Path):
    from gptqmodel import GPTQModel

    # its CPU kernel takes fp16 / bf16 only (fp16: the scales' own precision)
    return GPTQModel.load(str(folder), device="cpu", dtype=torch.float16).model


def heldout_ppl(model, tok, settings) -> float:
    """qatlm's held-out perplexity protocol (the same as ``qatlm eval``) on a model object."""
    from qatlm.data.text import bos_token, token_ids
    from qatlm.eval.perplexity import perplexity

    model.eval()
    ids = token_ids(tok, settings.heldout, settings.cache_dir)
    return perplexity(model, ids, settings.seqlen, settings.ppl_windows, progress=False, bos=bos_token(tok))


def transformers_ppl(folder: Path, tok, settings) -> float | None:
    """(c): the saved folder through transformers' GPTQ loader (gptqmodel), None where it is not installed."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")
    except ImportError as e:
        print(f"(c) skipped: {e}", file=sys.stderr)
        return None
    return heldout_ppl(model, tok, settings)


def run_one(a) -> dict:
    from qatlm.data.assets import MODEL_NAME, default_model_dir
    from qatlm.data.text import calibration_samples
    from qatlm.eval.report import EvalSettings
    from qatlm.eval.zeroshot import average, evaluate_lm_eval
    from qatlm.model.checkpoint import load_fp_model, load_tokenizer

    fp_dir = default_model_dir()
    bits, group = parse_setting(a.setting)
    tok = load_tokenizer(fp_dir)
    # exactly the training samples Block-AP gets (same source, count, length, seed; its validation split unused)
    train_ids, _ = calibration_samples(tok, "wikipedia", a.calib_samples, a.calib_seqlen, a.seed, 16)
    out = HERE / "work" / (f"peer-{a.peer}-{a.setting}" + (f"-seed{a.seed}" if a.seed else ""))
    t0 = time.time()
    grids = None
    if a.peer == "auto-round" and group is None:  # a mixed setting (mix3.21): AutoScheme picks each layer's grid
        model, save, grids = quantize_auto_scheme(load_fp_model(fp_dir), tok, train_ids, bits, out, a.iters, a.lr, a.batch, a.seed)
        zero0 = zero_point_0_groups(model)
    elif a.peer == "auto-round":
        model, save, zero0 = quantize_auto_round(load_fp_model(fp_dir), tok, train_ids, bits, group, out, a.iters, a.lr, a.batch, a.seed)
    elif a.peer == "gptqmodel":
        model, save, zero0 = quantize_gptqmodel(fp_dir, train_ids, bits, group, out)
    else:
        raise SystemExit(f"unknown peer {a.peer}")
    quant_s = round(time.time() - t0, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    settings = EvalSettings(ppl_windows=a.ppl_windows, limit=a.limit or None)
    if model is None:  # GPTQModel: save first, then its own loader
        folder = save()
        model = gptqmodel_in_memory(folder)
    in_memory = heldout_ppl(model, tok, settings)
    # zero-shot on (a) where it computes in fp32; GPTQModel's own CPU kernel is fp16-only (~3 h for 1,600 requests
    # here), so its zero-shot is scored on (b), whose perplexity agrees with (a) (see the README)
    zs_on_a = next(model.parameters()).dtype == torch.float32
    zs = evaluate_lm_eval(model, tok, settings.tasks, settings.limit, settings.batch_size, settings.cache_dir) if (a.limit and zs_on_a) else {}
    if grids is not None:
        counts = Counter(grids.values())
        alloc = {"target_bpw": bits, "bits_per_weight": scheme_bpw(model, grids), "grids": dict(sorted(counts.items())), "layers": grids}
    if a.peer == "auto-round":
        try:
            folder = save()
        except Exception as e:  # a per-layer scheme auto-round may not write as GPTQ: the row keeps reading (a)
            print(f"auto-round's GPTQ writer refused: {type(e).__name__}: {e}", file=sys.stderr)
            folder = None
    del model
    row = {"model": MODEL_NAME, "recipe": f"peer:{a.peer}", "device": device_name(), "bits": bits, "group_size": group,
           "calib": f"{a.calib_samples}x{a.calib_seqlen}", "quant_wall_s": quant_s, "quant_peak_rss_mib": rss,
           "iters": a.iters if a.peer == "auto-round" else None, "seed": a.seed}
    b_settings = EvalSettings(ppl_windows=a.ppl_windows, tasks=() if zs_on_a else settings.tasks, limit=settings.limit)
    if grids is not None:
        row["allocation"] = alloc
    if folder is not None:
        try:
            row = finish_row(row, folder, b_settings, f"{a.peer} {a.setting}", a.limit, t0)
        except Exception as e:  # qatlm's loader refuses the folder: (b) is missing, said
            print(f"(b) failed: {type(e).__name__}: {e}", file=sys.stderr)
            folder = None
    if folder is None:
        row.update(heldout_ppl=None, ppl_saved_qatlm=None, ppl_saved_transformers=None, wall_s=round(time.time() - t0, 1),
                   setting=f"mixed {bits:.2f} bpw", size_on_disk_mib=float("nan"), zeroshot_avg=None, zeroshot_limit=a.limit,
                   ppl_protocol=f"{a.ppl_windows} windows x {settings.seqlen} tokens", peak_rss_mib=rss)
    else:
        row["ppl_saved_qatlm"] = row["heldout_ppl"]
        try:
            row["ppl_saved_transformers"] = transformers_ppl(folder, tok, settings)
        except Exception as e:
            print(f"(c) failed: {type(e).__name__}: {e}", file=sys.stderr)
            row["ppl_saved_transformers"] = None
    row["heldout_ppl"] = in_memory
    if grids is not None:  # qatlm's accounting of the scheme auto-round chose
        row["bits_per_weight"] = alloc["bits_per_weight"]
    if zs_on_a:
        row["zeroshot"] = {t: v["acc"] for t, v in zs.items()}
        row["zeroshot_avg"] = average(zs) if zs else None
    row["zeroshot_read"] = "a" if zs_on_a else "b"
    readings = [v for v in (in_memory, row["ppl_saved_qatlm"], row["ppl_saved_transformers"]) if v is not None]
    row["readings_agree"] = max(readings) / min(readings) <= 1.01 if len(readings) > 1 else None
    row["zero_point_0_groups"] = zero0
    print(f"(a) in memory {in_memory:.2f}  (b) saved, qatlm {row['ppl_saved_qatlm']}  (c) saved, transformers "
          f"{row['ppl_saved_transformers']}  zero points of 0: {zero0}", file=sys.stderr, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="auto-round")
    ap.add_argument("--settings", default="w2g64,w3g128")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50, help="auto-round iterations per block")
    ap.add_argument("--lr", type=float, default=5e-3, help="auto-round learning rate")
    ap.add_argument("--batch", type=int, default=8, help="auto-round batch size")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (the same draw Block-AP gets at that seed) and of auto-round")
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
                   f"--ppl-windows={a.ppl_windows}", f"--limit={a.limit}", f"--seed={a.seed}"]
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
