"""The command line's parser: every command's arguments, and the flags of each method generated from its config
dataclass (``options.add_recipe_flags``). ``cli.py`` runs the commands."""

from __future__ import annotations

import argparse

DEFAULT_MODEL_HELP = ("a local HF model folder (safetensors) or a hub id (org/name, fetched into the HF cache; see --revision); "
                      "default: the built-in SmolLM2-135M-Instruct")
REVISION_HELP = "the hub revision (branch, tag or commit) of a model named by its hub id (default: main)"
KERNEL_HELP = ("packed layers: auto (default: cache when the float weights fit in a quarter of the free memory, else plain), cache "
               "(dequantize once, keep the float weights: fastest), int4 (torch's CPU int4 matmul where the grid allows), plain (the least memory)")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other qatlm error."""

    def error(self, message):
        self.exit(2, f"qatlm: error: {message} (see '{self.prog} --help')\n")


def _add_eval_args(p: argparse.ArgumentParser, limit: int = 100, ppl_windows: int = 40):
    p.add_argument("--heldout", default="shakespeare", help="held-out text: shakespeare, wikipedia, a .txt/.jsonl/.parquet/dataset "
                                                           "folder, a Hugging Face dataset NAME:CONFIG:SPLIT[:FIELD], or the papers' "
                                                           "wikitext2 / c4")
    p.add_argument("--seqlen", type=int, default=None, help="perplexity window length (default 512; 2048 for wikitext2 / c4)")
    p.add_argument("--ppl-windows", type=int, default=ppl_windows,
                   help=f"number of perplexity windows, 0 = the whole text (default {ppl_windows})")
    p.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande", help="comma-separated zero-shot tasks, or 'none'")
    p.add_argument("--limit", type=int, default=limit, help=f"items per zero-shot task, 0 = all (default {limit})")
    p.add_argument("--eval-batch-size", type=int, default=8, help="zero-shot batch size (default 8)")
    p.add_argument("--kernel", default="auto", choices=["auto", "cache", "int4", "plain"], help=KERNEL_HELP)


def _add_common(p: argparse.ArgumentParser, revision: bool = True):
    p.add_argument("--device", default="auto", help="torch device: auto (default: cuda when a GPU is visible, computing in "
                                                    "bf16; else cpu, in fp32), cpu, cuda or cuda:N")
    p.add_argument("--cache-dir", default=None, help="where built-in assets are cached (default $QATLM_CACHE or ~/.cache/qatlm)")
    if revision:
        p.add_argument("--revision", default=None, help=REVISION_HELP)


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
    t.add_argument("--from", dest="src", required=True, help="packed qatlm/GPTQ checkpoint to start from (RTN or Block-AP output): a folder or a hub id")
    _add_run_args(t, "trained")
    _add_common(t)
    add_recipe_flags(t, "train")


def _eval_parsers(sub):
    from qatlm.demo import DEMO_BUDGET, DEMO_EVAL
    from qatlm.options import add_recipe_flags
    from qatlm.recipes import RECIPES

    for name, helptext in (("eval", "evaluate one model (fp folder or checkpoint): held-out perplexity and zero-shot"),
                           ("compare", "evaluate several models and write one table (Markdown + JSON) and a bar chart")):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("paths", nargs="*" if name == "compare" else "?", help="model folders, qatlm checkpoints or GGUF files (read by transformers' GGUF loader) (default: the built-in model)")
        _add_eval_args(e)
        e.add_argument("--out", default=None if name == "eval" else "qatlm-report", help="folder for report.md / report.json / report.png")
        e.add_argument("--card", action="store_true", help="also write the figures into each evaluated qatlm folder's model card")
        _add_common(e)
    d = sub.add_parser("demo", help="first-run demo (~10 min on 2 CPU cores): quantize the built-in SmolLM2 to 3 bits with RTN and "
                       "with Block-AP (quantization-aware), evaluate both against full precision, write report.md/png with the training curves")
    d.add_argument("--out", default="qatlm-demo", help="demo folder (checkpoints + report), default ./qatlm-demo")
    d.add_argument("--model", default=None, help=DEFAULT_MODEL_HELP)
    d.add_argument("--method", default="block-ap", choices=list(RECIPES), help="the QAT recipe shown beside RTN (default block-ap; rtn shows RTN alone)")
    _add_eval_args(d, limit=DEMO_EVAL["limit"], ppl_windows=DEMO_EVAL["ppl_windows"])
    _add_common(d)
    add_recipe_flags(d, "demo", defaults={f"--{k.replace('_', '-')}": v for k, v in DEMO_BUDGET.items()})


def _tool_parsers(sub):
    from qatlm.install import RUNTIMES

    x = sub.add_parser("export", help="write a packed checkpoint in another runtime's format (gptq, gptq-v1, gguf, compressed-tensors); "
                                      "a float model folder to an f16/f32 gguf")
    x.add_argument("src", help="qatlm / GPTQ checkpoint folder or hub id (a float model: to an f16/f32 gguf)")
    x.add_argument("--format", default=None, help="gptq (v2), gptq-v1, gguf (llama.cpp) or compressed-tensors (vLLM)")
    x.add_argument("--for", dest="runtime", default=None, metavar="RUNTIME",
                   help="vllm, llama.cpp or transformers: the format that runtime loads for this grid (instead of --format), "
                        "or a one-line refusal saying why none does")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--float-type", default="f16", help="gguf: storage of the tensors that are not quantized, f16 (default) or f32")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    x.add_argument("--revision", default=None, help=REVISION_HELP)
    g = sub.add_parser("generate", help="generate text with a checkpoint (qatlm packed or full precision), streamed")
    g.add_argument("path", nargs="?", help="checkpoint folder (default: the built-in SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", required=True, help="the prompt")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--kernel", default="auto", choices=["auto", "cache", "int4", "plain"], help=KERNEL_HELP)
    g.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    g.add_argument("--revision", default=None, help=REVISION_HELP)
    i = sub.add_parser("info", help="describe a packed checkpoint: bits, group size, size on disk, compression")
    i.add_argument("path", help="checkpoint folder or hub id")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--revision", default=None, help=REVISION_HELP)
    s = sub.add_parser("assets", help="list the built-in assets and fetch what is missing")
    s.add_argument("--list", action="store_true", help="only list, fetch nothing")
    _add_common(s, revision=False)
    u = sub.add_parser("upload", help="push a finished qatlm output folder (checkpoint or export, with its model card) to the hub")
    u.add_argument("folder", help="the output folder")
    u.add_argument("repo", help="the hub repository, org/name (created if missing)")
    u.add_argument("--private", action="store_true", help="create the repository private")
    u.add_argument("--dry-run", action="store_true", help="list what would be sent, send nothing")
    r = sub.add_parser("install", help="install a serving runtime beside your torch: gptq (transformers' GPTQ loader), llama.cpp "
                                       "(llama-cpp-python, built from source), vllm (vLLM's CPU build, in its own virtualenv)")
    r.add_argument("runtime", choices=sorted(RUNTIMES), help="the runtime to install")
    r.add_argument("--venv", default=None, help="vllm: the virtualenv to create (default ~/.cache/qatlm/vllm-venv)")
    r.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")


def build_parser() -> argparse.ArgumentParser:
    from qatlm.version import __version__

    ap = _Parser(prog="qatlm", description="Quantization-aware training of Hugging Face causal LMs into packed low-bit integer models.")
    ap.add_argument("--version", action="version", version=f"qatlm {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _quantize_parsers(sub)
    _eval_parsers(sub)
    _tool_parsers(sub)
    return ap
