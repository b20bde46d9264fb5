"""K-quant grids on the built-in model: qatlm (RTN and Block-AP on llama.cpp's Q2_K / Q3_K grids) against
llama.cpp's own quantizer for the same types, each GGUF read two ways.

    python bench/kquant.py --grids q2_k,q3_k --calib-samples 64

Rows (bench/results/kquant.{json,md}):
- ``fp``: the model written as an f32 GGUF by ``qatlm export`` (the input of llama.cpp's quantizer).
- ``llama.cpp <TYPE> pure``: ``llama_model_quantize`` (llama-cpp-python) with ``pure`` (every matrix in TYPE; llama.cpp
  itself puts rows whose width is not a multiple of 256 in Q4_0) and the token embedding kept in f16, like qatlm's
  export: the same tensor types as qatlm's file, so the sizes match and the comparison is the grid values alone.
- ``llama.cpp <mix>`` (``--mix``): its default recipe for the type (Q2_K / Q3_K_M: some tensors a type up; larger).
- ``qatlm rtn|block-ap <grid>``: quantized on the grid, saved, exported with ``qatlm export --format gguf``.
- ``qatlm rtn|block-ap k-mix at <mix>'s size`` (``--mix --k-mix``): qatlm's own per-layer choice of llama.cpp types
  (``--grid k --target-bpw X``, X the bits per quantized weight of llama.cpp's default-mix file). Block-AP trains on the
  allocation the RTN row measured (the same measurement: float model, first 4 calibration samples) instead of repeating it.
- ``qatlm rtn|block-ap on <mix>'s own types`` (``--mix --same-types``): every matrix on the very type llama.cpp's
  quantizer gave it in its default-mix file (read from that file, tensor by tensor), so the two files hold the same
  tensor types and the same bytes of tensor data; the comparison is the values alone.
Each file is read (a) by transformers' GGUF loader (dequantized with the gguf package) with qatlm's perplexity code
(``qatlm eval FILE.gguf``), and (b) by llama.cpp itself (llama-cpp-python logits of the same token windows; its matmuls
quantize activations to 8 bits, so (b) differs slightly from (a)). Held-out Shakespeare, 512-token windows.
llama-cpp-python is built from source once (``pip install llama-cpp-python==0.3.36``, ~5 min on 2 cores); without it
the llama.cpp rows and readings are skipped and said so.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("QATLM_BENCH_RESULTS", HERE / "results"))
WORK = HERE / "work" / "kquant"
MIX = {"q2_k": ("Q2_K", "MOSTLY_Q2_K"), "q3_k": ("Q3_K_M", "MOSTLY_Q3_K_M"), "q4_k": ("Q4_K_M", "MOSTLY_Q4_K_M")}
PURE = {"q2_k": "MOSTLY_Q2_K", "q3_k": "MOSTLY_Q3_K_S", "q4_k": "MOSTLY_Q4_K_S"}


def llama_cpp():
    """llama-cpp-python, with the CPU's extra buffer types (repacked / AMX weights) turned off: with them, this build
    (0.3.36, AVX-512 + AMX CPU) crashes in its first decode of a file with Q4_0 tensors. The plain ggml CPU kernels
    compute the same GGML types."""
    try:
        import llama_cpp as lc
        import llama_cpp.llama as high
    except ImportError:
        return None
    default = lc.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    high.llama_cpp.llama_model_default_params = params
    return lc


def llama_quantize(lc, src: Path, dst: Path, ftype: str, pure: bool):
    p = lc.llama_model_quantize_default_params()
    p.ftype = getattr(lc, f"LLAMA_FTYPE_{ftype}")
    p.pure = pure
    p.nthread = os.cpu_count() or 1
    p.token_embedding_type = 1  # GGML_TYPE_F16, as qatlm's export writes it
    dst.parent.mkdir(parents=True, exist_ok=True)
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc}) for {dst.name}")


def llama_cpp_ppl(lc, gguf_file: Path, windows: torch.Tensor) -> float:
    """Perplexity from llama.cpp's own logits over the given token windows (each scored independently)."""
    n = windows.shape[1]
    llm = lc.Llama(model_path=str(gguf_file), n_ctx=n, n_batch=n, logits_all=True, verbose=False, n_threads=os.cpu_count() or 1)
    nll, count = 0.0, 0
    try:
        for w in windows.tolist():
            llm.reset()
            llm.eval(w)
            logits = torch.from_numpy(np.array(llm.scores[:n], dtype=np.float32))
            nll += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum").item()
            count += n - 1
    finally:
        llm.close()
    return math.exp(nll / count)


