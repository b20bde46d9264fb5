"""The sequential-block pipeline: how a block-by-block method (RTN, Block-AP) moves through a model, kept apart
from what it does to each block.

For every decoder block in order: materialise it (a lazily loaded model reads it from the safetensors shards
now, ``model/lazy.py``), let the method work on it, save its packed tensors to the work folder, release it (a
lazily loaded block goes back to the meta device, so host memory stays flat in the number of blocks). A
model held whole in memory is walked the same way; nothing is read or released.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from qatlm.model.arch import find_parts
from qatlm.model.lazy import lazy_source, materialize_block, release_block, save_block


class SequentialBlocks:
    """The decoder blocks of ``model``, one at a time. ``work_dir``: where finished blocks are saved (None: nowhere).
    ``dtype`` / ``device``: where a lazily loaded block is materialised (default: the model's)."""

    def __init__(self, model: nn.Module, work_dir=None, dtype: torch.dtype | None = None, device=None):
        first = next(model.parameters())
        self.model, self.parts = model, find_parts(model)
        self.work_dir = Path(work_dir) if work_dir else None
        self.dtype, self.device = dtype or first.dtype, device or first.device
        self.lazy = lazy_source(model) is not None

    def __len__(self) -> int:
        return len(self.parts.layers)

    def name(self, index: int) -> str:
        return f"{self.parts.layers_name}.{index}"

    def __iter__(self) -> Iterator[tuple[int, nn.Module]]:
        return self.blocks()

    def blocks(self, load: Callable[[int], bool] = lambda i: True) -> Iterator[tuple[int, nn.Module]]:
        """Yield ``(index, block)`` in order; a lazily loaded block is read first when ``load(index)`` (a method that
        only needs a finished block's saved integers says no), and released once the caller is done with it."""
        for i, block in enumerate(self.parts.layers):
            if self.lazy and load(i):
                materialize_block(self.model, i, self.dtype, self.device)
            yield i, block
            if self.lazy:
                release_block(block)

    def save(self, index: int, block: nn.Module, meta: dict | None = None) -> None:
        """Write a finished (packed) block's tensors to the work folder (atomically; nothing without one)."""
        if self.work_dir is not None:
            save_block(self.work_dir, index, block, meta)

    def materialize_all(self) -> None:
        """Load every block (a lazily loaded model that a method needs whole)."""
        if self.lazy:
            for i in range(len(self)):
                materialize_block(self.model, i, self.dtype, self.device)
