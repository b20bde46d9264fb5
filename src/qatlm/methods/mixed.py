"""Mixed precision: a grid per layer for a budget in bits per weight (``--target-bpw``), chosen by measured sensitivity.

Before the first stage quantizes anything, every target layer of every decoder block is tried on every grid of the
menu (``--bit-menu``) with round-to-nearest, alone, on a few calibration samples: its *sensitivity* on a grid is the
error that layer alone causes at its block's output, per token relative to the block output's norm (what the next
RMSNorm sees, so blocks of any depth and any activation scale compare), summed over the block's tokens. The cost of
a grid is the exact bytes the packed layer takes (``QuantSpec.layer_bytes``, what ``qatlm info`` counts). The
allocation starts every layer on its cheapest grid and buys, while the budget lasts, the upgrade with the largest
drop in error per byte (greedy on each layer's lower convex hull of (bytes, error)): it never exceeds the budget.
A second pass measures the error of each block with all its layers on their chosen grids, beside the sum the
allocation predicted. Blocks are walked with ``model/sequential.py`` (a lazily loaded model streams through).
"""

from __future__ import annotations

import heapq
import json
import time
from dataclasses import asdict, replace

import torch

from qatlm.errors import QatlmError
from qatlm.model.arch import capture_layer_inputs, first_layer_input, fused_group, quant_targets, run_layer
from qatlm.model.sequential import SequentialBlocks
from qatlm.quant.grid import MIN_SCALE, QuantSpec, dequantize, minmax_init, quantize_to_int, spec_from_tag
from qatlm.quant.kquant import kquant_search_init, kquant_weight
from qatlm.quant.linear import check_packable
from qatlm.summary import MixedSummary

SAMPLES = 4  # calibration samples the sensitivity is measured on
ALLOCATION_FILE = "allocation.json"