def tensor_table(f: Path) -> dict[str, tuple[str, int]]:
    """A GGUF file's tensors: name -> (type, bytes)."""
    import gguf

    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(str(f)).tensors}


def gguf_types(f: Path) -> dict:
    """Tensors per type of a GGUF file."""
    out: dict[str, int] = {}
    for kind, _ in tensor_table(f).values():
        out[kind] = out.get(kind, 0) + 1
    return out


def quantized_bpw(f: Path) -> float:
    """Bits per weight of a GGUF file's quantized matrices, unrounded: their bytes x 8 / their weights."""
    import gguf

    q = [t for t in gguf.GGUFReader(str(f)).tensors if t.tensor_type.name not in ("F32", "F16", "BF16") and len(t.shape) >= 2]
    return 8 * sum(int(t.n_bytes) for t in q) / sum(int(t.n_elements) for t in q)


def read_both(f: Path, label: str, settings, windows, lc, extra: dict) -> dict:
    """(a) ``qatlm eval FILE.gguf`` on all the windows; the two readings side by side on the first ``len(windows)``
    windows: (a) again, and (b) llama.cpp."""
    from qatlm.eval.perplexity import perplexity
    from qatlm.eval.report import evaluate, load_gguf

    t = time.time()
    ev = evaluate(f, settings, label=label, progress=False)
    row = {"label": label, "file": f.name, "size_mib": f.stat().st_size / 2**20, "types": gguf_types(f),
           "ppl_transformers_gguf": ev["heldout_ppl"], "bits_per_quantized_weight": ev["bits_per_weight"], **extra}
    if lc is not None:
        model = load_gguf(f)[0]
        row["check_windows"] = len(windows)
        row["check_ppl_transformers_gguf"] = perplexity(model, windows.reshape(-1), windows.shape[1], len(windows))
        del model
        row["check_ppl_llama_cpp"] = llama_cpp_ppl(lc, f, windows)
    row["eval_s"] = round(time.time() - t, 1)
    print(f"   {label}: ppl {row['ppl_transformers_gguf']:.2f}; first {len(windows)} windows: "
          f"{row.get('check_ppl_transformers_gguf', float('nan')):.2f} (transformers) / "
          f"{row.get('check_ppl_llama_cpp', float('nan')):.2f} (llama.cpp); {row['size_mib']:.1f} MiB", file=sys.stderr, flush=True)
    return row


# llama.cpp's type names -> qatlm's grid tags: its block types by their own names, Q4_1 as qatlm's uniform grid
GGML_TO_TAG = {"Q4_1": "w4g32"}


def llama_cpp_assignment(f: Path, fp_dir: Path) -> tuple[tuple, dict]:
    """The type llama.cpp's quantizer gave each matrix of ``f``, as qatlm ``(layer, grid tag)`` pairs (every linear layer
    of the model, matched by the gguf package's tensor-name map), and ``tensor_table(f)``."""
    import gguf

    from qatlm.export.gguf_file import gguf_arch, gguf_name
    from qatlm.model.checkpoint import load_fp_model
    from qatlm.quant.grid import K_FORMATS

    tags = {**{k.name: t for t, k in K_FORMATS.items()}, **GGML_TO_TAG}
    table = tensor_table(f)
    model = load_fp_model(fp_dir)
    names = gguf.get_tensor_name_map(gguf_arch(model.config.model_type), model.config.num_hidden_layers)
    pairs = []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in n:
            kind = table[gguf_name(names, n) + ".weight"][0]
            if kind not in tags:
                raise SystemExit(f"{f.name}: {n} is {kind}, a type qatlm does not train on")
            pairs.append((n, tags[kind]))
    return tuple(pairs), table


def rtn_allocation(name: str, target_bpw: float):
    """The ``MixedSummary`` of the RTN row of the same budget and menu, if it ran: the allocation depends only on the
    float model and the first 4 calibration samples, so Block-AP's own measurement would repeat it exactly."""
    from qatlm import QuantSpec
    from qatlm.summary import RunSummary

    f = WORK / f"rtn-{name}" / "training_summary.json"
    m = RunSummary.from_dict(json.loads(f.read_text())).mixed if f.is_file() else None
    same = m is not None and m.target_bpw == target_bpw and m.menu == QuantSpec(format="k", target_bpw=target_bpw).menu
    return m if same else None


