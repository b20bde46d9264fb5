"""Data-parallel Block-AP: which calibration samples each process holds, and an epoch order that is the same
for any number of processes."""

from __future__ import annotations

import math

import torch

from qatlm.errors import QatlmError


class Shard:
    """The calibration samples this process holds. One process: all of them. Under ``torchrun`` /
    ``accelerate launch`` (torch.distributed initialised, ``k`` processes): training sample ``i`` belongs to
    process ``(i mod batch) mod k`` and validation sample ``j`` to ``j mod k``; every process keeps the
    activations of its own samples only, computes its share of every batch, and gradients, losses and
    per-sample energies are summed over processes (``all_sum``). Together with ``epoch_batches`` (every batch
    holds ``batch/k`` samples of each process, in an order that does not depend on ``k``) the result is that
    of one process up to float rounding."""

    def __init__(self, n_train: int, n_val: int, batch_size: int):
        dist = torch.distributed
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        if batch_size % self.world:
            raise QatlmError(f"--batch-size {batch_size} must be a multiple of the {self.world} processes "
                             "(each takes an equal part of every batch)")
        mine = [i for i in range(n_train) if (i % batch_size) % self.world == self.rank]
        mine += [n_train + j for j in range(n_val) if j % self.world == self.rank]
        self.ids = torch.tensor(mine, dtype=torch.long)  # global sample numbers held here, ascending
        self.local = torch.full((n_train + n_val,), -1, dtype=torch.long)
        self.local[self.ids] = torch.arange(len(mine))
        self.main = self.rank == 0

    def mine(self, idx: torch.Tensor) -> torch.Tensor:
        """Local cache rows of the samples of ``idx`` (global numbers) that this process holds."""
        rows = self.local[idx]
        return rows[rows >= 0]

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def gather(self, local_values: torch.Tensor, n: int) -> torch.Tensor:
        """A per-sample vector over all ``n`` samples from each process's values of its own samples."""
        full = torch.zeros(n, dtype=local_values.dtype)
        full[self.ids] = local_values
        return self.all_sum(full)

    def any(self, flag: bool) -> bool:
        return bool(self.all_sum(torch.tensor([int(flag)])).item()) if self.world > 1 else flag

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def epoch_batches(n_train: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches of sample numbers. Sample ``i`` sits in column ``i mod batch``; each column is
    shuffled on its own and batch ``j`` takes the ``j``-th sample of every column. So each batch holds
    ``batch/k`` samples of every one of ``k`` processes (``Shard``), and the order is the same for any ``k``."""
    cols = [torch.arange(c, n_train, batch_size) for c in range(min(batch_size, n_train))]
    cols = [c[torch.randperm(len(c), generator=gen)] for c in cols]
    return [torch.stack([c[j] for c in cols if j < len(c)]) for j in range(math.ceil(n_train / batch_size))]


