"""Command line: ``qatlm quantize | info | eval | compare | assets | demo``.

Every user error ends as one line on stderr (``qatlm: error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import json
import sys
import time
from pathlib import Path

from qatlm.errors import QatlmError, check_device

DEFAULT_MODEL_HELP = "local HF model folder (safetensors); default: the built-in SmolLM2-135M-Instruct"


def _stage_prefix(cls, command: str) -> str:
    """In ``quantize`` (and the demo) the end-to-end stage's shared fields are ``--e2e-*``; in ``train`` it is
    the only stage and its flags carry no prefix."""
    from qatlm.recipes import is_quantizer_cls

    return "" if command == "train" or is_quantizer_cls(cls) else "e2e-"


def _add_recipe_flags(p: argparse.ArgumentParser, command: str, defaults: dict | None = None) -> None:
    """Every flag of every stage config a recipe of ``command`` may use, generated from the dataclass fields."""
    from qatlm.options import add_flags, config_flags
    from qatlm.recipes import RECIPES, STAGES, TRAINERS

    classes = list(TRAINERS.values()) if command == "train" else list(dict.fromkeys(c for cs in RECIPES.values() for c in cs))
    seen: set = set()
    for cls in classes:
        flags = config_flags(cls, _stage_prefix(cls, command))
        grid = [f for f in flags if f.path[0] == "grid"]
        if grid:
            add_flags(p, grid, "grid", defaults, seen)
        own = [f for f in flags if f.path[0] != "grid"]
        name = STAGES[cls][0]
        if name == "e2e-qp":  # its fields are the end-to-end loop's, shared with dl-qat
            title = ("end-to-end training (e2e-qp and dl-qat)" if command == "train" else
                     "the end-to-end stage of efficientqat, dl-qat and efficientqat+dl-qat (--e2e-*)")
        else:
            title = f"{name} only" if name == "dl-qat" else name
        add_flags(p, own, title, defaults, seen)


# old spellings: a recipe with no calibrated stage (dl-qat: RTN, then DL-QAT) reads these as its training stage's
_TRAIN_STAGE_SPELLINGS = {"calib": "data", "calib_samples": "samples", "calib_seqlen": "seqlen", "val_samples": "val_samples",
                          "seed": "seed", "epochs": "epochs", "batch_size": "batch_size"}


def _recipe_from_args(a, command: str, preset: dict | None = None) -> list:
    """The stage configs of ``a.method`` from the flags the user typed; a typed flag that no stage of the recipe
    takes is refused in one line (never silently dropped). ``preset``: values by flag dest applied when not typed."""
    from qatlm.options import config_flags, refuse_extra, typed, values_for
    from qatlm.recipes import RECIPES, TRAINERS, build_recipe, is_quantizer_cls

    given = typed(a)
    all_given = {**(preset or {}), **given}
    if command == "train":
        if a.method not in TRAINERS:
            raise QatlmError(f"unknown training method '{a.method}'; choose {' or '.join(TRAINERS)}")
        classes, name = [TRAINERS[a.method]], a.method
    else:
        if a.method not in RECIPES:
            raise QatlmError(f"unknown method '{a.method}'; choose one of {', '.join(RECIPES)}")
        classes, name = RECIPES[a.method], a.method
    values, given_sets, used = [], [], set()
    for cls in classes:
        flags = config_flags(cls, _stage_prefix(cls, command))
        values.append(values_for(flags, all_given))
        given_sets.append(set(values_for(flags, all_given)))  # a preset (the demo's budget) counts as chosen
        used |= {f.dest for f in flags}
    if command != "train" and len(classes) > 1 and not any(hasattr(c, "calib") for c in classes if is_quantizer_cls(c)):
        aliased = set()
        for old, field in _TRAIN_STAGE_SPELLINGS.items():
            dest = f"{old}@"
            if dest in all_given and dest not in used:
                values[-1].setdefault(field, all_given[dest])
                if dest in given:
                    given_sets[-1].add(field)
                aliased.add(dest)
        used |= aliased
    refuse_extra(given, used, f"--method {name}")
    if command == "train":
        from qatlm.options import build

        return [build(classes[0], values[0])]
    return build_recipe(name, values, given_sets)


KERNEL_HELP = ("packed layers: auto (default: cache when the float weights fit in a quarter of the free memory, else plain), "
               "cache (dequantize once and keep the float weights: fastest), int4 (torch's CPU int4 matmul where the grid allows: "
               "no float weights), or plain (dequantize every call: the least memory)")


def _add_eval_args(p: argparse.ArgumentParser, limit: int = 100):
    p.add_argument("--heldout", default="shakespeare", help="held-out text: shakespeare, wikipedia, or a .txt/.jsonl/.parquet/dataset folder")
    p.add_argument("--seqlen", type=int, default=512, help="perplexity window length (default 512)")
    p.add_argument("--ppl-windows", type=int, default=40, help="number of perplexity windows, 0 = the whole text (default 40)")
    p.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande", help="comma-separated zero-shot tasks, or 'none'")
    p.add_argument("--limit", type=int, default=limit, help=f"items per zero-shot task, 0 = all (default {limit})")
    p.add_argument("--eval-batch-size", type=int, default=8, help="zero-shot batch size (default 8)")
    p.add_argument("--kernel", default="auto", choices=["auto", "cache", "int4", "plain"], help=KERNEL_HELP)


def _eval_settings(a):
    from qatlm.eval.report import EvalSettings

    tasks = () if a.tasks in ("", "none") else tuple(t.strip() for t in a.tasks.split(","))
    from qatlm.eval.zeroshot import PAPER_TASKS

    for t in tasks:
        if t not in PAPER_TASKS:
            raise QatlmError(f"unknown zero-shot task '{t}'; choose from {', '.join(PAPER_TASKS)}")
    return EvalSettings(heldout=a.heldout, seqlen=a.seqlen, ppl_windows=a.ppl_windows or None, tasks=tasks,
                        limit=a.limit or None, batch_size=a.eval_batch_size, device=a.device, cache_dir=a.cache_dir,
                        kernel=a.kernel)


def _add_common(p: argparse.ArgumentParser):
    p.add_argument("--device", default="cpu", help="torch device (default cpu; fp32 on CPU, bf16 on GPU)")
    p.add_argument("--cache-dir", default=None, help="where built-in assets are cached (default $QATLM_CACHE or ~/.cache/qatlm)")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other qatlm error."""

    def error(self, message):
        self.exit(2, f"qatlm: error: {message} (see '{self.prog} --help')\n")