def quantize_qatlm(method: str, grid: str, fp_dir: Path, a, target_bpw: float | None = None, layers: tuple | None = None,
                   name: str | None = None) -> tuple[Path, dict]:
    """qatlm's ``method`` on one K grid, or with ``target_bpw`` on a mix of llama.cpp's types (``--grid k``) within that
    many bits per quantized weight, or with ``layers`` on the given type per layer; saved and exported to GGUF."""
    from qatlm import BlockAPConfig, QuantSpec, RTNConfig, quantize
    from qatlm.export import export_checkpoint
    from qatlm.model.checkpoint import load_fp_model, load_tokenizer

    torch.manual_seed(0)
    name = name or (grid if target_bpw is None else f"k-mix-{target_bpw:.4f}")
    reused = rtn_allocation(name, target_bpw) if method != "rtn" and target_bpw is not None else None
    if reused is not None:  # the allocation the RTN row measured: the same measurement (fp model, the same 4 samples)
        layers = tuple(sorted(reused.layers.items()))
    if layers is not None:
        spec = QuantSpec(format="k" if target_bpw is not None else grid, layers=layers)
    else:
        spec = QuantSpec(format=grid) if target_bpw is None else QuantSpec(format="k", target_bpw=target_bpw)
    grid = name
    cfg = RTNConfig(grid=spec) if method == "rtn" else BlockAPConfig(grid=spec, calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen)
    model, tok = load_fp_model(fp_dir), load_tokenizer(fp_dir)
    t = time.time()
    summary = quantize(model, cfg, tokenizer=tok, out=WORK / f"{method}-{grid}", overwrite=True, progress=False)
    extra = {"quant_wall_s": round(time.time() - t, 1)}
    mixed = summary.mixed or reused
    if mixed is not None:
        extra["allocation"] = {"target_bpw": target_bpw, "bits_per_weight": mixed.bits_per_weight, "grids": mixed.grids,
                               **({"measured_by": "the rtn row's run"} if reused is not None else {})}
    if method == "block-ap":
        extra["calib"] = f"{a.calib_samples}x{a.calib_seqlen}"
        b = summary.block_ap.blocks
        extra["rtn_fallback_blocks"] = summary.block_ap.rtn_fallback_blocks
        extra["block_error_mean"] = [sum(x.rtn_rel_error for x in b) / len(b), sum(x.trained_rel_error for x in b) / len(b)]
    rep = export_checkpoint(WORK / f"{method}-{grid}", "gguf", WORK / f"{method}-{grid}-gguf", overwrite=True)
    extra["export_max_abs_error"] = rep["max_abs_error"]
    return WORK / f"{method}-{grid}-gguf" / rep["file"], extra


