"""Benchmark recipes on the built-in model and data; rows go to bench/results/results.{json,md}.

    python bench/run.py --recipes fp,rtn,block-ap --settings w2g64,w3g128,w4g128 --calib-samples 64

Every (recipe, setting) runs in its own subprocess (so its peak RSS is its own): quantize with the
given calibration budget, save the packed checkpoint, evaluate held-out perplexity (Shakespeare,
first --ppl-windows windows of 512 tokens) and zero-shot accuracy (first --limit items per task),
and record wall time, peak RSS and, for training recipes, the training throughput as a fraction of
the fp32 matmul throughput measured in the same process on the same shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("QATLM_BENCH_RESULTS", HERE / "results"))


def parse_setting(s: str):
    m = re.fullmatch(r"w(\d)g(\d+|c)", s)
    if s.startswith("mix"):  # mixed precision: mix3.21 = --target-bpw 3.21
        return float(s[3:]), None
    if not m:
        raise SystemExit(f"bad setting {s}: use e.g. w2g64, w4g128, w4gc (per channel), mix3.21 (mixed, 3.21 bits/weight)")
    return int(m.group(1)), (-1 if m.group(2) == "c" else int(m.group(2)))


def grid_spec(bits, group):
    from qatlm.quant.grid import QuantSpec

    return QuantSpec(target_bpw=bits) if group is None else QuantSpec(bits, group)


def allocate(model, cfg, tok, device, row, sensitivity="block"):
    """A mixed setting: the per-layer grids first (qatlm's --target-bpw allocation, or a variant of its sensitivity
    from bench/mixed_sensitivity.py), kept in the row."""
    import dataclasses

    from mixed_sensitivity import plan

    from qatlm.methods.mixed import sensitivity_ids

    if cfg.spec.target_bpw is None:
        return cfg
    spec, m, gains = plan(model, cfg.spec, sensitivity_ids(cfg, None, tok), device, sensitivity)
    if sensitivity != "block":
        row["sensitivity"] = sensitivity
    if gains is not None:
        row["block_gains"] = gains
    row["allocation"] = {"target_bpw": m.target_bpw, "bits_per_weight": m.bits_per_weight, "grids": m.grids, "seconds": m.seconds,
                         "predicted_error": sum(m.predicted_block_errors), "measured_error": sum(m.measured_block_errors),
                         "layers": m.layers}
    return dataclasses.replace(cfg, grid=spec)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


def matmul_flops(shapes, tokens: int, repeat: int = 3, device: str = "cpu", trials: int = 3) -> float:
    """FLOP/s of forward + backward matmuls (x·Wᵀ, dy·W, dyᵀ·x) on the given linear shapes, in the
    precision training computes in: fp32 on CPU, bf16 on GPU (autocast). Each shape's time is the best
    of ``trials`` timings (the rate the hardware can reach, so the training fraction is not flattered
    by a slow moment of the reference)."""
    import torch

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    repeat = repeat if device == "cpu" else 50
    tot_flops, tot_t = 0.0, 0.0
    for out_f, in_f in shapes:
        x, w, dy = (torch.randn(*s, device=device, dtype=dtype) for s in ((tokens, in_f), (out_f, in_f), (tokens, out_f)))
        x @ w.t()  # warm up
        best = float("inf")
        for _ in range(trials):
            sync()
            t = time.perf_counter()
            for _ in range(repeat):
                x @ w.t()
                dy @ w
                dy.t() @ x
            sync()
            best = min(best, time.perf_counter() - t)
        tot_t += best
        tot_flops += repeat * 6.0 * tokens * in_f * out_f
    return tot_flops / tot_t


def work_path(recipe: str, setting: str, model: str | None = None, seed: int = 0) -> Path:
    """Where a row's packed checkpoint is kept: ``bench/work/[MODEL-]RECIPE-SETTING[-seedN]`` (MODEL when not the built-in)."""
    return HERE / "work" / ((f"{Path(model).name}-" if model else "") + f"{recipe}-{setting}" + (f"-seed{seed}" if seed else ""))