# the demo's budget: ~10 minutes on 2 CPU cores, at a setting where QAT's gain over RTN is plain
DEMO_BUDGET = {"bits": 3, "group_size": 128, "calib_samples": 32, "calib_seqlen": 256, "val_samples": 4, "epochs": 2}


def build_parser() -> argparse.ArgumentParser:
    from qatlm.api import METHODS
    from qatlm.recipes import STAGES

    from qatlm.version import __version__

    ap = _Parser(prog="qatlm", description="Quantization-aware training of Hugging Face causal LMs into packed low-bit integer models.")
    ap.add_argument("--version", action="version", version=f"qatlm {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a model and save a packed GPTQ-format checkpoint")
    q.add_argument("--model", default=None, help=DEFAULT_MODEL_HELP)
    q.add_argument("--method", default="rtn", help="quantization recipe: " + "; ".join(
        f"{n} = {' then '.join(STAGES[c][0] for c in cs)}" for n, cs in METHODS.items()) + " (default rtn)")
    q.add_argument("--out", required=True, help="output folder for the packed checkpoint")
    q.add_argument("--overwrite", action="store_true", help="replace the output folder (and any unfinished run) if it exists")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run (Block-AP: from its last finished block)")
    q.add_argument("--save-dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                   help="storage dtype of the unquantized tensors (embeddings, norms, head); auto (default) = the source "
                        "checkpoint's dtype as shipped (float16 for the built-in model)")
    _add_common(q)
    _add_recipe_flags(q, "quantize")

    t = sub.add_parser("train", help="train a packed checkpoint end to end (e2e-qp: step sizes only) and save it")
    t.add_argument("--method", default="e2e-qp", help="training method: e2e-qp (default: step sizes only) or dl-qat (magnitudes + LoRA in the grid)")
    t.add_argument("--from", dest="src", required=True, help="packed qatlm/GPTQ checkpoint to start from (RTN or Block-AP output)")
    t.add_argument("--out", required=True, help="output folder for the trained checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace the output folder (and any unfinished run)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    _add_common(t)
    _add_recipe_flags(t, "train")

    for name, helptext in (("eval", "evaluate one model (fp folder or checkpoint): held-out perplexity and zero-shot"),
                           ("compare", "evaluate several models and write one table (Markdown + JSON) and a bar chart")):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("paths", nargs="*" if name == "compare" else "?", help="model folders, qatlm checkpoints or GGUF files (read by transformers' GGUF loader) (default: the built-in model)")
        _add_eval_args(e)
        e.add_argument("--out", default=None if name == "eval" else "qatlm-report", help="folder for report.md / report.json / report.png")
        _add_common(e)

    s = sub.add_parser("assets", help="list the built-in assets and fetch what is missing")
    s.add_argument("--list", action="store_true", help="only list, fetch nothing")
    _add_common(s)

    d = sub.add_parser("demo", help="first-run demo (~10 min on 2 CPU cores): quantize the built-in SmolLM2 to 3 bits with RTN and "
                       "with Block-AP (quantization-aware), evaluate both against full precision, write report.md/png with the training curves")
    d.add_argument("--out", default="qatlm-demo", help="demo folder (checkpoints + report), default ./qatlm-demo")
    d.add_argument("--model", default=None, help=DEFAULT_MODEL_HELP)
    d.add_argument("--method", default="block-ap", choices=list(METHODS),
                   help="the QAT recipe shown beside RTN (default block-ap; rtn shows RTN alone)")
    _add_eval_args(d, limit=50)
    _add_common(d)
    _add_recipe_flags(d, "demo", defaults={f"--{k.replace('_', '-')}": v for k, v in DEMO_BUDGET.items()})

    x = sub.add_parser("export", help="write a packed checkpoint in another runtime's format (gptq, gptq-v1, gguf, compressed-tensors); "
                                      "a float model folder to an f16/f32 gguf")
    x.add_argument("src", help="qatlm / GPTQ checkpoint folder")
    x.add_argument("--format", required=True, help="gptq (v2), gptq-v1, gguf (llama.cpp) or compressed-tensors (vLLM)")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--float-type", default="f16", help="gguf: storage of the tensors that are not quantized, f16 (default) or f32")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    g = sub.add_parser("generate", help="generate text with a checkpoint (qatlm packed or full precision), streamed")
    g.add_argument("path", nargs="?", help="checkpoint folder (default: the built-in SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", required=True, help="the prompt")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--kernel", default="auto", choices=["auto", "cache", "int4", "plain"], help=KERNEL_HELP)
    g.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)

    i = sub.add_parser("info", help="describe a packed checkpoint: bits, group size, size on disk, compression")
    i.add_argument("path", help="checkpoint folder")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")

    r = sub.add_parser("install", help="install an optional runtime beside your torch (gptq: what transformers needs to load GPTQ exports)")
    r.add_argument("runtime", choices=sorted(RUNTIMES), help="the runtime to install")
    r.add_argument("--dry-run", action="store_true", help="print the pip command instead of running it")
    return ap


