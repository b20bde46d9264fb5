"""Command line: ``qatlm quantize | train | eval | compare | export | generate | info | assets | demo | install``.

A thin adapter: each command parses its flags, calls the library (``quantize``, ``train`` and ``demo`` go through
``qatlm.pipeline.run_pipeline``, the same function as the Python API) and prints. Every user error ends as one
line on stderr (``qatlm: error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from qatlm.errors import QatlmError, check_device

DEFAULT_MODEL_HELP = "local HF model folder (safetensors); default: the built-in SmolLM2-135M-Instruct"
KERNEL_HELP = ("packed layers: auto (default: cache when the float weights fit in a quarter of the free memory, else plain), cache "
               "(dequantize once, keep the float weights: fastest), int4 (torch's CPU int4 matmul where the grid allows), plain (the least memory)")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other qatlm error."""

    def error(self, message):
        self.exit(2, f"qatlm: error: {message} (see '{self.prog} --help')\n")


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
    from qatlm.eval.zeroshot import parse_tasks

    return EvalSettings(heldout=a.heldout, seqlen=a.seqlen, ppl_windows=a.ppl_windows or None, tasks=parse_tasks(a.tasks),
                        limit=a.limit or None, batch_size=a.eval_batch_size, device=a.device, cache_dir=a.cache_dir,
                        kernel=a.kernel)


def _add_common(p: argparse.ArgumentParser):
    p.add_argument("--device", default="cpu", help="torch device (default cpu; fp32 on CPU, bf16 on GPU)")
    p.add_argument("--cache-dir", default=None, help="where built-in assets are cached (default $QATLM_CACHE or ~/.cache/qatlm)")


def _add_run_args(p: argparse.ArgumentParser, what: str):
    p.add_argument("--out", required=True, help=f"output folder for the {what} checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder (and any unfinished run) if it exists")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (Block-AP: from its last finished block; "
                                                         "end to end: from its last checkpoint)")


def _quantize_parsers(sub):
    from qatlm.options import add_recipe_flags
    from qatlm.recipes import RECIPES, STAGES

    q = sub.add_parser("quantize", help="quantize a model and save a packed GPTQ-format checkpoint")
    q.add_argument("--model", default=None, help=DEFAULT_MODEL_HELP)
    q.add_argument("--method", default="rtn", help="quantization recipe: " + "; ".join(
        f"{n} = {' then '.join(STAGES[c][0] for c in cs)}" for n, cs in RECIPES.items()) + " (default rtn)")
    _add_run_args(q, "packed")
    q.add_argument("--save-dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                   help="storage dtype of the unquantized tensors (embeddings, norms, head); auto (default) = the source "
                        "checkpoint's dtype as shipped (float16 for the built-in model)")
    _add_common(q)
    add_recipe_flags(q, "quantize")
    t = sub.add_parser("train", help="train a packed checkpoint end to end (e2e-qp: step sizes only) and save it")
    t.add_argument("--method", default="e2e-qp", help="training method: e2e-qp (default: step sizes only) or dl-qat (magnitudes + LoRA in the grid)")
    t.add_argument("--from", dest="src", required=True, help="packed qatlm/GPTQ checkpoint to start from (RTN or Block-AP output)")
    _add_run_args(t, "trained")
    _add_common(t)
    add_recipe_flags(t, "train")


