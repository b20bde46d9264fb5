"""Command line: ``qatlm quantize | train | eval | compare | export | generate | info | upload | assets | demo | install``.

A thin adapter: each command parses its flags, calls the library (``quantize``, ``train`` and ``demo`` go through
``qatlm.pipeline.run_pipeline``, the same function as the Python API) and prints. Every user error ends as one
line on stderr (``qatlm: error: ...``) and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from qatlm.errors import QatlmError, check_device, resolve_device
from qatlm.parser import build_parser


def _eval_settings(a):
    from qatlm.eval.report import EvalSettings
    from qatlm.eval.zeroshot import parse_tasks

    from qatlm.data.hub import context_length

    seqlen = a.seqlen if a.seqlen is not None else context_length(a.heldout) or 512
    return EvalSettings(heldout=a.heldout, seqlen=seqlen, ppl_windows=a.ppl_windows or None, tasks=parse_tasks(a.tasks),
                        limit=a.limit or None, batch_size=a.eval_batch_size, device=a.device, cache_dir=a.cache_dir,
                        kernel=a.kernel)


def _named(name, revision=None):
    """A model named on the command line: a local folder, or a hub id fetched into the HF cache (``model/source.py``)."""
    from qatlm.model.source import resolve_model

    return resolve_model(name, revision)


def _default_model(arg, cache_dir=None):
    from qatlm.data.assets import default_model_dir

    return arg if arg else default_model_dir(cache_dir)


def cmd_quantize(a) -> int:
    from qatlm.describe import print_info
    from qatlm.options import recipe_from_args
    from qatlm.pipeline import run_pipeline

    stages = recipe_from_args(a, "quantize")
    run_pipeline(_default_model(a.model, a.cache_dir), stages, a.out, resume=a.resume, overwrite=a.overwrite, device=a.device,
                 save_dtype=a.save_dtype, cache_dir=a.cache_dir, revision=a.revision)
    if os.environ.get("RANK", "0") == "0":  # (under torchrun the first process wrote it)
        print_info(str(Path(a.out).expanduser()))
    return 0


def cmd_train(a) -> int:
    from qatlm.model.checkpoint import load_tokenizer, read_quant_config
    from qatlm.options import recipe_from_args
    from qatlm.pipeline import run_pipeline

    stages = recipe_from_args(a, "train")
    src, _ = read_quant_config(_named(a.src, a.revision))
    if load_tokenizer(src) is None:
        raise QatlmError(f"{src} has no tokenizer files; training needs one")
    run_pipeline(src, stages, a.out, resume=a.resume, overwrite=a.overwrite, device=a.device, cache_dir=a.cache_dir)
    return 0


def cmd_demo(a) -> int:
    from qatlm.demo import DEMO_BUDGET, run_demo
    from qatlm.options import recipe_from_args

    recipe = recipe_from_args(a, "demo", preset={f"{k}@": v for k, v in DEMO_BUDGET.items()})
    model = _named(a.model, a.revision) if a.model else None
    return 0 if run_demo(model, a.out, a.method, recipe, _eval_settings(a), device=a.device, cache_dir=a.cache_dir) else 1


def cmd_eval(a) -> int:
    from qatlm.eval.report import evaluate, markdown_table, write_report
    from qatlm.io import check_output

    settings = _eval_settings(a)
    if a.out:  # a report that cannot be written is refused before the evaluation, not after it
        check_output(a.out, overwrite=True, what="report folder")
    paths = [_named(p, a.revision) for p in ([a.paths] if isinstance(a.paths, str) else a.paths)] or [str(_default_model(None, a.cache_dir))]
    rows = [evaluate(p, settings) for p in paths]
    if a.card:
        from qatlm.export.card import add_evaluation

        for p, row in zip(paths, rows):
            if add_evaluation(p, row):
                print(f"model card of {p}: evaluation written", file=sys.stderr)
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

    from qatlm.export.runtimes import runtime_name

    if (a.format is None) == (a.runtime is None):
        raise QatlmError("export needs --format FORMAT or --for RUNTIME (vllm, llama.cpp, transformers), one of them")
    fmt = None
    if a.format is not None:
        fmt = a.format.lower().replace("_", "-")
        fmt = {"gptq-v2": "gptq", "ct": "compressed-tensors"}.get(fmt, fmt)
        if fmt not in FORMATS:
            raise QatlmError(f"unknown export format '{a.format}'; choose one of {', '.join(FORMATS)}")
    runtime = runtime_name(a.runtime) if a.runtime is not None else None
    print(f"exporting {a.src} {'as ' + fmt if fmt else 'for ' + runtime} ...", file=sys.stderr)
    with output_lock(a.out):
        r = export_checkpoint(_named(a.src, a.revision), fmt, a.out, overwrite=a.overwrite, float_type=a.float_type, runtime=runtime)
    fmt = r["format"]
    if r.get("warning"):
        print(f"qatlm: warning: {r['warning']}", file=sys.stderr)
    served = f"; declared {r['dtype']}" if r.get("dtype") else ""
    print(f"wrote {a.out} as {fmt} ({r['size_bytes'] / 2**20:.1f} MiB) in {r['seconds']}s; {export_checks(r, fmt)}{served}", file=sys.stderr)
    return 0


def cmd_generate(a) -> int:
    import torch
    from transformers import TextStreamer

    from qatlm.eval.report import load_any

    if not a.prompt.strip() or a.max_new_tokens < 1:
        raise QatlmError("--prompt is empty: give the text to continue" if not a.prompt.strip() else "--max-new-tokens must be at least 1")
    path = _named(a.path, a.revision) if a.path else str(_default_model(None, a.cache_dir))
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

    return print_info(_named(a.path, a.revision), a.json) or 0


def cmd_assets(a) -> int:
    from qatlm.data import assets

    if not a.list:
        assets.fetch_all(a.cache_dir)
    print(f"cache: {assets.cache_root(a.cache_dir)}")
    for name, package, ok in assets.status(a.cache_dir):
        print(f"  {'cached ' if ok else 'missing'}  {name:<36} from {package}")
    return 0


def cmd_upload(a) -> int:
    from qatlm.describe import fmt_bytes
    from qatlm.upload import upload

    files = upload(a.folder, a.repo, private=a.private, dry_run=a.dry_run)
    for f in files:
        print(f"{'would send' if a.dry_run else 'sent'}  {fmt_bytes(f.stat().st_size):>10}  {f.relative_to(Path(a.folder).expanduser())}")
    return 0


def cmd_install(a) -> int:
    from qatlm.install import install_runtime

    return install_runtime(a.runtime, a.dry_run, a.venv) or 0


COMMANDS = {"export": cmd_export, "generate": cmd_generate, "train": cmd_train, "quantize": cmd_quantize, "info": cmd_info, "eval": cmd_eval, "compare": cmd_eval, "assets": cmd_assets, "demo": cmd_demo, "install": cmd_install, "upload": cmd_upload}


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
                a.device = resolve_device(a.device)
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