# Optional runtimes whose packages pin a torch build that pip would swap in (gptqmodel 7.7 asks for torch>=2.14.1,
# a multi-GB CUDA wheel on a CPU machine): installed with --no-deps beside the torch already present, with their
# pure-Python dependencies pinned here (the versions the tests reload GPTQ exports with).
RUNTIMES = {
    "gptq": ["gptqmodel==7.7.0", "optimum==2.3.0", "device-smi==0.5.7", "pypcre==0.6.4", "tokenicer==0.0.14",
             "logbar==0.4.15", "defuser==0.0.28", "threadpoolctl>=3.7"],
}


def cmd_install(a) -> int:
    import subprocess

    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *RUNTIMES[a.runtime]]
    if a.dry_run:
        print(" ".join(cmd))
        return 0
    print(f"installing the {a.runtime} runtime: {' '.join(cmd[3:])}", file=sys.stderr)
    if subprocess.call(cmd) != 0:
        raise QatlmError(f"pip could not install the {a.runtime} runtime (command: {' '.join(cmd)})")
    check = subprocess.run([sys.executable, "-c", "import gptqmodel, optimum"], capture_output=True, text=True)
    if check.returncode != 0:
        raise QatlmError(f"the {a.runtime} runtime was installed but does not import: {check.stderr.strip().splitlines()[-1]}")
    print(f"{a.runtime} runtime installed: transformers now loads qatlm's GPTQ exports", file=sys.stderr)
    return 0


def _resolve_model(arg, cache_dir=None) -> Path:
    if arg:
        return Path(arg)
    from qatlm.data.assets import default_model_dir

    return default_model_dir(cache_dir)