def _eval_parsers(sub):
    from qatlm.demo import DEMO_BUDGET
    from qatlm.options import add_recipe_flags
    from qatlm.recipes import RECIPES

    for name, helptext in (("eval", "evaluate one model (fp folder or checkpoint): held-out perplexity and zero-shot"),
                           ("compare", "evaluate several models and write one table (Markdown + JSON) and a bar chart")):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("paths", nargs="*" if name == "compare" else "?", help="model folders, qatlm checkpoints or GGUF files (read by transformers' GGUF loader) (default: the built-in model)")
        _add_eval_args(e)
        e.add_argument("--out", default=None if name == "eval" else "qatlm-report", help="folder for report.md / report.json / report.png")
        _add_common(e)
    d = sub.add_parser("demo", help="first-run demo (~10 min on 2 CPU cores): quantize the built-in SmolLM2 to 3 bits with RTN and "
                       "with Block-AP (quantization-aware), evaluate both against full precision, write report.md/png with the training curves")
    d.add_argument("--out", default="qatlm-demo", help="demo folder (checkpoints + report), default ./qatlm-demo")
    d.add_argument("--model", default=None, help=DEFAULT_MODEL_HELP)
    d.add_argument("--method", default="block-ap", choices=list(RECIPES), help="the QAT recipe shown beside RTN (default block-ap; rtn shows RTN alone)")
    _add_eval_args(d, limit=50)
    _add_common(d)
    add_recipe_flags(d, "demo", defaults={f"--{k.replace('_', '-')}": v for k, v in DEMO_BUDGET.items()})


def _tool_parsers(sub):
    from qatlm.install import RUNTIMES

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
    s = sub.add_parser("assets", help="list the built-in assets and fetch what is missing")
    s.add_argument("--list", action="store_true", help="only list, fetch nothing")
    _add_common(s)
    r = sub.add_parser("install", help="install an optional runtime beside your torch (gptq: what transformers needs to load GPTQ exports)")
    r.add_argument("runtime", choices=sorted(RUNTIMES), help="the runtime to install")
    r.add_argument("--dry-run", action="store_true", help="print the pip command instead of running it")


def build_parser() -> argparse.ArgumentParser:
    from qatlm.version import __version__

    ap = _Parser(prog="qatlm", description="Quantization-aware training of Hugging Face causal LMs into packed low-bit integer models.")
    ap.add_argument("--version", action="version", version=f"qatlm {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _quantize_parsers(sub)
    _eval_parsers(sub)
    _tool_parsers(sub)
    return ap


def _default_model(arg, cache_dir=None):
    from qatlm.data.assets import default_model_dir

    return arg if arg else default_model_dir(cache_dir)


def cmd_quantize(a) -> int:
    from qatlm.describe import print_info
    from qatlm.options import recipe_from_args
    from qatlm.pipeline import run_pipeline

    stages = recipe_from_args(a, "quantize")
    run_pipeline(_default_model(a.model, a.cache_dir), stages, a.out, resume=a.resume, overwrite=a.overwrite, device=a.device,
                 save_dtype=a.save_dtype, cache_dir=a.cache_dir)
    if os.environ.get("RANK", "0") == "0":  # (under torchrun the first process wrote it)
        print_info(str(Path(a.out).expanduser()))
    return 0


def cmd_train(a) -> int:
    from qatlm.model.checkpoint import load_tokenizer, read_quant_config
    from qatlm.options import recipe_from_args
    from qatlm.pipeline import run_pipeline

    stages = recipe_from_args(a, "train")
    src, _ = read_quant_config(a.src)
    if load_tokenizer(src) is None:
        raise QatlmError(f"{src} has no tokenizer files; training needs one")
    run_pipeline(src, stages, a.out, resume=a.resume, overwrite=a.overwrite, device=a.device, cache_dir=a.cache_dir)
    return 0


def cmd_demo(a) -> int:
    from qatlm.demo import DEMO_BUDGET, run_demo
    from qatlm.options import recipe_from_args

    recipe = recipe_from_args(a, "demo", preset={f"{k}@": v for k, v in DEMO_BUDGET.items()})
    return 0 if run_demo(a.model, a.out, a.method, recipe, _eval_settings(a), device=a.device, cache_dir=a.cache_dir) else 1


def cmd_eval(a) -> int:
    from qatlm.eval.report import evaluate, markdown_table, write_report
    from qatlm.io import check_output

    settings = _eval_settings(a)
    if a.out:  # a report that cannot be written is refused before the evaluation, not after it
        check_output(a.out, overwrite=True, what="report folder")
    paths = ([a.paths] if isinstance(a.paths, str) else a.paths) or [str(_default_model(None, a.cache_dir))]
    rows = [evaluate(p, settings) for p in paths]
    print(markdown_table(rows))
    if a.out:
        files = write_report(rows, a.out)
        print(f"report: {files['markdown']}  {files['json']}  {files['chart']}", file=sys.stderr)
    elif a.command == "eval":
        print(json.dumps(rows[0], indent=2))
    return 0


def cmd_export(a) -> int:
    from qatlm.export import FORMATS, export_checkpoint, export_checks
    from qatlm.io import output_lock

    fmt = a.format.lower().replace("_", "-")
    fmt = {"gptq-v2": "gptq", "ct": "compressed-tensors"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise QatlmError(f"unknown export format '{a.format}'; choose one of {', '.join(FORMATS)}")
    print(f"exporting {a.src} as {fmt} ...", file=sys.stderr)
    with output_lock(a.out):
        r = export_checkpoint(a.src, fmt, a.out, overwrite=a.overwrite, float_type=a.float_type)
    if r.get("warning"):
        print(f"qatlm: warning: {r['warning']}", file=sys.stderr)
    print(f"wrote {a.out} ({r['size_bytes'] / 2**20:.1f} MiB) in {r['seconds']}s; {export_checks(r, fmt)}", file=sys.stderr)
    return 0


def cmd_generate(a) -> int:
    import torch
    from transformers import TextStreamer

    from qatlm.eval.report import load_any

    if not a.prompt.strip() or a.max_new_tokens < 1:
        raise QatlmError("--prompt is empty: give the text to continue" if not a.prompt.strip() else "--max-new-tokens must be at least 1")
    path = a.path or str(_default_model(None, a.cache_dir))
    t0 = time.time()
    model, tok, desc = load_any(path, kernel=a.kernel)
    load_s = time.time() - t0
    if a.chat and not tok.chat_template:
        raise QatlmError(f"{path} has no chat template; drop --chat")
    text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False, add_generation_prompt=True) if a.chat else a.prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=not a.chat)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    t1 = time.time()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=a.max_new_tokens, do_sample=False, streamer=streamer,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    n, dt = out.shape[1] - ids["input_ids"].shape[1], time.time() - t1
    print(f"\n[{desc['setting']}, kernels {desc.get('kernels') or 'fp'}; loaded in {load_s:.1f}s; {n} tokens in {dt:.1f}s = {n / dt:.1f} tok/s]",
          file=sys.stderr)
    return 0