def markdown(rows: list[dict]) -> str:
    n = next((r["check_windows"] for r in rows if "check_windows" in r), 0)
    lines = ["| file | types (matrices) | size MiB | bits/weight (quantized matrices) | held-out ppl (40 windows) | "
             f"first {n} windows: transformers GGUF / llama.cpp | quantize s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()) if k not in ("F32",))
        check = f"{r['check_ppl_transformers_gguf']:.2f} / {r['check_ppl_llama_cpp']:.2f}" if "check_ppl_llama_cpp" in r else "–"
        lines.append(f"| {r['label']} | {types} | {r['size_mib']:.1f} | {r['bits_per_quantized_weight']:.3f} | "
                     f"{r['ppl_transformers_gguf']:.2f} | {check} | {r.get('quant_wall_s', '–')} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grids", default="q2_k,q3_k")
    ap.add_argument("--methods", default="rtn,block-ap")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--check-windows", type=int, default=8, help="windows read by both transformers and llama.cpp")
    ap.add_argument("--name", default="kquant", help="results file stem")
    ap.add_argument("--redo", action="store_true", help="measure again the rows already in the results file")
    ap.add_argument("--mix-only", action="store_true", help="with --mix: only the mixes, not qatlm on the uniform K grids")
    ap.add_argument("--mix", action="store_true", help="also llama.cpp's default mixes (Q2_K, Q3_K_M: some tensors a type up)")
    ap.add_argument("--k-mix", action="store_true", help="with --mix: also qatlm's own mix of llama.cpp types (--grid k) at "
                                                          "the bits per weight of llama.cpp's default mix")
    ap.add_argument("--same-types", action="store_true", help="with --mix: also qatlm on llama.cpp's own type for every "
                                                               "matrix of its default mix (the same tensor types, the same bytes)")
    a = ap.parse_args()

    from qatlm.data.assets import default_model_dir
    from qatlm.data.text import bos_token, cut_windows, token_ids
    from qatlm.eval.report import EvalSettings
    from qatlm.export import export_checkpoint
    from qatlm.model.checkpoint import load_tokenizer

    lc = llama_cpp()
    if lc is None:
        print("llama-cpp-python is not installed: llama.cpp rows and readings skipped", file=sys.stderr)
    fp_dir = default_model_dir()
    settings = EvalSettings(ppl_windows=a.ppl_windows, tasks=())
    tok = load_tokenizer(fp_dir)
    windows = cut_windows(token_ids(tok, settings.heldout), settings.seqlen, bos_token(tok), a.check_windows)
    out_path = RESULTS / f"{a.name}.json"
    rows = json.loads(out_path.read_text()) if out_path.exists() else []

    def keep(row):
        rows[:] = [r for r in rows if r["label"] != row["label"]] + [row]
        RESULTS.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(rows, indent=2) + "\n")
        (RESULTS / f"{a.name}.md").write_text(markdown(rows))

    done = set() if a.redo else {r["label"] for r in rows}
    fp_gguf = WORK / "fp" / f"{fp_dir.name}-f32.gguf"
    if not fp_gguf.exists():
        export_checkpoint(fp_dir, "gguf", WORK / "fp", overwrite=True, float_type="f32")
    if "fp (f32 GGUF)" not in done:
        keep(read_both(fp_gguf, "fp (f32 GGUF)", settings, windows, lc, {}))
    for grid in a.grids.split(","):
        if lc is not None:
            for label, ftype, pure in ((f"llama.cpp {grid.upper()} pure", PURE[grid], True),
                                       (f"llama.cpp {MIX[grid][0]} (its default mix)", MIX[grid][1], False))[: 2 if a.mix else 1]:
                f = WORK / f"llama-{ftype.lower()}-{'pure' if pure else 'mix'}.gguf"
                if label in done:
                    continue
                t = time.time()
                llama_quantize(lc, fp_gguf, f, ftype, pure)
                keep(read_both(f, label, settings, windows, lc, {"quant_wall_s": round(time.time() - t, 1)}))
            mix_row = next((r for r in rows if r["label"] == f"llama.cpp {MIX[grid][0]} (its default mix)"), None)
            if a.k_mix and mix_row is not None:
                bpw = quantized_bpw(WORK / mix_row["file"])
                for method in a.methods.split(","):
                    label = f"qatlm {method} k-mix at {MIX[grid][0]}'s size"
                    if label not in done:
                        f, extra = quantize_qatlm(method, grid, fp_dir, a, target_bpw=bpw)
                        keep(read_both(f, label, settings, windows, lc, extra))
            if a.same_types and mix_row is not None:
                layers, theirs = llama_cpp_assignment(WORK / mix_row["file"], fp_dir)
                for method in a.methods.split(","):
                    label = f"qatlm {method} on {MIX[grid][0]}'s own types"
                    if label in done:
                        continue
                    f, extra = quantize_qatlm(method, grid, fp_dir, a, layers=layers, name=f"types-{MIX[grid][0].lower()}")
                    ours = tensor_table(f)
                    extra["same_types_as_llama_cpp"] = {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}
                    extra["tensor_bytes"] = sum(b for _, b in ours.values())
                    extra["llama_cpp_tensor_bytes"] = sum(b for _, b in theirs.values())
                    extra["file_bytes"], extra["llama_cpp_file_bytes"] = f.stat().st_size, (WORK / mix_row["file"]).stat().st_size
                    keep(read_both(f, label, settings, windows, lc, extra))
        for method in a.methods.split(",") if not (a.mix and a.mix_only) else ():
            if f"qatlm {method} {grid}" in done:
                continue
            f, extra = quantize_qatlm(method, grid, fp_dir, a)
            keep(read_both(f, f"qatlm {method} {grid}", settings, windows, lc, extra))


if __name__ == "__main__":
    main()