def _source_meta(method: str, model_dir: Path, cache_dir) -> dict:
    """What a checkpoint records of its origin: the method, the source model's name (not its path) and dtype."""
    from qatlm.model.checkpoint import source_dtype

    dt = source_dtype(model_dir, cache_dir, builtin_fp16=False)
    return {"method": method, "source": model_dir.name, "source_dtype": str(dt).removeprefix("torch.")}


def _text_input(source):
    """A calibration / training source given as a path (None for built-in names)."""
    return source if source and Path(str(source)).expanduser().exists() else None


def _data_parallel(device: str) -> tuple[int, int, str]:
    """(processes, rank, device) under ``torchrun`` / ``accelerate launch`` (torch.distributed is initialised
    here: gloo on CPU, NCCL with one GPU per process, ``cuda:LOCAL_RANK``); (1, 0, device) otherwise."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_world_size(), dist.get_rank(), device


def cmd_quantize(a) -> int:
    import shutil

    import torch

    from qatlm.io import check_output, claim_work_dir, output_lock, source_fingerprint, work_dir_guard
    from qatlm.model.checkpoint import _check_model_dir, load_fp_model, load_tokenizer, save_quantized, source_dtype
    from qatlm.model.arch import find_parts, quant_targets
    from qatlm.model.lazy import LazyUnsupported, load_lazy_model

    from qatlm.methods.base import Context
    from qatlm.recipes import grid_of, run_recipe

    stages = _recipe_from_args(a, "quantize")
    spec = grid_of(stages)
    world, rank, device = _data_parallel(a.device)
    if world > 1 and a.method != "block-ap":
        raise QatlmError(f"--method {a.method} runs in one process; data-parallel quantize (torchrun) is for block-ap "
                         "(train e2e-qp / dl-qat with torchrun instead)")
    main = rank == 0
    out = Path(a.out).expanduser()
    work = out.parent / f"{out.name}.work"  # resumable state of a training method, removed when done
    model_dir = _check_model_dir(_resolve_model(a.model, a.cache_dir))
    # --resume continues an unfinished run; a finished output is never redone or replaced without --overwrite
    check_output(out, [model_dir] + [_text_input(getattr(s, k, None)) for s in stages for k in ("calib", "data")], a.overwrite)
    quiet = contextlib.nullcontext()
    with output_lock(out) if main else quiet:
        if main:
            if not a.resume and work.exists() and a.overwrite:
                shutil.rmtree(work)
            claim_work_dir(work, source_fingerprint(model_dir), a.resume)
        if world > 1:
            torch.distributed.barrier()  # the work folder is claimed before any process uses it
        with work_dir_guard(work) if main else quiet:
            t0 = time.time()
            # RTN and Block-AP go block by block: the model is read lazily, each block from the shards
            # when its turn comes, and dropped once packed (host memory flat in the number of blocks)
            lazy = len(stages) == 1 and getattr(type(stages[0]), "streams", False) and not getattr(stages[0], "lm_head", False)
            if main:
                print(f"loading {model_dir}{' (block by block)' if lazy else ''}"
                      f"{f', {world} data-parallel processes' if world > 1 else ''}", file=sys.stderr)
            model = None
            if lazy:
                try:
                    model = load_lazy_model(model_dir, device=device)
                except LazyUnsupported as e:
                    print(f"loading the whole model instead: {e}", file=sys.stderr)
                    lazy = False
            if model is None:
                model = load_fp_model(model_dir, device=device)
            tok = load_tokenizer(model_dir)
            if main:
                print(f"quantizing with {a.method} at {spec.tag}", file=sys.stderr)
            widths = [m.in_features for m in quant_targets(find_parts(model).layers[0]).values()]
            if main and widths and spec.group_size > max(widths):
                print(f"note: group size {spec.group_size} is larger than every layer's input width (at most "
                      f"{max(widths)}): each output row is one group, i.e. per-channel quantization", file=sys.stderr)
            ctx = Context(tokenizer=tok, device=device, work_dir=work, resume=a.resume, cache_dir=a.cache_dir)
            summary = run_recipe(model, stages, None, ctx)
            if main:
                dtype = source_dtype(model_dir, a.cache_dir) if a.save_dtype == "auto" else getattr(torch, a.save_dtype)
                meta = {**_source_meta(a.method, model_dir, a.cache_dir), "seconds": round(time.time() - t0, 1)}
                save_quantized(model, out, spec, tokenizer=tok, overwrite=a.overwrite, meta=meta, dtype=dtype,
                               report=lambda tmp: _save_training_report(summary, work, tmp), block_files=work if lazy else None)
        if world > 1:
            torch.distributed.barrier()  # nobody removes the work folder while another process still reads it
        if main:
            shutil.rmtree(work, ignore_errors=True)
    if world > 1:
        torch.distributed.destroy_process_group()
    if main:
        print(f"saved {out} in {time.time() - t0:.1f}s", file=sys.stderr)
        _print_info(str(out), as_json=False)
    return 0


def _without_local_paths(obj):
    """A shared artefact names data files, not the user's directories: path values keep their last part."""
    if isinstance(obj, dict):
        return {k: _without_local_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_without_local_paths(v) for v in obj]
    if isinstance(obj, str) and "/" in obj and Path(obj).expanduser().exists():
        return Path(obj).name
    return obj


