"""``qatlm export SRC --format F --out DIR``: a packed qatlm checkpoint in the layout another runtime loads.

| format               | for                                   | exact?                                                  |
|----------------------|---------------------------------------|---------------------------------------------------------|
| `gptq` (v2)          | transformers + gptqmodel, vLLM, qatlm | bit-exact (the native layout)                           |
| `gptq-v1`            | older GPTQ loaders (stored zero − 1)  | bit-exact; refused when a zero point is 0 (`--v1-zeros`) |
| `gguf`               | llama.cpp                             | see ``gguf_file``: 4/8-bit grids exact up to fp16 mins  |
| `compressed-tensors` | vLLM, transformers                    | bit-exact (`pack-quantized`, sym and asym)              |

``--for vllm|llama.cpp|transformers`` picks the format that runtime loads for this grid, or refuses in one line
(``runtimes.py``). GPTQ and compressed-tensors exports declare ``float16`` in their config, the dtype in which the
fp16 step sizes are exact (vLLM's default ``dtype=auto`` serves a float32 config in bf16), after checking on probe
tokens that no activation comes near fp16's range; a model whose activations do is declared ``bfloat16`` and the
report says by how much the logits move.

Every export is checked before the folder is put in place: GPTQ forms are reloaded with qatlm's
loader and their logits compared with the source; GGUF tensors are decoded with the ``gguf``
package's dequantizer; compressed-tensors layers are decompressed with the library and compared.
A format that cannot hold the checkpoint exactly is refused with the reason, never written lossy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from qatlm.errors import QatlmError
from qatlm.export.card import write_card
from qatlm.io import atomic_dir, check_output

FORMATS = ("gptq", "gptq-v1", "gguf", "compressed-tensors")


def _probe_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits.float()


def _check_gguf_expressible(src: Path, spec) -> None:
    """Refuse what GGUF cannot express (architecture, grid, tensor names) from the config and the headers alone."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from qatlm.export.gguf_file import check_config
    from qatlm.model.source import weight_files

    names = []
    for f in weight_files(src):  # headers only: no tensor is read
        with safe_open(f, framework="pt") as fh:
            names += list(fh.keys())
    check_config(AutoConfig.from_pretrained(src), spec, names)


FP16_LIMIT = 2.0 ** 15  # an activation past half of fp16's largest value (65504) is too near overflow


