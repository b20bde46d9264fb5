"""Command line: ``qatlm quantize | info | eval | compare | assets | demo``.

Every user error ends as one line on stderr (``qatlm: error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qatlm.errors import QatlmError

DEFAULT_MODEL_HELP = "local HF model folder (safetensors); default: the built-in SmolLM2-135M-Instruct"


def _add_quant_args(p: argparse.ArgumentParser):
    p.add_argument("--bits", type=int, default=4, help="weight bits: 2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="columns per quantization group, -1 = per output channel (default 128)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (zero point fixed at 2^(bits-1)); default asymmetric")
    p.add_argument("--lm-head", action="store_true", help="also quantize the LM head (default: keep it in full precision)")


def _add_common(p: argparse.ArgumentParser):
    p.add_argument("--device", default="cpu", help="torch device (default cpu; fp32 on CPU, bf16 on GPU)")
    p.add_argument("--cache-dir", default=None, help="where built-in assets are cached (default $QATLM_CACHE or ~/.cache/qatlm)")


def build_parser() -> argparse.ArgumentParser:
    from qatlm.api import METHODS

    ap = argparse.ArgumentParser(prog="qatlm", description="Quantization-aware training of Hugging Face causal LMs into packed low-bit integer models.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a model and save a packed GPTQ-format checkpoint")
    q.add_argument("--model", default=None, help=DEFAULT_MODEL_HELP)
    q.add_argument("--method", default="rtn", help=f"quantization method: {', '.join(METHODS)} (default rtn)")
    _add_quant_args(q)
    q.add_argument("--out", required=True, help="output folder for the packed checkpoint")
    q.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    _add_common(q)

    i = sub.add_parser("info", help="describe a packed checkpoint: bits, group size, size on disk, compression")
    i.add_argument("path", help="checkpoint folder")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return ap


def _resolve_model(arg, cache_dir=None) -> Path:
    if arg:
        return Path(arg)
    from qatlm.data.assets import default_model_dir

    return default_model_dir(cache_dir)


def cmd_quantize(a) -> int:
    from qatlm.api import METHODS
    from qatlm.model.checkpoint import check_out_dir, load_fp_model, load_tokenizer, save_quantized

    if a.method not in METHODS:
        raise QatlmError(f"unknown method '{a.method}'; choose one of {', '.join(METHODS)}")
    cfg_cls, fn = METHODS[a.method]
    config = cfg_cls(bits=a.bits, group_size=a.group_size, sym=a.sym, lm_head=a.lm_head)
    out = Path(a.out)
    check_out_dir(out, a.overwrite)
    model_dir = _resolve_model(a.model, a.cache_dir)
    t0 = time.time()
    print(f"loading {model_dir}", file=sys.stderr)
    model = load_fp_model(model_dir, device=a.device)
    tok = load_tokenizer(model_dir)
    print(f"quantizing with {a.method} at {config.spec.tag}", file=sys.stderr)
    fn(model, config)
    meta = {"method": a.method, "source": str(model_dir), "seconds": round(time.time() - t0, 1)}
    save_quantized(model, out, config.spec, tokenizer=tok, overwrite=a.overwrite, meta=meta)
    print(f"saved {out} in {time.time() - t0:.1f}s", file=sys.stderr)
    _print_info(str(out), as_json=False)
    return 0


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
    rows = [
        ("checkpoint", info["path"]),
        ("method", info["method"]),
        ("grid", f"{info['bits']}-bit, group {g}, {'symmetric' if info['sym'] else 'asymmetric'}, {info['format']}"),
        ("quantized weights", f"{info['quantized_params']:,} at {info['bits_per_quantized_weight']:.3f} bits each (scales, zeros, g_idx included)"),
        ("other parameters", f"{info['other_params']:,} (embeddings, norms, unquantized head)"),
        ("size on disk", f"{_fmt_bytes(info['size_on_disk_bytes'])} ({info['size_on_disk_bytes']:,} bytes; weights {_fmt_bytes(info['weights_bytes'])})"),
        ("fp16 equivalent", _fmt_bytes(info["fp16_size_bytes"])),
        ("compression vs fp16", f"{info['compression_vs_fp16']:.2f}x"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


def cmd_info(a) -> int:
    _print_info(a.path, a.json)
    return 0


COMMANDS = {"quantize": cmd_quantize, "info": cmd_info}


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[a.command](a)
    except QatlmError as e:
        print(f"qatlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qatlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
