"""Exports in the runtimes that load them: size, load time, speed and held-out perplexity.

    python bench/exports.py --source block-ap --settings w4g128,w2g64 \\
        [--gptq-python /path/to/python-with-gptqmodel] [--llama-python /path/to/python-with-llama_cpp]

For each setting the checkpoint ``bench/work/<source>-<setting>`` (written by ``bench/run.py``) is
exported with ``qatlm export`` to GPTQ v2, GGUF and compressed-tensors, and every runtime runs in its
own process: fp32 transformers (the source model), qatlm's packed model (dequantize-once cache and
int4-kernel variants), transformers + gptqmodel on the GPTQ folder, llama.cpp (llama-cpp-python) on
the GGUF file, transformers + compressed-tensors on that folder. Every runtime scores the *same token
ids* (Shakespeare, first --windows windows of 512, qatlm's protocol), so perplexities compare the
weights, not the tokenizers. Speed: prompt processing = one 512-token forward pass; generation =
64 greedy tokens after a short prompt, batch 1, --threads CPU threads. Rows go to
bench/results/exports.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("QATLM_BENCH_RESULTS", HERE / "results"))
PROMPT = "The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place beneath."


def heldout_ids(tok_dir: str, windows: int):
    import torch

    from qatlm.data.text import token_ids
    from qatlm.model.checkpoint import load_tokenizer

    ids = token_ids(load_tokenizer(tok_dir), "shakespeare")
    n = min(windows, ids.numel() // 512)
    return ids[: n * 512].view(n, 512).to(torch.long)


def size_of(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".gguf")]
    return sum(f.stat().st_size for f in files) / 2**20


def run_torch(kind: str, path: str, tok_dir: str, windows: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    chunks = heldout_ids(tok_dir, windows)
    t0 = time.perf_counter()
    if kind in ("qatlm-cache", "qatlm-int4"):
        from qatlm.model.checkpoint import load_quantized
        from qatlm.model.layers import set_kernel

        model = load_quantized(path)
        kernels = set_kernel(model, kind.split("-")[1])
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()
        kernels = None
    from qatlm.model.checkpoint import load_tokenizer

    tok = load_tokenizer(tok_dir)
    nll, cnt = 0.0, 0
    with torch.no_grad():
        model(input_ids=chunks[:1, :8])  # first call: dequantize caches, kernel set-up
        load_s = time.perf_counter() - t0
        for x in chunks:
            logits = model(input_ids=x[None], use_cache=False).logits.float()
            nll += F.cross_entropy(logits[0, :-1], x[1:], reduction="sum").item()
            cnt += 511
        t = time.perf_counter()
        model(input_ids=chunks[:1], use_cache=False)
        pp = 512 / (time.perf_counter() - t)
        ids = tok(PROMPT, return_tensors="pt")
        t = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tok.eos_token_id)
        gen = (out.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - t)
    return {"ppl": math.exp(nll / cnt), "load_s": load_s, "prompt_tok_s": pp, "gen_tok_s": gen, "kernels": kernels}


def run_llama(path: str, tok_dir: str, windows: int, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    chunks = heldout_ids(tok_dir, windows).numpy()
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=512, n_batch=512, logits_all=True, n_threads=threads, verbose=False)
    load_s = time.perf_counter() - t0
    nll, cnt = 0.0, 0
    for x in chunks:
        llm.reset()
        llm.eval(x.tolist())
        logits = np.asarray(llm.scores[: len(x)], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
        nll -= logp[np.arange(len(x) - 1), x[1:]].sum()
        cnt += len(x) - 1
    llm.reset()
    t = time.perf_counter()
    llm.eval(chunks[0].tolist())
    pp = 512 / (time.perf_counter() - t)
    llm.reset()
    from qatlm.model.checkpoint import load_tokenizer

    prompt = load_tokenizer(tok_dir)(PROMPT)["input_ids"]
    t = time.perf_counter()
    n = 0
    for _tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        n += 1
        if n == 64:
            break
    gen = n / (time.perf_counter() - t)
    return {"ppl": math.exp(nll / cnt), "load_s": load_s, "prompt_tok_s": pp, "gen_tok_s": gen}


def vm_hwm_mib() -> float:
    """This process's peak RSS since its exec (ru_maxrss would carry over the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(a):
    if a.kind == "llama.cpp":
        r = run_llama(a.path, a.tok, a.windows, a.threads)
    else:
        r = run_torch(a.kind, a.path, a.tok, a.windows, a.threads)
    r["peak_rss_mib"] = vm_hwm_mib()
    print("ROW " + json.dumps(r), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="block-ap", help="recipe whose bench/work checkpoints are exported")
    ap.add_argument("--settings", default="w4g128,w2g64")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gptq-python", default=None, help="python with optimum + gptqmodel (transformers' GPTQ loader)")
    ap.add_argument("--llama-python", default=None, help="python with llama-cpp-python")
    ap.add_argument("--with-int4", action="store_true", help="also time qatlm's int4-kernel variant (slow on many CPUs)")
    ap.add_argument("--one", nargs=3, metavar=("KIND", "PATH", "TOK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        a.kind, a.path, a.tok = a.one
        return one(a)
    from qatlm.data.assets import MODEL_NAME, default_model_dir
    from qatlm.export import export_checkpoint

    fp = default_model_dir()
    rows = []

    def measure(kind, path, tok, setting, python=None, extra=None):
        cmd = [python or sys.executable, __file__, "--one", kind, str(path), str(tok), f"--windows={a.windows}", f"--threads={a.threads}"]
        print(f"== {setting} {kind}", file=sys.stderr, flush=True)
        env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, check=False)
        got = [json.loads(x[4:]) for x in res.stdout.splitlines() if x.startswith("ROW ")]
        if res.returncode or not got:
            err = (res.stderr.strip().splitlines() or ["?"])[-1]
            print(f"   failed: {err}", file=sys.stderr)
            rows.append({"model": MODEL_NAME, "setting": setting, "runtime": kind, "error": err[:300], **(extra or {})})
            return
        r = {"model": MODEL_NAME, "setting": setting, "runtime": kind, "size_mib": size_of(Path(path)), **got[0], **(extra or {})}
        print(f"   ppl {r['ppl']:.2f}  load {r['load_s']:.1f}s  pp {r['prompt_tok_s']:.0f} tok/s  gen {r['gen_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
        rows.append(r)

    measure("transformers-fp32", fp, fp, "fp32")
    for setting in a.settings.split(","):
        src = HERE / "work" / f"{a.source}-{setting}"
        if not (src / "config.json").exists():
            raise SystemExit(f"{src} is missing: run `python bench/run.py --recipes {a.source} --settings {setting}` first")
        measure("qatlm-cache", src, src, setting)
        if a.with_int4:  # slow on CPUs where torch's int4 kernel is not optimised (see the README)
            measure("qatlm-int4", src, src, setting)
        exp = {}
        for fmt in ("gptq", "gguf", "compressed-tensors"):
            out = HERE / "work" / f"export-{fmt}-{a.source}-{setting}"
            try:
                exp[fmt] = export_checkpoint(src, fmt, out, overwrite=True)
            except Exception as e:  # a format that cannot hold this grid: record why
                rows.append({"model": MODEL_NAME, "setting": setting, "runtime": fmt, "error": str(e)[:300]})
        if "gptq" in exp:
            if a.gptq_python:
                measure("transformers+gptqmodel", HERE / "work" / f"export-gptq-{a.source}-{setting}", src, setting, a.gptq_python)
        if "gguf" in exp and a.llama_python:
            g = exp["gguf"]
            measure("llama.cpp", HERE / "work" / f"export-gguf-{a.source}-{setting}" / g["file"], src, setting, a.llama_python,
                    {"ggml_type": g["ggml_type"], "gguf_max_weight_error_steps": g["max_error_in_steps"]})
        if "compressed-tensors" in exp:
            measure("transformers+compressed-tensors", HERE / "work" / f"export-compressed-tensors-{a.source}-{setting}", src, setting)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "exports.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / "exports.md").write_text(markdown(rows, a))


def rewrite_markdown(a):
    rows = json.loads((RESULTS / "exports.json").read_text())
    (RESULTS / "exports.md").write_text(markdown(rows, a))


def markdown(rows, a) -> str:
    head = "| setting | runtime | file MiB | load s | held-out ppl | vs qatlm | prompt tok/s | gen tok/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ref = {r["setting"]: r["ppl"] for r in rows if r.get("runtime") == "qatlm-cache" and "ppl" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['runtime']} | – | – | refused / failed: {r['error'][:160]} | – | – | – |")
            continue
        rel = f"{r['ppl'] / ref[r['setting']] - 1:+.2%}" if r["setting"] in ref else "–"
        name = r["runtime"] + (f" ({r['ggml_type']})" if r.get("ggml_type") else "")
        lines.append(f"| {r['setting']} | {name} | {r['size_mib']:.0f} | {r['load_s']:.1f} | {r['ppl']:.2f} | {rel} | "
                     f"{r['prompt_tok_s']:.0f} | {r['gen_tok_s']:.1f} |")
    return ("\n".join(lines) + f"\n\nSource checkpoints: bench/work/{a.source}-<setting>; held-out Shakespeare, first {a.windows} windows of 512 "
            f"tokens (the same token ids in every runtime); {a.threads} CPU threads; generation: 64 greedy tokens, batch 1.\n")


if __name__ == "__main__":
    main()
