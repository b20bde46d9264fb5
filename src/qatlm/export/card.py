"""The model card every qatlm output folder carries: ``README.md`` in the Hugging Face convention (YAML front matter
the hub reads, then prose): what the model is quantized from, the method and grid, the calibration, the quality
measured during the run, and how to load it in each runtime that loads this very folder (others: the export that
serves them). ``qatlm upload`` sends a folder that has one."""

from __future__ import annotations

from pathlib import Path

CARD = "README.md"


def _runtimes(kind: str, spec=None, path: str = "DIR") -> tuple[list[str], list[str]]:
    """(runtimes that load this folder as it is, with how; the exports other runtimes need)."""
    if kind == "kquant":
        return (["qatlm: `qatlm.load_quantized(DIR)`, `qatlm eval DIR`, `qatlm generate DIR`"],
                [f"llama.cpp and transformers' GGUF loader: `qatlm export {path} --format gguf --out DIR-gguf` (bit-exact)"])
    if kind == "gguf":
        return (["llama.cpp: `llama-cli -m DIR/FILE.gguf`", "transformers: `AutoModelForCausalLM.from_pretrained(DIR, gguf_file=FILE)`",
                 "qatlm: `qatlm eval DIR/FILE.gguf`"], [])
    if kind == "compressed-tensors":
        direct = ["transformers (with compressed-tensors): `AutoModelForCausalLM.from_pretrained(DIR)`"]
        if spec is not None and spec.bits in (4, 8):
            direct.append("vLLM: `vllm serve DIR`")
        return direct, ([] if spec is None or spec.bits in (4, 8) else ["vLLM: no kernel for 2- or 3-bit weights"])
    direct = ["qatlm: `qatlm.load_quantized(DIR)`, `qatlm eval DIR`, `qatlm generate DIR`",
              "transformers + gptqmodel (`qatlm install gptq`): `AutoModelForCausalLM.from_pretrained(DIR)`"]
    exports = [f"llama.cpp: `qatlm export {path} --format gguf --out DIR-gguf`"]
    if spec is not None and spec.sym and spec.bits in (4, 8):
        direct.append("vLLM: `vllm serve DIR` (symmetric 4/8-bit GPTQ)")
    elif spec is not None and spec.bits in (4, 8):
        exports.append(f"vLLM: `qatlm export {path} --format compressed-tensors --out DIR-ct` (vLLM's GPTQ kernels take "
                       "symmetric grids only)")
    else:
        exports.append("vLLM: no kernel for 2- or 3-bit weights; use llama.cpp with a K-quant grid (`--grid q2_k|q3_k`)")
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
                       f"{e.val_loss_before:.4f} -> {e.val_loss_after:.4f}")
    return out


def model_card(*, source: str | None, method: str, grid: str, kind: str, spec=None, summary=None, bits_per_weight=None,
               note: str | None = None) -> str:
    """The text of ``README.md`` for an output folder. ``kind``: gptq, kquant, gguf or compressed-tensors."""
    from qatlm.version import __version__

    direct, exports = _runtimes(kind, spec)
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
    path = Path(folder) / CARD
    path.write_text(model_card(**kw))
    return path


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
