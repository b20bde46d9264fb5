"""The model card every qatlm output folder carries: ``README.md`` in the Hugging Face convention (YAML front matter
the hub reads, then prose): what the model is quantized from, the method and grid, the calibration, the quality
measured during the run, and how to load it in each runtime that loads this very folder (others: the export that
serves them). ``qatlm upload`` sends a folder that has one."""

from __future__ import annotations

from pathlib import Path

CARD = "README.md"


def _runtimes(kind: str, spec=None, path: str = "DIR", widths=()) -> tuple[list[str], list[str]]:
    """(runtimes that load this folder as it is, with how; for the others, the export each loads or why none does,
    from ``runtimes.route``)."""
    from qatlm.export.runtimes import route

    if kind == "gguf":
        return (["llama.cpp: `llama-cli -m DIR/FILE.gguf`", "transformers: `AutoModelForCausalLM.from_pretrained(DIR, gguf_file=FILE)`",
                 "qatlm: `qatlm eval DIR/FILE.gguf`"], [])
    if kind == "compressed-tensors":
        direct = ["transformers (with compressed-tensors): `AutoModelForCausalLM.from_pretrained(DIR)`"]
        r = route("vllm", spec, widths) if spec is not None else None
        if r is not None and r.format == "compressed-tensors":
            direct.append("vLLM: `vllm serve DIR` (declared float16: the step sizes are exact)")
        return direct, ([f"vLLM: none ({r.why})"] if r is not None and r.format is None else [])
    direct = ["qatlm: `qatlm.load_quantized(DIR)`, `qatlm eval DIR`, `qatlm generate DIR`"]
    if kind == "gptq" and route("transformers", spec, widths).format == "gptq":
        direct.append("transformers + gptqmodel (`qatlm install gptq`): `AutoModelForCausalLM.from_pretrained(DIR)`")
    exports = []
    for rt in ("vllm", "llama.cpp", "transformers"):
        r = route(rt, spec, widths)
        if rt == "transformers" and r.format == "gptq":
            continue  # this folder is that export
        exports.append(r.hint(path).replace("qatlm export", "`qatlm export", 1).replace(" --out DIR", f" --out DIR-{rt}`", 1))
    return direct, exports


def _training_lines(summary) -> list[str]:
    if summary is None:
        return []
    out = []
    b = summary.block_ap
    if b is not None and b.blocks:
        c = b.config
        rtn = sum(x.rtn_rel_error for x in b.blocks) / len(b.blocks)
        trained = sum(x.trained_rel_error for x in b.blocks) / len(b.blocks)
        out.append(f"- Block-AP: {len(b.blocks)} blocks, {b.steps_per_block} steps each on {c.get('calib_samples')} x "
                   f"{c.get('calib_seqlen')} calibration tokens of `{Path(str(c.get('calib'))).name}`; mean relative block "
                   f"error {rtn:.4g} (RTN) -> {trained:.4g} (trained)")
    for name, e in (("E2E-QP", summary.e2e_qp), ("DL-QAT", summary.dl_qat)):
        if e is not None and e.val_losses:
            out.append(f"- {name}: {e.steps} steps on `{Path(str(e.config.get('data'))).name}`; validation loss "
                       f"{e.val_loss_before:.4f} -> {e.val_loss_after:.4f}"
                       + (" (it bought nothing: the model it started from is returned unchanged)" if e.bought_nothing else ""))
    return out


def model_card(*, source: str | None, method: str, grid: str, kind: str, spec=None, summary=None, bits_per_weight=None,
               note: str | None = None, widths=()) -> str:
    """The text of ``README.md`` for an output folder. ``kind``: gptq, kquant, gguf or compressed-tensors."""
    from qatlm.version import __version__

    direct, exports = _runtimes(kind, spec, widths=widths)
    front = ["---", "library_name: " + ("gguf" if kind == "gguf" else "transformers"), "pipeline_tag: text-generation",
             "tags:", "- qatlm", "- quantized", f"- {grid}", f"- {kind}"]
    if source and "/" in source:
        front += [f"base_model: {source}", "base_model_relation: quantized"]
    front.append("---")
    body = [f"# {source or 'model'} — {method}, {grid}", "",
            f"Quantized with [qatlm](https://pypi.org/project/qatlm/) {__version__}: recipe `{method}` on the `{grid}` grid"
            + (f", {bits_per_weight:.2f} bits per quantized weight (scales and zero points counted)" if bits_per_weight else "") + ".",
            ""]
    lines = _training_lines(summary)
    if lines:
        body += ["## Training", "", *lines, ""]
    body += ["## Loads in", "", *[f"- {r}" for r in direct], ""]
    if exports:
        body += ["## Other runtimes", "", *[f"- {r}" for r in exports], ""]
    if note:
        body += [note, ""]
    return "\n".join(front + [""] + body)


def write_card(folder: Path, **kw) -> Path:
    """``README.md`` in ``folder``; a packed checkpoint's layer widths (what vLLM's kernels need) are read from the
    folder's own weights."""
    if kw.get("spec") is not None and kw.get("kind") in ("gptq", "compressed-tensors") and "widths" not in kw:
        from qatlm.export.runtimes import checkpoint_widths

        kw["widths"] = checkpoint_widths(folder) if kw["kind"] == "gptq" else _ct_widths(folder)
    path = Path(folder) / CARD
    path.write_text(model_card(**kw))
    return path


def _ct_widths(folder: Path) -> list[int]:
    """Input widths of a compressed-tensors folder's quantized layers (``weight_shape`` tensors, read from the files)."""
    from safetensors import safe_open

    from qatlm.model.source import weight_files

    widths = set()
    for f in weight_files(folder):
        with safe_open(f, framework="pt") as fh:
            widths |= {int(fh.get_tensor(k)[1]) for k in fh.keys() if k.endswith(".weight_shape")}
    return sorted(widths)


def add_evaluation(folder, row: dict) -> bool:
    """Write what ``qatlm eval`` measured (``row``) into a qatlm output folder's card, replacing an earlier evaluation;
    False (nothing written) for a folder without a qatlm card."""
    from qatlm.io import atomic_write_text

    path = Path(folder) / CARD
    if not path.is_file() or "- qatlm" not in path.read_text(errors="replace"):
        return False
    text = path.read_text()
    if "\n## Evaluation\n" in text:  # the earlier evaluation goes
        head, _, rest = text.partition("\n## Evaluation\n")
        text = head + "\n" + rest[rest.find("\n## ") + 1:] if "\n## " in rest else head
    lines = ["## Evaluation", "", f"- held-out perplexity on `{Path(str(row.get('heldout'))).name}` "
                                   f"({row.get('ppl_protocol', '')}): {row['heldout_ppl']:.2f}"]
    if row.get("zeroshot_avg") is not None:
        tasks = ", ".join(f"{t} {v.get('acc_norm', v.get('acc')):.3f}" for t, v in (row.get("zeroshot") or {}).items())
        lines.append(f"- zero-shot average {row['zeroshot_avg']:.3f} ({tasks}; first {row.get('zeroshot_limit') or 'all'} items each)")
    block = "\n".join(lines) + "\n\n"
    text = text.replace("## Loads in", block + "## Loads in", 1) if "## Loads in" in text else text + "\n" + block
    atomic_write_text(path, text)
    return True
