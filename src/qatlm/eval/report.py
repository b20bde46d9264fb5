"""Evaluate full-precision models and qatlm checkpoints side by side: one table (Markdown + JSON) and a chart."""

from __future__ import annotations

import struct

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qatlm.errors import QatlmError, check_number


@dataclass
class EvalSettings:
    heldout: str = "shakespeare"
    seqlen: int = 512
    ppl_windows: int | None = 40
    tasks: tuple = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
    limit: int | None = 100
    batch_size: int = 8
    device: str = "cpu"
    cache_dir: str | None = None
    zeroshot_engine: str = "lm-eval"  # or "plain": the independent PyTorch scorer (same items, same prompts)
    kernel: str = "auto"  # packed layers: float copies cached only while they fit in memory (model.layers.set_kernel)

    def __post_init__(self):
        check_number("seqlen", self.seqlen, at_least=2)
        check_number("ppl_windows", self.ppl_windows, at_least=0)
        check_number("limit", self.limit, at_least=0)
        check_number("eval_batch_size", self.batch_size, at_least=1)


def gguf_file_of(path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the only ``.gguf`` of a folder without a config.json."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").exists():
        files = sorted(p.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
    return None


def load_gguf(path, device="cpu"):
    """(model, tokenizer, description) of a GGUF file, read by transformers' GGUF loader (its tensors
    dequantized to fp32 with the gguf package): how a llama.cpp file is evaluated with qatlm's protocol."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f = gguf_file_of(path)
    try:
        reader = gguf.GGUFReader(str(f))
    except (ValueError, OSError, IndexError, KeyError, struct.error) as e:
        raise QatlmError(f"{f} is not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    qbytes = qweights = 0
    types: dict[str, int] = {}
    for t in reader.tensors:
        name = t.tensor_type.name
        if name not in ("F32", "F16", "BF16") and len(t.shape) >= 2:
            qbytes += int(t.n_bytes)
            qweights += int(t.n_elements)
            types[name] = types.get(name, 0) + 1
    ftype = reader.get_field("general.file_type")
    ftype = gguf.LlamaFileType(int(ftype.contents())).name.removeprefix("MOSTLY_") if ftype is not None else "?"
    model = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32).to(device).eval()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    desc = {"recipe": "gguf", "bits": None, "group_size": None, "setting": ftype, "ggml_types": types,
            "bits_per_weight": round(8 * qbytes / max(qweights, 1), 3), "size_on_disk_mib": f.stat().st_size / 2**20}
    return model, tok, desc


def load_any(path, device="cpu", kernel: str = "auto"):
    """(model, tokenizer, description) for an fp HF folder, a qatlm/GPTQ checkpoint or a GGUF file."""
    from qatlm.model.checkpoint import checkpoint_info, load_fp_model, load_quantized, load_tokenizer
    from qatlm.model.source import is_quantized_dir
    from qatlm.model.layers import set_kernel

    p = Path(path)
    if gguf_file_of(p) is not None:
        return load_gguf(p, device)
    if is_quantized_dir(p):
        info = checkpoint_info(p)
        from qatlm.memory import adapt_to_free_memory
        from qatlm.model.checkpoint import weights_size

        adapt_to_free_memory(weights_size(p), device)
        model = load_quantized(p, device=device)
        kernels = set_kernel(model, kernel)
        g = "c" if info["group_size"] == -1 else info["group_size"]
        desc = {
            "recipe": info["method"],
            "bits": info["bits"],
            "group_size": info["group_size"],
            "setting": (f"mixed {info['bits_per_quantized_weight']:.2f} bpw" if info.get("layer_grids") else
                        f"w{info['bits']}g{g}" if info.get("grid", "uniform") == "uniform" else info["grid"]),
            "bits_per_weight": round(info["bits_per_quantized_weight"], 3),
            "size_on_disk_mib": info["size_on_disk_bytes"] / 2**20,
            "kernels": kernels,
        }
    else:
        model = load_fp_model(p, device=device)
        files = [f for f in p.rglob("*") if f.is_file()]
        dtype_bits = next(model.parameters()).element_size() * 8
        dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(model.parameters()).dtype, f"fp{dtype_bits}")
        desc = {"recipe": "fp", "bits": dtype_bits, "group_size": None, "setting": dname, "bits_per_weight": dtype_bits,
                "size_on_disk_mib": sum(f.stat().st_size for f in files) / 2**20}
    tok = load_tokenizer(p)
    if tok is None:
        raise QatlmError(f"{p} has no tokenizer files; evaluation needs one")
    return model, tok, desc


def evaluate(path, settings: EvalSettings, label: str | None = None, progress: bool = True) -> dict:
    from qatlm.data.text import bos_token, token_ids
    from qatlm.eval.perplexity import perplexity
    from qatlm.eval.zeroshot import average, evaluate_lm_eval, evaluate_plain

    t0 = time.time()
    model, tok, row = load_any(path, settings.device, settings.kernel)
    row = {"label": label or Path(path).name, "path": str(path), **row}
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and settings.seqlen > max_pos:
        raise QatlmError(f"--seqlen {settings.seqlen} is above the model's limit of {max_pos} positions")
    ids = token_ids(tok, settings.heldout, settings.cache_dir)
    row["heldout"] = settings.heldout
    bos = bos_token(tok)
    row["heldout_ppl"] = perplexity(model, ids, settings.seqlen, settings.ppl_windows, progress=progress, bos=bos)
    row["ppl_protocol"] = (f"{settings.ppl_windows or 'all'} windows x {settings.seqlen} tokens"
                           + (" (BOS + text in each window, as the tokenizer adds BOS)" if bos is not None else " (no BOS: the tokenizer adds none)"))
    if settings.tasks:
        if settings.zeroshot_engine == "plain":
            zs = evaluate_plain(model, tok, settings.tasks, settings.limit, settings.cache_dir)
        elif settings.zeroshot_engine == "lm-eval":
            zs = evaluate_lm_eval(model, tok, settings.tasks, settings.limit, settings.batch_size, settings.cache_dir)
        else:
            raise QatlmError(f"unknown zero-shot engine '{settings.zeroshot_engine}': use lm-eval or plain")
        row["zeroshot_engine"] = settings.zeroshot_engine
        row["zeroshot"] = zs
        row["zeroshot_avg"] = average(zs)
        row["zeroshot_limit"] = settings.limit
    row["eval_seconds"] = round(time.time() - t0, 1)
    return row


def _fmt(v, nd=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def stderr(acc: float, n) -> float:
    """Binomial standard error of an accuracy measured on ``n`` items (0 when unknown)."""
    return (acc * (1 - acc) / n) ** 0.5 if n else 0.0


def markdown_table(rows: list[dict]) -> str:
    tasks = []
    for r in rows:
        tasks += [t for t in r.get("zeroshot", {}) if t not in tasks]
    head = ["model", "recipe", "setting", "size (MiB)", "bits/weight", "held-out ppl"] + tasks + (["avg acc"] if tasks else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        zs = r.get("zeroshot", {})
        cells = [r["label"], r["recipe"], r["setting"], _fmt(r["size_on_disk_mib"], 1), _fmt(float(r["bits_per_weight"]), 2), _fmt(r["heldout_ppl"])]
        cells += [f"{zs[t]['acc']:.3f} ±{stderr(zs[t]['acc'], r.get('zeroshot_limit') or zs[t].get('n')):.3f}" if t in zs else "–"
                  for t in tasks]
        if tasks:
            n = (r.get("zeroshot_limit") or 0) * len(zs)
            cells.append(f"{r['zeroshot_avg']:.3f} ±{stderr(r['zeroshot_avg'], n):.3f}" if r.get("zeroshot_avg") is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    fig, axes = plt.subplots(1, 3 if any("zeroshot_avg" in r for r in rows) else 2, figsize=(12, 3.8))
    series = [("size on disk (MiB)", [r["size_on_disk_mib"] for r in rows]), ("held-out perplexity (lower is better)", [r["heldout_ppl"] for r in rows])]
    if len(axes) == 3:
        series.append(("zero-shot avg accuracy", [r.get("zeroshot_avg", 0) for r in rows]))
    for ax, (title, vals) in zip(axes, series):
        ax.bar(range(len(vals)), vals, color=["#4c72b0" if r["recipe"] == "fp" else "#dd8452" for r in rows])
        ax.set_xticks(range(len(vals)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if "perplexity" in title and max(vals) / max(min(vals), 1e-9) > 20:
            ax.set_yscale("log")
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], out_dir, title: str = "qatlm comparison", curves: str | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = f"# {title}\n\n" + markdown_table(rows)
    notes = {r.get("ppl_protocol") for r in rows} | {
        f"zero-shot: first {r.get('zeroshot_limit') or 'all'} items per task, 0-shot, {r.get('zeroshot_engine', 'lm-eval')}; "
        "± is one binomial standard error: differences smaller than about twice it are noise" for r in rows if "zeroshot" in r}
    md += "\n" + "\n".join(f"- {n}" for n in sorted(x for x in notes if x)) + f"\n- held-out text: {rows[0].get('heldout')}\n"
    md += "\n![size, perplexity and accuracy](report.png)\n"
    if curves:
        md += f"\n## Training\n\n![training curves]({curves})\n"
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    bar_chart(rows, out / "report.png")
    return {"markdown": out / "report.md", "json": out / "report.json", "chart": out / "report.png"}