@torch.no_grad()
def rtn_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``w`` on ``spec``'s grid as round-to-nearest puts it there: min-max steps as the packed layer computes them
    (fp16), or for a K type the start its training layer takes (``KFakeQuantLinear.start``) seen through the format."""
    if spec.kformat is not None:
        scale, zero = kquant_search_init(w, spec)
        return kquant_weight(w.float(), scale, zero, spec).to(w.dtype)
    scale, zero = minmax_init(w, spec)
    s16 = scale.clamp_min(MIN_SCALE).half().float()
    q, z = quantize_to_int(w.float(), s16, zero, spec)
    return dequantize(q, s16, z, spec).to(w.dtype)


def _token_error(y: torch.Tensor, ref: torch.Tensor, norm: torch.Tensor) -> float:
    return float(((y.float() - ref).pow(2).sum(-1) / norm).sum())


def _fits(name: str, lin, spec: QuantSpec) -> bool:
    try:
        check_packable(name, lin.in_features, lin.out_features, spec)
    except QatlmError:
        return False
    return True


@torch.no_grad()
def measure(model, spec: QuantSpec, ids: torch.Tensor, device=None, grids: dict | None = None, progress: bool = False):
    """Per layer, per menu grid: (bytes, sensitivity). With ``grids`` ({layer: QuantSpec}): instead, each block's
    measured error with all its layers on those grids at once. Returns ``({layer: {tag: (bytes, error)}}, [block errors])``."""
    blocks = SequentialBlocks(model, None, None, device)
    parts = blocks.parts
    dev = blocks.device
    _, kwargs = capture_layer_inputs(model, ids[:1].to(dev), parts)
    x = first_layer_input(model, ids.to(dev), parts)
    menu = spec.menu_specs()
    table, block_errors = {}, []
    for bi, block in blocks:
        kw = kwargs[bi]
        ref = run_layer(block, x, kw).float()
        norm = ref.pow(2).sum(-1).clamp_min(1e-30)
        targets = {f"{blocks.name(bi)}.{n}": lin for n, lin in quant_targets(block).items()}
        if grids is not None:
            saved = {n: lin.weight.data for n, lin in targets.items()}
            for n, lin in targets.items():
                lin.weight.data = rtn_weight(saved[n], grids[n])
            block_errors.append(_token_error(run_layer(block, x, kw), ref, norm))
            for n, lin in targets.items():
                lin.weight.data = saved[n]
        else:
            for n, lin in targets.items():
                w0, table[n] = lin.weight.data, {}
                for g in menu:
                    ls = g.layer_spec(lin.in_features)
                    if not _fits(n, lin, ls):
                        continue
                    lin.weight.data = rtn_weight(w0, ls)
                    table[n][ls.tag] = (ls.layer_bytes(lin.in_features, lin.out_features), _token_error(run_layer(block, x, kw), ref, norm))
                    lin.weight.data = w0
                if not table[n]:
                    raise QatlmError(f"{n}: no grid of --bit-menu packs its widths ({lin.in_features} x {lin.out_features})")
        x = ref.to(x.dtype)
        if progress:
            print(f"mixed precision: measured block {bi + 1}/{len(blocks)}", flush=True)
    return table, block_errors


def tied_table(table: dict) -> tuple[dict, dict[str, tuple[str, ...]]]:
    """``table`` with every group of projections a runtime fuses (``fused_group``) as one entry: the grids all its layers
    can take, bytes and sensitivities summed. Returns ``(table, {entry: its layers})``."""
    merged, members, seen = {}, {}, set()
    for name in table:
        if name in seen:
            continue
        group = tuple(m for m in fused_group(name) if m in table) or (name,)
        seen.update(group)
        tags = set.intersection(*(set(table[m]) for m in group))
        if not tags:
            raise QatlmError(f"--tie-fused: {', '.join(group)} have no grid of --bit-menu in common")
        merged[group[0]] = {t: (sum(table[m][t][0] for m in group), sum(table[m][t][1] for m in group)) for t in tags}
        members[group[0]] = group
    return merged, members


def allocate(table: dict, budget_bytes: float, n_weights: int, tie_fused: bool = False) -> dict[str, str]:
    """The grid tag of every layer: least total sensitivity with total bytes <= ``budget_bytes`` (greedy on each layer's
    lower convex hull). With ``tie_fused`` each fused group of projections is one choice. One line when even the
    cheapest grids exceed the budget."""
    if tie_fused:
        merged, members = tied_table(table)
        picked = allocate(merged, budget_bytes, n_weights)
        return {m: picked[entry] for entry, group in members.items() for m in group}
    hulls = {}
    for name, opts in table.items():
        pts = sorted(((b, e, t) for t, (b, e) in opts.items()), key=lambda p: (p[0], p[1]))
        hull = []
        for p in pts:
            if hull and p[1] >= hull[-1][1]:
                continue  # costs more, no less error: dominated
            while len(hull) >= 2:  # keep the hull convex: each upgrade buys less per byte than the one before
                (b1, e1, _), (b2, e2, _) = hull[-2], hull[-1]
                if (e1 - e2) * (p[0] - b2) <= (e2 - p[1]) * (b2 - b1):
                    hull.pop()
                else:
                    break
            hull.append(p)
        hulls[name] = hull
    total = sum(h[0][0] for h in hulls.values())
    if total > budget_bytes:
        raise QatlmError(f"--target-bpw is below what the menu's smallest grids take ({total * 8 / n_weights:.3f} bits "
                         "per weight): raise it or add smaller grids to --bit-menu")
    pick = {n: 0 for n in hulls}
    heap = [(_gain(hulls[n], 0), n) for n in hulls if len(hulls[n]) > 1]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        i = pick[n]
        extra = hulls[n][i + 1][0] - hulls[n][i][0]
        if total + extra > budget_bytes:
            continue  # this layer's next grid does not fit (nor, costing more, do the ones after it)
        total += extra
        pick[n] = i + 1
        if i + 2 < len(hulls[n]):
            heapq.heappush(heap, (_gain(hulls[n], i + 1), n))
    return {n: hulls[n][i][2] for n, i in pick.items()}


def _gain(hull, i) -> float:
    """Minus the error bought per byte by moving from hull point i to i + 1 (a min-heap pops the best first)."""
    (b0, e0, _), (b1, e1, _) = hull[i], hull[i + 1]
    return -(e0 - e1) / max(b1 - b0, 1)


def plan(model, spec: QuantSpec, ids: torch.Tensor, device=None, work_dir=None, resume: bool = False, progress: bool = False):
    """``(spec with every layer's grid, MixedSummary)`` for ``spec.target_bpw``. The allocation is kept in the work folder:
    a resumed run continues with the same grids."""
    t0 = time.time()
    f = work_dir / ALLOCATION_FILE if work_dir is not None else None
    key = {"target_bpw": spec.target_bpw, "menu": spec.menu, "sym": spec.sym, "zero_min": spec.zero_min, "grid": spec.format,
           "tie_fused": spec.tie_fused}
    if f is not None and resume and f.is_file():
        saved = json.loads(f.read_text())
        if saved.get("key") == key:
            s = MixedSummary.from_dict(saved["summary"])
            return _resolved(spec, s.layers), s
    n_weights = sum(lin.in_features * lin.out_features for _, _, lin in _targets(model))
    table, _ = measure(model, spec, ids, device, progress=progress)
    layers = allocate(table, spec.target_bpw * n_weights / 8, n_weights, spec.tie_fused)
    grids = {n: _grid(t, spec) for n, t in layers.items()}
    _, measured = measure(model, spec, ids, device, grids=grids)
    by_block: dict[int, float] = {}
    for n, t in layers.items():
        b = _block_index(n)
        by_block[b] = by_block.get(b, 0.0) + table[n][t][1]
    used = sum(table[n][t][0] for n, t in layers.items())
    counts: dict[str, int] = {}
    for t in layers.values():
        counts[t] = counts.get(t, 0) + 1
    s = MixedSummary(target_bpw=spec.target_bpw, bits_per_weight=8 * used / n_weights, menu=spec.menu,
                     layers=layers, grids=dict(sorted(counts.items())), samples=int(ids.shape[0]), tokens=int(ids.numel()),
                     predicted_block_errors=[by_block.get(i, 0.0) for i in range(len(measured))], measured_block_errors=measured,
                     sensitivity={n: {t: e for t, (_, e) in opts.items()} for n, opts in table.items()},
                     seconds=round(time.time() - t0, 1))
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"key": key, "summary": asdict(s)}) + "\n")
    return _resolved(spec, layers), s


def _block_index(name: str) -> int:
    """The decoder block a target layer is in (its first numeric name part: ``model.layers.3.mlp...`` -> 3)."""
    return next(int(p) for p in name.split(".") if p.isdigit())


def _targets(model):
    blocks = SequentialBlocks(model)
    for bi, block in enumerate(blocks.parts.layers):
        for n, lin in quant_targets(block).items():
            yield blocks.name(bi), n, lin


def _grid(tag: str, spec: QuantSpec) -> QuantSpec:
    return spec_from_tag(tag, spec)


def _resolved(spec: QuantSpec, layers: dict[str, str]) -> QuantSpec:
    base = spec.plain.tag
    return replace(spec, layers=tuple(sorted((n, t) for n, t in layers.items() if t != base)))


def sensitivity_ids(stage, data, tokenizer, cache_dir=None) -> torch.Tensor:
    """The samples the sensitivity is measured on: the first ``SAMPLES`` of the stage's own calibration data (the same
    source, length and seed it trains on), or of the given pre-tokenized data."""
    if data is not None:
        ids = data[0] if isinstance(data, (tuple, list)) else data
        return ids[:SAMPLES]
    if tokenizer is None:
        raise QatlmError("--target-bpw measures each layer's sensitivity on calibration text: the model needs a tokenizer")
    from qatlm.data.text import calibration_samples

    ids, _ = calibration_samples(tokenizer, getattr(stage, "calib", "wikipedia"), SAMPLES, getattr(stage, "calib_seqlen", 512),
                                 getattr(stage, "seed", 0), 0, cache_dir)
    return ids
