"""Training plots."""

from __future__ import annotations

import json
from pathlib import Path

from qatlm.summary import BlockAPSummary


def loss_curve(log_path, png_path, block_ap: BlockAPSummary | None = None):
    """The training curves a log holds: Block-AP's per-step loss and per-block relative error before/after (with
    ``block_ap``, its summary), and the end-to-end phase's loss with its validation points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    blocks = [r for r in recs if "loss" in r and "block" in r]
    e2e = [r for r in recs if "loss" in r and "block" not in r]
    panels = [p for p in ("blocks" if blocks else None, "errors" if block_ap and block_ap.blocks else None,
                          "e2e" if e2e else None) if p]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "blocks":
            ax.plot(range(len(blocks)), [r["loss"] for r in blocks], lw=0.6)
            ax.set_yscale("log")
            ax.set_xlabel("optimisation step (all blocks)")
            ax.set_ylabel("block error (relative)")
            ax.set_title("Block-AP training loss")
        elif panel == "errors":
            b = block_ap.blocks
            ax.plot([x.block for x in b], [x.rtn_rel_error for x in b], "o-", ms=3, label="RTN")
            ax.plot([x.block for x in b], [x.trained_rel_error for x in b], "o-", ms=3, label="after Block-AP")
            ax.set_yscale("log")
            ax.set_xlabel("block")
            ax.set_ylabel("validation error vs fp block")
            ax.legend()
            ax.set_title("per-block reconstruction error")
        else:
            ax.plot([r["step"] for r in e2e], [r["loss"] for r in e2e], lw=0.8, label="train")
            vals = [r for r in recs if "val_loss" in r and "block" not in r]
            if vals:
                ax.plot([r["step"] for r in vals], [r["val_loss"] for r in vals], "o", label="validation")
            ax.set_xlabel("step")
            ax.set_ylabel("LM loss")
            ax.legend()
            ax.set_title(f"end-to-end phase ({e2e[0].get('method', '')})")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def allocation_map(layers: dict, png_path, target_bpw: float | None = None):
    """A mixed model's grids as a picture: decoder blocks across, each block's layers down, colour = bits per weight
    of the layer's grid (step sizes and zero points included), the grid written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from qatlm.quant.grid import grid_names, spec_from_tag

    def split(name):
        parts = name.split(".")
        i = next(k for k, p in enumerate(parts) if p.isdigit())
        return int(parts[i]), ".".join(parts[i + 1:])

    cells = {split(n): t for n, t in layers.items()}
    blocks = sorted({b for b, _ in cells})
    kinds = list(dict.fromkeys(k for _, k in sorted(cells, key=lambda c: c[0])))
    grid = np.full((len(kinds), len(blocks)), np.nan)
    for (b, k), t in cells.items():
        s = spec_from_tag(t)
        grid[kinds.index(k), blocks.index(b)] = s.layer_bytes(1024, 1024) * 8 / 1024**2  # as in a 1024 x 1024 layer
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(blocks) + 2.5), 0.45 * len(kinds) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    names = grid_names(set(cells.values()))  # llama.cpp's type names in a K-quant mix
    for (b, k), t in cells.items():
        if len(blocks) <= 40:
            label = names[t] if names[t] != t else t.removesuffix("-sym").replace("g", "\ng", 1)
            ax.text(blocks.index(b), kinds.index(k), label, ha="center", va="center", fontsize=5.5, color="white")
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=6)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
    ax.set_xlabel("decoder block")
    fig.colorbar(im, ax=ax, label="bits per weight of the grid")
    ax.set_title("mixed precision" + (f": budget {target_bpw:g} bits/weight" if target_bpw else ""))
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