def load_base(recipe: str, setting: str, device: str = "cpu", model: str | None = None, seed: int = 0):
    """The packed checkpoint an earlier row of ``recipe`` saved for ``setting`` on the same model and seed (composed
    recipes start there)."""
    from qatlm.model.checkpoint import load_quantized

    base = work_path(recipe, setting, model, seed)
    if not (base / "config.json").exists():
        raise SystemExit(f"{base} is missing: run the {recipe} row first")
    return load_quantized(base, device=device)


def run_one(a) -> dict:
    import torch

    from qatlm.data.assets import MODEL_NAME, default_model_dir
    from qatlm.eval.report import EvalSettings
    from qatlm.methods.block_ap import BlockAPConfig, quantize_block_ap
    from qatlm.methods.rtn import RTNConfig, quantize_rtn
    from qatlm.model.checkpoint import load_fp_model, load_tokenizer, save_quantized

    torch.manual_seed(a.seed)
    fp_dir = Path(a.model) if a.model else default_model_dir()
    settings = EvalSettings(ppl_windows=a.ppl_windows, limit=a.limit or None, tasks=tuple(a.tasks.split(",")) if a.tasks else (),
                            device=a.device, zeroshot_engine=a.zeroshot_engine)
    row = {"model": fp_dir.name if a.model else MODEL_NAME, "recipe": a.recipe, "device": device_name(), "seed": a.seed}
    t0 = time.time()
    if a.recipe == "fp":
        path = fp_dir
        row.update(bits=32, group_size=None, calib=None)
    else:
        bits, group = parse_setting(a.setting)
        model, tok = load_fp_model(fp_dir, device=a.device), load_tokenizer(fp_dir)
        row.update(bits=bits, group_size=group)
        if a.recipe == "rtn":
            cfg = allocate(model, RTNConfig(grid=grid_spec(bits, group)), tok, a.device, row, a.sensitivity)
            quantize_rtn(model, cfg)
            row["calib"] = None
        elif a.recipe == "block-ap":
            cfg = BlockAPConfig(grid=grid_spec(bits, group), calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen, epochs=a.epochs, seed=a.seed,
                                **({"loss": a.block_loss} if a.block_loss else {}), **block_ap_fields(a.block_ap))
            row["block_ap_fields"] = block_ap_fields(a.block_ap)
            cfg = allocate(model, cfg, tok, a.device, row, a.sensitivity)
            summary = quantize_block_ap(model, cfg, tokenizer=tok, progress=False)
            row["calib"] = f"{a.calib_samples}x{a.calib_seqlen}"
            row["lr_quant"], row["lr_weight"], row["epochs"], row["block_loss"] = summary.lr_quant, summary.lr_weight, summary.epochs, cfg.loss
            hidden = model.config.hidden_size
            inter = model.config.intermediate_size
            kv = model.config.num_key_value_heads * model.config.head_dim
            shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden), (hidden, inter)]
            mm = matmul_flops(shapes, cfg.batch_size * cfg.calib_seqlen, device=a.device)
            row["train_gflops"] = summary.train_flops_per_s / 1e9
            row["matmul_gflops"] = mm / 1e9
            row["throughput_fraction"] = summary.train_flops_per_s / mm
            row["block_rel_error"] = [{"block": b.block, "rtn": b.rtn_rel_error, "trained": b.trained_rel_error} for b in summary.blocks]
            row["block_error"] = summary.block_error
            row["rtn_fallback_blocks"] = summary.rtn_fallback_blocks
            row["lr_retried_blocks"] = summary.lr_retried_blocks
        elif a.recipe.endswith("+dl-qat"):
            from qatlm.methods.dl_qat import DLQATConfig, train_dl_qat
            from qatlm.model.layers import attach_fake_quant

            base_recipe = a.recipe.split("+")[0]
            cfg = RTNConfig(bits, group)  # only its grid spec is used for saving
            if base_recipe == "rtn":  # RTN grid on the fp weights: DL-QAT starts from the continuous W0/s + z
                attach_fake_quant(model, cfg.spec)
            else:
                del model
                model = load_base(base_recipe, a.setting, a.device, a.model, a.seed)
            lr_kw = {k: v for k, v in (("lr_lora", a.dl_lr_lora), ("lr_magnitude", a.dl_lr_magnitude)) if v is not None}
            dl = DLQATConfig(samples=a.e2e_samples, seqlen=a.calib_seqlen, batch_size=4, seed=a.seed, **lr_kw)
            row["dl_lr_lora"], row["dl_lr_magnitude"] = dl.lr_lora, dl.lr_magnitude
            summary = train_dl_qat(model, dl, tok, progress=False)
            row["calib"] = (f"{a.calib_samples}x{a.calib_seqlen} + " if base_recipe != "rtn" else "") + f"e2e {a.e2e_samples}x{a.calib_seqlen}"
            row["trainable_fraction"] = summary.trainable_fraction
            row["dlqat_cost"] = summary.cost
            row["e2e_val_loss"] = [summary.val_loss_before, summary.val_losses[-1]]
            row["e2e_wall_s"] = summary.seconds
        elif a.recipe.endswith("+e2e-qp"):
            from qatlm.methods.e2e_qp import E2EQPConfig, train_e2e_qp

            del model
            model = load_base(a.recipe.split("+")[0], a.setting, a.device, a.model, a.seed)
            e2e = E2EQPConfig(data=a.e2e_data, samples=a.e2e_samples, seqlen=a.calib_seqlen, batch_size=4, lr=a.e2e_lr, seed=a.seed)
            summary = train_e2e_qp(model, e2e, tok, progress=False)
            cfg = RTNConfig(bits, group)  # only its grid spec is used for saving
            base_calib = "" if a.recipe.startswith("rtn+") else f"{a.calib_samples}x{a.calib_seqlen} + "
            row["calib"] = f"{base_calib}e2e {a.e2e_samples}x{a.calib_seqlen}" + ("" if a.e2e_data == "wikipedia" else f" {a.e2e_data}")
            row["e2e_lr"], row["e2e_steps"] = summary.lr, summary.steps
            row["e2e_val_loss"] = [summary.val_loss_before, summary.val_losses[-1]]
            row["e2e_wall_s"] = summary.seconds
        else:
            raise SystemExit(f"unknown recipe {a.recipe}")
        row["quant_wall_s"] = round(time.time() - t0, 1)
        row["quant_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if a.device != "cpu":
            row["quant_peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        path = work_path(a.recipe, a.setting, a.model, a.seed)
        save_quantized(model, path, cfg.spec, tokenizer=tok, overwrite=True, meta={"method": a.recipe})
        del model
    return finish_row(row, path, settings, f"{a.recipe} {a.setting or ''}".strip(), a.limit, t0)


def finish_row(row: dict, path, settings, label: str, limit, t0: float) -> dict:
    """Evaluate the saved model at ``path`` and complete the row with its figures, wall time and peak RSS."""
    from qatlm.eval.report import evaluate

    ev = evaluate(path, settings, label=label, progress=False)
    row.update({k: ev[k] for k in ("setting", "bits_per_weight", "size_on_disk_mib", "heldout_ppl", "ppl_protocol")})
    row["zeroshot"] = {t: v["acc"] for t, v in ev.get("zeroshot", {}).items()}
    row["zeroshot_avg"] = ev.get("zeroshot_avg")
    row["zeroshot_limit"] = limit
    row["wall_s"] = round(time.time() - t0, 1)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def key(r):
    return (r["model"], r["recipe"], r.get("bits"), r.get("group_size"), r.get("calib"), r["device"], r.get("seed", 0), r.get("iters"),
            r.get("sensitivity"))


def save_rows(new_rows):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "results.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    keys = {key(r) for r in new_rows}
    rows = [r for r in rows if key(r) not in keys] + new_rows
    rows.sort(key=lambda r: (r["device"], -(r.get("bits") or 99), r.get("group_size") or 0, r["recipe"]))
    path.write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / "results.md").write_text(markdown(rows))


def trained(r) -> str:
    """Trainable fraction, and for DL-QAT rows the learning rates they ran with (the defaults changed once)."""
    if not r.get("trainable_fraction"):
        return "–"
    lrs = f" (lr {r['dl_lr_lora']:g}/{r['dl_lr_magnitude']:g})" if r.get("dl_lr_lora") else ""
    return f"{r['trainable_fraction']:.2%}{lrs}"


def calib_cell(r) -> str:
    """Calibration budget; a Block-AP row also says its epochs per block (the default became step-based: 4 at 64 samples)."""
    calib = r.get("calib") or "–"
    calib = f"{calib}, {r['epochs']} ep" if r["recipe"] == "block-ap" and r.get("epochs") else calib
    calib = f"{calib}, {r['iters']} it" if r.get("iters") else calib
    return f"{calib}, seed {r['seed']}" if r.get("seed") else calib


def sensitivity_cell(r) -> str:
    """A mixed row allocated with a variant of the sensitivity (bench/mixed_sensitivity.py) says which."""
    return f", {r['sensitivity']} sensitivity" if r.get("sensitivity") else ""


def markdown(rows) -> str:
    head = ("| recipe | setting | calib | held-out ppl | zero-shot avg | bits/weight | size MiB | wall s (quant) | peak RSS MiB (quant) "
            "| train/matmul throughput | trained params (DL-QAT lr LoRA/magnitude) | device |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        frac = f"{r['throughput_fraction']:.0%} ({r['train_gflops']:.0f}/{r['matmul_gflops']:.0f} GFLOP/s)" if r.get("throughput_fraction") else "–"
        lines.append(
            f"| {r['recipe']} | {r['setting']}{sensitivity_cell(r)} | {calib_cell(r)} | {r['heldout_ppl']:,.2f} | "
            f"{'–' if r.get('zeroshot_avg') is None else format(r['zeroshot_avg'], '.3f')} | {float(r['bits_per_weight']):.2f} | {r['size_on_disk_mib']:.0f} | "
            f"{r.get('quant_wall_s', '–')} | {r.get('quant_peak_rss_mib', r['peak_rss_mib']):,.0f} | {frac} | "
            f"{trained(r)} | {r['device']} |"
        )
    proto = rows[0]
    engines = sorted({r.get("zeroshot_engine", "lm-eval") for r in rows})
    note = (f"\nModel {proto['model']}; held-out: Shakespeare, {proto['ppl_protocol']}; zero-shot: piqa, arc_easy, "
            f"arc_challenge, hellaswag, winogrande, 0-shot acc, first {proto['zeroshot_limit']} items each "
            f"(scored by {' / '.join(engines)}; 'plain' is qatlm's own PyTorch scorer of the same items, used where lm-eval is not installed).\n"
            "CPU rows compute in fp32; GPU rows hold bf16 weights and train under bf16 autocast with fp32 master copies.\n")
    return "\n".join(lines) + "\n" + note


def block_ap_fields(pairs: list[str]) -> dict:
    """``["clip_grad=1.0", "train_norms=false"]`` -> typed BlockAPConfig keyword arguments."""
    import dataclasses

    from qatlm.methods.block_ap import BlockAPConfig
    from qatlm.options import _base_type

    fields = {f.name: f for f in dataclasses.fields(BlockAPConfig)}
    out = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        if k not in fields:
            raise SystemExit(f"--block-ap: BlockAPConfig has no field {k}")
        t = _base_type(fields[k].type)
        out[k] = (v.lower() in ("1", "true", "yes", "on")) if t is bool else (None if v == "none" else t(v))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="fp,rtn,block-ap")
    ap.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--settings", default="w2g64,w3g128,w4g128")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=None, help="Block-AP epochs (default: BlockAPConfig's)")
    ap.add_argument("--block-loss", default=None, choices=("mse", "mse-capped"), help="Block-AP reconstruction loss: mse or mse-capped (default: BlockAPConfig's)")
    ap.add_argument("--block-ap", action="append", default=[], metavar="FIELD=VALUE",
                    help="set any BlockAPConfig field for the block-ap rows, e.g. clip_grad=1.0 or train_norms=false (repeatable)")
    ap.add_argument("--e2e-samples", type=int, default=64, help="E2E-QP training samples for the +e2e-qp recipes")
    ap.add_argument("--e2e-data", default="wikipedia", help="E2E-QP data: wikipedia (continual pre-training) or sciq-instruct (instruction tuning)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration draw, shuffling and initialisation (the seed-spread rows)")
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande")
    ap.add_argument("--e2e-lr", type=float, default=None, help="E2E-QP step-size learning rate (default: E2EQPConfig's, step-budget scaled)")
    ap.add_argument("--dl-lr-lora", type=float, default=None, help="DL-QAT LoRA learning rate (default: DLQATConfig's)")
    ap.add_argument("--dl-lr-magnitude", type=float, default=None, help="DL-QAT magnitude learning rate (default: DLQATConfig's)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: bf16 weights, bf16 autocast training with fp32 master copies")
    ap.add_argument("--zeroshot-engine", default="lm-eval", choices=("lm-eval", "plain"),
                    help="plain: qatlm's own PyTorch scorer of the same items (checked equal to lm-eval in the tests); for machines without lm-eval")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge rows measured elsewhere (e.g. on a GPU machine) into the results and exit")
    ap.add_argument("--sensitivity", default="block", choices=("block", "propagated", "clipped"),
                    help="mixed settings: qatlm's sensitivity (block) or a variant of bench/mixed_sensitivity.py")
    ap.add_argument("--one", nargs=2, metavar=("RECIPE", "SETTING"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.merge:
        save_rows([r for f in a.merge for r in json.loads(Path(f).read_text())])
        return
    if a.one:
        a.recipe, a.setting = a.one
        a.setting = None if a.setting == "-" else a.setting
        print("ROW " + json.dumps(run_one(a)), flush=True)
        return
    jobs = []
    for recipe in a.recipes.split(","):
        if recipe == "fp":
            jobs.append(("fp", "-"))
        else:
            jobs += [(recipe, s) for s in a.settings.split(",")]
    for recipe, setting in jobs:
        cmd = [sys.executable, __file__, "--one", recipe, setting] + [
            f"--calib-samples={a.calib_samples}", f"--calib-seqlen={a.calib_seqlen}", f"--e2e-samples={a.e2e_samples}", f"--e2e-data={a.e2e_data}",
            f"--ppl-windows={a.ppl_windows}", f"--limit={a.limit}", f"--tasks={a.tasks}",
            f"--device={a.device}", f"--zeroshot-engine={a.zeroshot_engine}", f"--seed={a.seed}",
            f"--sensitivity={a.sensitivity}"]
        cmd += [f"--e2e-lr={a.e2e_lr}"] if a.e2e_lr is not None else []
        cmd += [f"--epochs={a.epochs}"] if a.epochs is not None else []
        cmd += [f"--model={a.model}"] if a.model else []
        cmd += [f"--block-loss={a.block_loss}"] if a.block_loss else []
        cmd += [f"--block-ap={kv}" for kv in a.block_ap]
        cmd += [f"--dl-lr-lora={a.dl_lr_lora}"] if a.dl_lr_lora is not None else []
        cmd += [f"--dl-lr-magnitude={a.dl_lr_magnitude}"] if a.dl_lr_magnitude is not None else []
        print(f"== {recipe} {setting}", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        rows = [json.loads(line[4:]) for line in out.stdout.splitlines() if line.startswith("ROW ")]
        if out.returncode or not rows:
            print(f"   failed (exit {out.returncode})", file=sys.stderr)
            continue
        r = rows[0]
        zs = "–" if r.get("zeroshot_avg") is None else f"{r['zeroshot_avg']:.3f}"
        print(f"   ppl {r['heldout_ppl']:.2f}  zero-shot {zs}  wall {r['wall_s']}s", file=sys.stderr, flush=True)
        save_rows(rows)


if __name__ == "__main__":
    main()
