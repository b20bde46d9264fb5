"""How a checkpoint is described to a person (``qatlm info``): the figures ``checkpoint_info`` measures, as a table."""

from __future__ import annotations

import json


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _grid_line(info: dict) -> str:
    if info.get("layer_grids"):
        target = f", budget {info['target_bpw']:g} bits/weight" if info.get("target_bpw") else ""
        from qatlm.quant.grid import grid_names

        names, counts = grid_names(info["layer_grids"]), {}
        for t, n in info["layer_grids"].items():  # two grids GGUF stores as one type (w4g32-sym, q4_0: Q4_0) count as one
            counts[names[t]] = counts.get(names[t], 0) + n
        return (f"mixed precision{target}: " + ", ".join(f"{name} x{n}" for name, n in counts.items())
                + (" layers; llama.cpp types" if info.get("grid", "uniform") != "uniform" else
                   f" layers; {'symmetric' if info['sym'] else 'asymmetric'}, {info['format']}"))
    if info.get("grid", "uniform") == "uniform":
        g = "per-channel" if info["group_size"] == -1 else str(info["group_size"])
        return f"{info['bits']}-bit, group {g}, {'symmetric' if info['sym'] else 'asymmetric'}, {info['format']}"
    from qatlm.quant.grid import QuantSpec, ggml_name

    spec = QuantSpec(format=info["grid"])
    if spec.fallback == spec:  # a type of 32-weight blocks: every width that is a multiple of 32
        return f"llama.cpp {spec.kformat.name}"
    return f"llama.cpp {spec.kformat.name} (layers whose width is not a multiple of 256: {ggml_name(spec.fallback)})"


def _training_lines(t: dict | None) -> list[tuple[str, str]]:
    if not t:
        return []
    rows = []
    if t.get("mixed"):
        m = t["mixed"]
        rows.append(("allocation", f"{m['bits_per_weight']:.3f} bits/weight for a budget of {m['target_bpw']:g}, chosen on "
                                   f"{m['samples']} calibration samples; RTN block error predicted {m['predicted_error']:.3g}, "
                                   f"measured {m['measured_error']:.3g} (sum over blocks)"))
    if "blocks" in t:
        fb = t.get("rtn_fallback_blocks") or []
        rows.append(("training", f"Block-AP over {t['blocks']} blocks, {t['steps_per_block']} steps each; mean relative block error "
                                 f"{t['block_rel_error_rtn_mean']:.3g} (RTN) -> {t['block_rel_error_trained_mean']:.3g} (trained)"
                                 + (f"; blocks kept at RTN: {fb}" if fb else "")))
    for key, name in (("e2e_qp", "E2E-QP"), ("dl_qat", "DL-QAT")):
        if t.get(f"{key}_val_loss"):
            before, after = t[f"{key}_val_loss"]
            rows.append(("" if rows else "training", f"{name}: {t[f'{key}_steps']} steps, validation loss {before:.4f} -> {after:.4f}"))
    return rows


def _runtime_lines(info: dict) -> list[tuple[str, str]]:
    """Where the checkpoint loads as it is, then per serving runtime the export it loads for this grid, or why none
    does (``qatlm.export.runtimes``: the facts the serving matrix measured)."""
    from qatlm.export.runtimes import RUNTIMES, checkpoint_widths, route
    from qatlm.model.checkpoint import read_quant_config, spec_from_config

    path = info["path"]
    spec = spec_from_config(read_quant_config(path)[1])
    widths = checkpoint_widths(path)
    if info.get("grid", "uniform") != "uniform":
        here = "qatlm (load_quantized, qatlm eval/generate)"
    else:
        here = "qatlm (load_quantized, qatlm eval/generate); " + (
            f"GPTQModel.load (qatlm install gptq); its {info['expert_layers']} per-expert layers are NOT read by transformers' "
            "from_pretrained, which keeps fused experts and would leave them random" if info.get("expert_layers") else
            "transformers + gptqmodel as it is (qatlm install gptq)")
    if route("transformers", spec, widths).format != "gptq" and info.get("grid", "uniform") == "uniform" and not info.get("expert_layers"):
        here = "qatlm (load_quantized, qatlm eval/generate)"
    rows = [("loads in", here)]
    for rt in RUNTIMES:
        r = route(rt, spec, widths)
        if not (rt == "transformers" and r.format == "gptq"):  # that one is this folder
            rows.append(("", r.hint(path)))
    return rows


def info_rows(info: dict) -> list[tuple[str, str]]:
    """The rows of ``qatlm info``'s table, from ``checkpoint_info``."""
    src = f" from {info['source']}" if info.get("source") else ""
    vs_src = (f"; {info['compression_vs_source']:.2f}x vs the source in {info['source_dtype']}"
              if info.get("compression_vs_source") else "")
    rows = [
        ("checkpoint", info["path"]),
        ("method", f"{info['method']}{src}"),
        ("grid", _grid_line(info)),
        ("quantized weights", f"{info['quantized_params']:,} at {info['bits_per_quantized_weight']:.3f} bits each (scales, zeros, g_idx included)"),
        ("full precision", f"{info['other_params']:,} parameters in {info['other_dtype'] or '-'}: {', '.join(info['kept_in_full_precision']) or 'nothing'}"),
        ("bits per weight", f"{info['bits_per_weight_all']:.2f} over all parameters"),
        ("size on disk", f"{fmt_bytes(info['size_on_disk_bytes'])} (weights {fmt_bytes(info['weights_bytes'])}, of which "
                         f"embeddings/head {100 * info['embedding_share']:.0f}%)"),
        ("compression", f"{info['compression_vs_fp16']:.2f}x vs fp16 ({fmt_bytes(info['fp16_size_bytes'])}){vs_src}"),
    ]
    return rows + _training_lines(info.get("training")) + _runtime_lines(info)


def print_info(path, as_json: bool = False) -> None:
    from qatlm.model.checkpoint import checkpoint_info

    info = checkpoint_info(path)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    rows = info_rows(info)
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