@torch.no_grad()
def _largest_activation(model, ids) -> float:
    """The largest magnitude of any module's output (and of any weight) on the probe tokens, in float32."""
    top = [max((p.detach().abs().max().item() for p in model.parameters() if p.is_floating_point()), default=0.0)]

    def hook(_m, _i, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                top.append(t.detach().abs().max().item())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return max(top)


def _served_dtype(model, ids, ref, report: dict) -> str:
    """float16 where the probe's activations stay well inside fp16's range, else bfloat16 (with the logit shift
    bf16 brings, measured, in the report)."""
    top = _largest_activation(model, ids)
    report["largest_activation"] = round(top, 1)
    if top < FP16_LIMIT:
        return "float16"
    import copy

    shift = (_logits(copy.deepcopy(model).to(torch.bfloat16), ids) - ref).abs().max().item()  # (a copy: the export keeps fp16 steps)
    report["warning"] = (f"activations reach {top:.3g}, too near fp16's limit (65504): declared bfloat16, in which the fp16 step "
                         f"sizes round (logits move by up to {shift:.3g} on the probe tokens)")
    return "bfloat16"


def _pick_format(src: Path, fmt, runtime) -> tuple[str, object]:
    """(format, route): ``runtime`` (``--for``) decides the format, or refuses with the reason none loads."""
    from qatlm.export.runtimes import checkpoint_widths, route
    from qatlm.model.checkpoint import read_quant_config, spec_from_config
    from qatlm.model.source import check_model_dir, is_quantized_dir

    if runtime is None:
        return fmt, None
    if fmt is not None:
        raise QatlmError("give --format or --for, not both")
    if not is_quantized_dir(check_model_dir(src)):
        raise QatlmError(f"{src} is a full-precision model: --for picks the export of a quantized checkpoint "
                         "(a float model goes to llama.cpp as --format gguf)")
    r = route(runtime, spec_from_config(read_quant_config(src)[1]), checkpoint_widths(src))
    if r.format is None:
        raise QatlmError(r.why)
    return r.format, r


def export_checkpoint(src, fmt: str | None, out, overwrite: bool = False, float_type: str = "f16", runtime: str | None = None) -> dict:
    """Export the qatlm/GPTQ checkpoint ``src`` to ``out`` in format ``fmt``, or in the format ``runtime`` loads
    (``fmt`` None); returns a report (also written to ``out/export_report.json``)."""
    from qatlm.model.checkpoint import load_quantized, load_tokenizer, read_quant_config, save_quantized, spec_from_config
    from qatlm.model.layers import packed_layers
    from qatlm.model.source import check_model_dir, is_quantized_dir

    src, out = Path(src).expanduser(), Path(out).expanduser()
    check_output(out, [src], overwrite)
    fmt, via = _pick_format(src, fmt, runtime)
    if fmt not in FORMATS:
        raise QatlmError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if fmt == "gguf" and not is_quantized_dir(check_model_dir(src)):
        return _export_float_gguf(src, out, float_type)
    _, qc = read_quant_config(src)
    spec = spec_from_config(qc)
    if spec.kformat is not None and fmt != "gguf":
        kind = "mix of llama.cpp types (--grid k)" if spec.mixed else spec.format
        raise QatlmError(f"a {kind} checkpoint exports to gguf only (its layers are llama.cpp K-quant blocks, "
                         f"which {fmt} cannot hold)")
    if fmt == "gguf":  # what GGUF cannot express is refused before the model is loaded
        _check_gguf_expressible(src, spec)
    t0 = time.time()
    model = load_quantized(src, dtype=torch.float32)
    tok = load_tokenizer(src)
    layers = packed_layers(model)
    ids = _probe_ids(model.config.vocab_size)
    ref = _logits(model, ids)
    meta = dict((qc.get("meta") or {}).get("qatlm") or {})
    report = {"source": src.name, "format": fmt, "grid": spec.tag}
    if via is not None:
        report["for"] = via.runtime
    dtype = _served_dtype(model, ids, ref, report) if fmt != "gguf" else None
    if dtype:
        report["dtype"] = dtype
    if via is not None and via.regroup:
        spec = _regroup(model, layers, spec, via.regroup, report)
        layers = packed_layers(model)

    def build(tmp: Path):
        if fmt in ("gptq", "gptq-v1"):
            from qatlm.export.gptq import to_v1_zeros

            if fmt == "gptq-v1":
                to_v1_zeros(layers)
            save_quantized(model, tmp, spec, tokenizer=tok, overwrite=True, meta=meta, declare=dtype,
                           checkpoint_format="gptq" if fmt == "gptq-v1" else "gptq_v2", in_place=True)
            back = load_quantized(tmp, dtype=torch.float32)
            report["reload_max_logit_diff"] = (_logits(back, ids) - ref).abs().max().item()
            if report["reload_max_logit_diff"] != 0.0:
                raise QatlmError(f"{fmt} export does not reload to the same model (logits differ by {report['reload_max_logit_diff']:.3g})")
        elif fmt == "gguf":
            from qatlm.export.gguf_file import write_gguf

            name = f"{src.name}.gguf" if spec.tag in src.name else f"{src.name}-{spec.tag}.gguf"  # no '-w4g128-w4g128'

            report.update(write_gguf(model, spec, src, tmp / name, float_type=float_type))
            report["file"] = name
            kinds = [v["type"] for v in report["layers"].values()]
            report["ggml_types"] = {k: kinds.count(k) for k in sorted(set(kinds))}
            if spec.bits in (2, 3) and spec.kformat is None:
                report["warning"] = (f"{spec.bits}-bit codes are stored losslessly in 4-bit {report['ggml_type']} blocks "
                                     "(llama.cpp's 2/3-bit K-quants cannot hold these step sizes exactly): the file is ~5 bits per weight")
        else:
            _write_compressed(model, layers, spec, tmp, tok, meta, dtype)  # compress_layer checks every layer's integers
        write_card(tmp, source=meta.get("source") or src.name, method=meta.get("method", "gptq"), grid=spec.tag,
                   kind="gguf" if fmt == "gguf" else "compressed-tensors" if fmt == "compressed-tensors" else "gptq", spec=spec,
                   note=f"Exported by `qatlm export --format {fmt}` from a qatlm checkpoint; `export_report.json` holds the checks.")
        report["seconds"] = round(time.time() - t0, 1)
        report["size_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")

    atomic_dir(out, build)
    return report


def _export_float_gguf(src: Path, out: Path, float_type: str) -> dict:
    """A full-precision model folder as an f16/f32 GGUF: what llama.cpp's own quantizer starts from."""
    from transformers import AutoConfig

    from qatlm.export.gguf_file import check_config, write_gguf
    from qatlm.model.checkpoint import load_fp_model

    check_config(AutoConfig.from_pretrained(src), None)
    t0 = time.time()
    model = load_fp_model(src, dtype=torch.float32)
    report = {"source": src.name, "format": "gguf", "grid": float_type}

    def build(tmp: Path):
        name = f"{src.name}-{float_type}.gguf"
        report.update(write_gguf(model, None, src, tmp / name, float_type=float_type))
        report["file"] = name
        write_card(tmp, source=src.name, method="full precision", grid=float_type, kind="gguf",
                   note="Not quantized: the input llama.cpp's own quantizer (`llama-quantize`) takes.")
        report["seconds"] = round(time.time() - t0, 1)
        report["size_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")

    atomic_dir(out, build)
    return report


def _regroup(model, layers: dict, spec, group: int, report: dict):
    """Write each layer's groups of ``spec.group_size`` as groups of ``group`` (which divides it and every width): the
    same integers, each step size and zero point repeated over the pieces of its group — the same weights exactly.
    Returns the grid the export is written on."""
    import dataclasses

    from qatlm.model.layers import swap_layers
    from qatlm.quant.linear import PackedLinear

    def split(_name, layer):
        own = layer.spec
        if own.group_size == -1 or own.group_size == group or own.group_size % group:
            return layer
        fine = dataclasses.replace(own, group_size=group)
        q, z, s16 = layer.integers()
        idx = torch.arange(fine.num_groups(layer.in_features)) * group // own.group_size
        return PackedLinear.from_integers(q, z[:, idx], s16[:, idx], layer.bias, fine, dtype=layer.compute_dtype)

    swap_layers(model, split, names=list(layers))
    report["regrouped"] = {"from": spec.group_size, "to": group}
    return dataclasses.replace(spec.plain, group_size=group) if spec.group_size % group == 0 else spec.plain


def _write_compressed(model, layers: dict, spec, folder: Path, tok, meta: dict, dtype: str):
    from torch import nn

    from qatlm.export.compressed import compress_layer, quantization_config, scheme_for
    from qatlm.io import write_shards
    from qatlm.model.checkpoint import SHARD_BYTES, _tied_duplicates

    by_grid: dict = {}
    for name, layer in layers.items():  # one config group per grid (a mixed model has several)
        by_grid.setdefault(layer.spec, []).append(name)
    schemes = {g: scheme_for(g, names if len(by_grid) > 1 else ("Linear",)) for g, names in by_grid.items()}
    sd = model.state_dict()
    for k in _tied_duplicates(sd):
        sd.pop(k)
    out = {}
    store = getattr(torch, dtype)  # what the runtime computes in: stored so where that loses nothing (a smaller file)

    def lossless(v):
        return v.is_floating_point() and torch.equal(v.to(store).to(v.dtype), v)

    for k, v in sd.items():
        if k.rpartition(".")[0] in layers:
            continue
        out[k] = (v.to(store) if lossless(v) else v).detach().contiguous().cpu()
    for name, layer in layers.items():
        for leaf, t in compress_layer(layer, schemes[layer.spec]).items():
            out[f"{name}.{leaf}"] = t.contiguous().cpu()
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias.detach().contiguous().cpu()
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    write_shards(out.items(), folder, SHARD_BYTES)
    model.config.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    qcfg = quantization_config(list(schemes.values()), ignore)
    qcfg["qatlm"] = meta
    cfg["quantization_config"] = qcfg
    cfg["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tok is not None:
        tok.save_pretrained(folder)


def export_checks(r: dict, fmt: str) -> str:
    """What an export verified, in words (the line ``qatlm export`` closes with)."""
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
    return "; ".join(checks)