def _save_training_report(summary: dict, work: Path, out: Path):
    """Keep the training log, a loss-curve PNG and the summary beside the checkpoint."""
    if "method" not in summary or summary["method"] == "rtn":
        return
    (out / "training_summary.json").write_text(json.dumps(_without_local_paths(summary), indent=2) + "\n")
    logs = [f for f in (work / "train_log.jsonl", *sorted(work.glob("stage-*/train_log.jsonl"))) if f.exists()]
    if logs:
        (out / "training_log.jsonl").write_text("".join(f.read_text() for f in logs))
        from qatlm.eval.plots import loss_curve

        loss_curve(out / "training_log.jsonl", out / "training_loss.png", summary if summary.get("blocks") else None)
    if summary.get("val_loss_before") is not None:
        print(f"validation loss {summary['val_loss_before']:.4f} -> {summary['val_losses'][-1]:.4f}", file=sys.stderr)
    if not summary.get("blocks"):
        return
    print("block  error(RTN)   error(trained)  change   (squared error / energy of the fp block's contribution)", file=sys.stderr)
    for b in summary["blocks"]:
        flag = "  kept RTN" if b.get("rtn_fallback") else "  (0.1x lr)" if b.get("lr_retried") else ""
        print(f"{b['block']:>5}  {b['rtn_mse']:.4e}   {b['trained_mse']:.4e}      {100 * (b['trained_mse'] / b['rtn_mse'] - 1):+.1f}%{flag}",
              file=sys.stderr)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _print_info(path: str, as_json: bool):
    from qatlm.model.checkpoint import checkpoint_info

    info = checkpoint_info(path)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    g = "per-channel" if info["group_size"] == -1 else str(info["group_size"])
    src = f" from {info['source']}" if info.get("source") else ""
    vs_src = (f"; {info['compression_vs_source']:.2f}x vs the source in {info['source_dtype']}"
              if info.get("compression_vs_source") else "")
    rows = [
        ("checkpoint", info["path"]),
        ("method", f"{info['method']}{src}"),
        ("grid", f"{info['bits']}-bit, group {g}, {'symmetric' if info['sym'] else 'asymmetric'}, {info['format']}"
                 if info.get("grid", "uniform") == "uniform" else
                 f"llama.cpp {info['grid'].upper()} (layers whose width is not a multiple of 256: 4-bit groups of 32, GGUF Q4_0); "
                 "loads in qatlm; for llama.cpp / transformers: qatlm export --format gguf"),
        ("quantized weights", f"{info['quantized_params']:,} at {info['bits_per_quantized_weight']:.3f} bits each (scales, zeros, g_idx included)"),
        ("full precision", f"{info['other_params']:,} parameters in {info['other_dtype'] or '-'}: {', '.join(info['kept_in_full_precision']) or 'nothing'}"),
        ("bits per weight", f"{info['bits_per_weight_all']:.2f} over all parameters"),
        ("size on disk", f"{_fmt_bytes(info['size_on_disk_bytes'])} (weights {_fmt_bytes(info['weights_bytes'])}, of which "
                         f"embeddings/head {100 * info['embedding_share']:.0f}%)"),
        ("compression", f"{info['compression_vs_fp16']:.2f}x vs fp16 ({_fmt_bytes(info['fp16_size_bytes'])}){vs_src}"),
    ]
    t = info.get("training")
    if t:
        if "blocks" in t:
            fb = t.get("rtn_fallback_blocks") or []
            rows.append(("training", f"Block-AP over {t['blocks']} blocks, {t['steps_per_block']} steps each; mean block error "
                                     f"{t['block_error_rtn_mean']:.3g} (RTN) -> {t['block_error_trained_mean']:.3g} (trained)"
                                     + (f"; blocks kept at RTN: {fb}" if fb else "")))
        for key, name in (("e2e_val_loss", "E2E-QP"), ("dl_qat_val_loss", "DL-QAT")):
            if t.get(key):
                rows.append(("", f"{name} validation loss {t[key][0]:.4f} -> {t[key][1]:.4f}"))
        if t.get("val_loss_after") is not None and t.get("val_loss_before") is not None:
            rows.append(("training", f"{t.get('method')}: {t.get('steps')} steps, validation loss {t['val_loss_before']:.4f} -> "
                                     f"{t['val_loss_after']:.4f}"))
    if info.get("grid", "uniform") != "uniform":
        rows += [("loads in", "qatlm (load_quantized, qatlm eval/generate)"),
                 ("", f"llama.cpp and transformers (GGUF loader): qatlm export {info['path']} --format gguf --out DIR "
                      "(bit-exact: the stored blocks are the GGUF tensors)")]
    else:
        rows += [
        ("loads in", "qatlm (load_quantized, qatlm eval/generate); " + (
            f"GPTQModel.load (qatlm install gptq); its {info['expert_layers']} per-expert layers are NOT read by transformers' "
            "from_pretrained, which keeps fused experts and would leave them random" if info.get("expert_layers") else
            "transformers + gptqmodel as it is (qatlm install gptq)")),
        ("", f"vLLM: qatlm export {info['path']} --format gptq (or compressed-tensors) --out DIR"),
        ("", f"llama.cpp: qatlm export {info['path']} --format gguf --out DIR"),
        ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


def cmd_info(a) -> int:
    _print_info(a.path, a.json)
    return 0


def cmd_eval(a) -> int:
    from qatlm.eval.report import evaluate, markdown_table, write_report

    settings = _eval_settings(a)
    paths = ([a.paths] if isinstance(a.paths, str) else a.paths) or [str(_resolve_model(None, a.cache_dir))]
    rows = [evaluate(p, settings) for p in paths]
    print(markdown_table(rows))
    if a.out:
        files = write_report(rows, a.out)
        print(f"report: {files['markdown']}  {files['json']}  {files['chart']}", file=sys.stderr)
    elif a.command == "eval":
        print(json.dumps(rows[0], indent=2))
    return 0


def cmd_assets(a) -> int:
    from qatlm.data import assets

    if not a.list:
        assets.fetch_all(a.cache_dir)
    print(f"cache: {assets.cache_root(a.cache_dir)}")
    for name, package, ok in assets.status(a.cache_dir):
        print(f"  {'cached ' if ok else 'missing'}  {name:<36} from {package}")
    return 0


class _StageClock:
    """Overall progress of a multi-stage job with a time estimate: each stage has a prior estimate (seconds on
    a 2-core CPU); the remaining time is the remaining estimates scaled by how fast the done stages went."""

    def __init__(self, stages: list[tuple[str, float]]):
        self.stages, self.t0, self.done = stages, time.time(), []

    def start(self, i: int):
        name = self.stages[i][0]
        elapsed = time.time() - self.t0
        est_done = sum(e for _, e in self.stages[:i])
        speed = elapsed / est_done if est_done and elapsed > 5 else 1.0
        left = speed * sum(e for _, e in self.stages[i:])
        print(f"[qatlm demo] step {i + 1}/{len(self.stages)}: {name}  (elapsed {elapsed / 60:.1f} min, "
              f"about {left / 60:.1f} min left)", file=sys.stderr, flush=True)


def cmd_demo(a) -> int:
    import shutil

    from qatlm.data import assets
    from qatlm.eval.plots import loss_curve
    from qatlm.eval.report import evaluate, markdown_table, write_report
    from qatlm.methods.base import Context
    from qatlm.methods.rtn import RTNConfig
    from qatlm.io import check_output
    from qatlm.model.checkpoint import _check_model_dir, load_fp_model, load_tokenizer, save_quantized, source_dtype
    from qatlm.recipes import grid_of, run_recipe

    recipe = _recipe_from_args(a, "demo", preset={f"{k}@": v for k, v in DEMO_BUDGET.items()})
    grid = grid_of(recipe)
    settings = _eval_settings(a)
    out = Path(a.out).expanduser()
    tag = grid.tag
    methods = ["rtn"] if a.method == "rtn" else ["rtn", a.method]
    stages = [("fetch the built-in assets", 30), ("evaluate full precision", 70)]
    for m in methods:
        stages += [(f"quantize with {m} at {tag}", 10 if m == "rtn" else 300), (f"evaluate {m} {tag}", 70)]
    stages.append(("write the report", 5))
    clock = _StageClock(stages)
    clock.start(0)
    assets.fetch_all(a.cache_dir)
    model_dir = _check_model_dir(_resolve_model(a.model, a.cache_dir))
    check_output(out, [model_dir], overwrite=True, what="demo folder")  # its runs are replaced, never the model
    name = model_dir.name
    tok = load_tokenizer(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock.start(1)
    rows = [evaluate(model_dir, settings, label=f"{name} (full precision)")]
    for k, m in enumerate(methods):
        clock.start(2 + 2 * k)
        cfgs = [RTNConfig(grid=grid)] if m == "rtn" else recipe
        qdir = out / f"{name}-{m}-{tag}"
        work = out / f".{qdir.name}.work"
        shutil.rmtree(work, ignore_errors=True)
        model = load_fp_model(model_dir, device=a.device)
        summary = run_recipe(model, cfgs, None, Context(tokenizer=tok, device=a.device, work_dir=work, cache_dir=a.cache_dir))
        meta = _source_meta(m, model_dir, a.cache_dir)
        save_quantized(model, qdir, grid, tokenizer=tok, overwrite=True, meta=meta, dtype=source_dtype(model_dir, a.cache_dir),
                       report=lambda tmp, summary=summary, work=work: _save_training_report(summary, work, tmp))
        shutil.rmtree(work, ignore_errors=True)
        del model
        clock.start(3 + 2 * k)
        rows.append(evaluate(qdir, settings, label=f"{m} {tag}"))
        if (qdir / "training_log.jsonl").exists():
            loss_curve(qdir / "training_log.jsonl", out / "training_curves.png", summary)
    clock.start(len(stages) - 1)
    files = write_report(rows, out, title=f"qatlm demo: {name}, RTN vs {methods[-1]} at {tag}",
                         curves="training_curves.png" if (out / "training_curves.png").exists() else None)
    print(markdown_table(rows))
    print(f"report: {files['markdown']}  {files['chart']}  (total {(time.time() - clock.t0) / 60:.1f} min)", file=sys.stderr)
    return 0


def cmd_train(a) -> int:
    import shutil

    import torch
    from accelerate import PartialState

    from qatlm.io import check_output, claim_work_dir, output_lock, source_fingerprint, work_dir_guard
    from qatlm.memory import adapt_to_free_memory
    from qatlm.methods.base import Context
    from qatlm.model.checkpoint import load_quantized, load_tokenizer, read_quant_config, save_quantized, spec_from_config, weights_size
    from qatlm.recipes import run_recipe

    [config] = _recipe_from_args(a, "train")
    state = PartialState(cpu=not torch.cuda.is_available() or torch.device(a.device).type == "cpu")
    src, qc = read_quant_config(a.src)
    if spec_from_config(qc).kformat is not None:
        raise QatlmError(f"{a.method} trains uniform grids only; {src} is on the {spec_from_config(qc).format} grid "
                         "(use rtn or block-ap for K-quant grids)")
    out = Path(a.out).expanduser()
    work = out.parent / f"{out.name}.work"
    lock = contextlib.nullcontext()
    if state.is_main_process:
        check_output(out, [src, _text_input(config.data)], a.overwrite)
        lock = output_lock(out)
    with lock:
        if state.is_main_process:
            if not a.resume and work.exists() and a.overwrite:
                shutil.rmtree(work)
            claim_work_dir(work, source_fingerprint(src), a.resume)
        state.wait_for_everyone()
        guard = work_dir_guard(work) if state.is_main_process else contextlib.nullcontext()
        with guard:
            tok = load_tokenizer(src)
            if tok is None:
                raise QatlmError(f"{src} has no tokenizer files; training needs one")
            t0 = time.time()
            device = a.device if state.num_processes == 1 else "cpu"
            adapt_to_free_memory(weights_size(src), device)
            model = load_quantized(src, device=device)
            summary = run_recipe(model, [config], None, Context(tokenizer=tok, device=a.device, work_dir=work, resume=a.resume,
                                                                cache_dir=a.cache_dir))
            if "cost" in summary:
                c = summary["cost"]
                print(f"trained {c['trainable_params']:,} parameters: magnitudes {c['magnitude_params']:,}, LoRA rank {c['rank']} "
                      f"{c['lora_params']:,} ({100 * summary['trainable_fraction']:.2f}% of the model)", file=sys.stderr)
            if state.is_main_process:
                prev = qc.get("meta", {}).get("qatlm", {}).get("method", "gptq")
                meta = {"method": f"{prev}+{a.method}", "source": src.name, "seconds": round(time.time() - t0, 1)}
                save_quantized(model, out, spec_from_config(qc), tokenizer=tok, overwrite=a.overwrite, meta=meta,
                               report=lambda tmp: _save_training_report(summary, work, tmp))
                shutil.rmtree(work, ignore_errors=True)
                print(f"saved {out} in {time.time() - t0:.1f}s", file=sys.stderr)
        state.wait_for_everyone()
    return 0


def cmd_export(a) -> int:
    from qatlm.export import FORMATS, export_checkpoint

    fmt = a.format.lower().replace("_", "-")
    fmt = {"gptq-v2": "gptq", "ct": "compressed-tensors"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise QatlmError(f"unknown export format '{a.format}'; choose one of {', '.join(FORMATS)}")
    from qatlm.io import output_lock

    print(f"exporting {a.src} as {fmt} ...", file=sys.stderr)
    with output_lock(Path(a.out).expanduser()):
        r = export_checkpoint(a.src, fmt, a.out, overwrite=a.overwrite, float_type=a.float_type)
    if r.get("warning"):
        print(f"qatlm: warning: {r['warning']}", file=sys.stderr)
    checks = []
    if "reload_max_logit_diff" in r:
        checks.append(f"reloaded, logits identical (max diff {r['reload_max_logit_diff']:.3g})")
    if "max_abs_error" in r:
        types = ", ".join(f"{k} x{v}" for k, v in r["ggml_types"].items()) if r.get("ggml_types") else r["ggml_type"]
        checks.append(f"{r['tensors']} tensors decoded with gguf's dequantizer, max weight error {r['max_abs_error']:.3g} "
                      f"({r['max_error_in_steps']:.2g} of a step), types {types}")
    elif "float_max_abs_error" in r:
        checks.append(f"{r['tensors']} tensors in {r['ggml_type']}, decoded with gguf's dequantizer (max error {r['float_max_abs_error']:.3g})")
    if fmt == "compressed-tensors":
        checks.append("every layer decompressed by compressed-tensors to the identical weights")
    print(f"wrote {a.out} ({r['size_bytes'] / 2**20:.1f} MiB) in {r['seconds']}s; " + "; ".join(checks), file=sys.stderr)
    return 0


def cmd_generate(a) -> int:
    import torch
    from transformers import TextStreamer

    from qatlm.eval.report import load_any

    path = a.path or str(_resolve_model(None, a.cache_dir))
    t0 = time.time()
    model, tok, desc = load_any(path, kernel=a.kernel)
    kernels = desc.get("kernels", {})
    load_s = time.time() - t0
    if a.chat:
        if not tok.chat_template:
            raise QatlmError(f"{path} has no chat template; drop --chat")
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = a.prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=not a.chat)
    if a.max_new_tokens < 1:
        raise QatlmError("--max-new-tokens must be at least 1")
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    t1 = time.time()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=a.max_new_tokens, do_sample=False, streamer=streamer,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    n = out.shape[1] - ids["input_ids"].shape[1]
    dt = time.time() - t1
    print(f"\n[{desc['setting']}, kernels {kernels or 'fp'}; loaded in {load_s:.1f}s; {n} tokens in {dt:.1f}s = {n / dt:.1f} tok/s]", file=sys.stderr)
    return 0


COMMANDS = {"export": cmd_export, "generate": cmd_generate, "train": cmd_train, "quantize": cmd_quantize, "info": cmd_info, "eval": cmd_eval, "compare": cmd_eval, "assets": cmd_assets, "demo": cmd_demo, "install": cmd_install}


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.command:
        parser.print_help()
        return 2
    try:
        if getattr(a, "device", None):
            check_device(a.device)
        return COMMANDS[a.command](a)
    except QatlmError as e:
        print(f"qatlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qatlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
