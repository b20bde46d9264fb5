"""Training plots."""

from __future__ import annotations

import json
from pathlib import Path


def loss_curve(log_path, png_path, summary: dict | None = None):
    """Per-step training loss (log scale), one colour band per block, and per-block MSE before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r and "block" in r]
    fig, axes = plt.subplots(1, 2 if summary else 1, figsize=(12 if summary else 7, 3.8), squeeze=False)
    ax = axes[0][0]
    ax.plot(range(len(steps)), [r["loss"] for r in steps], lw=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("optimisation step (all blocks)")
    ax.set_ylabel("block MSE loss")
    ax.set_title("Block-AP training loss")
    if summary:
        b = summary["blocks"]
        ax2 = axes[0][1]
        ax2.plot([x["block"] for x in b], [x["rtn_mse"] for x in b], "o-", label="RTN init")
        ax2.plot([x["block"] for x in b], [x["trained_mse"] for x in b], "o-", label="after Block-AP")
        ax2.set_yscale("log")
        ax2.set_xlabel("block")
        ax2.set_ylabel("validation MSE vs fp block")
        ax2.legend()
        ax2.set_title("per-block reconstruction error")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