def cmd_info(a) -> int:
    from qatlm.describe import print_info

    return print_info(a.path, a.json) or 0


def cmd_assets(a) -> int:
    from qatlm.data import assets

    if not a.list:
        assets.fetch_all(a.cache_dir)
    print(f"cache: {assets.cache_root(a.cache_dir)}")
    for name, package, ok in assets.status(a.cache_dir):
        print(f"  {'cached ' if ok else 'missing'}  {name:<36} from {package}")
    return 0


def cmd_install(a) -> int:
    from qatlm.install import install_runtime

    return install_runtime(a.runtime, a.dry_run) or 0


COMMANDS = {"export": cmd_export, "generate": cmd_generate, "train": cmd_train, "quantize": cmd_quantize, "info": cmd_info, "eval": cmd_eval, "compare": cmd_eval, "assets": cmd_assets, "demo": cmd_demo, "install": cmd_install}


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.command:
        parser.print_help()
        return 2
    from qatlm.errors import crash_report, on_sigterm

    try:
        with on_sigterm():
            if getattr(a, "device", None) is not None:
                check_device(a.device)
            return COMMANDS[a.command](a)
    except QatlmError as e:
        print(f"qatlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM from a scheduler / docker stop
        resume = " (run the same command with --resume to continue)" if hasattr(a, "resume") else ""
        print(f"\nqatlm: interrupted{' by ' + e.args[0] if e.args else ''}{resume}", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - nobody foresaw it: one line, and the whole traceback in a file
        print(f"qatlm: error: {crash_report(a.command)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
