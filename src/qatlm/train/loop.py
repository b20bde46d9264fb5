"""The step loop every method composes (Block-AP per block, the end-to-end loop over the model): AdamW with
parameter groups, warmup + cosine decay to a floor, gradient-norm clipping, per-step JSON logging, and recovery
from non-finite losses (restore the epoch's starting point, halve the learning rate, redo the epoch)."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from qatlm.errors import QatlmError
from qatlm.io import atomic_write_text


@dataclass
class Schedule:
    total_steps: int
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.05  # cosine decays to lr/20

    def factor(self, step: int) -> float:
        warm = int(self.total_steps * self.warmup_ratio)
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, self.total_steps - warm)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


class JsonLog:
    """Append-only JSON-lines log (one object per step or event).

    ``keep(record) -> bool``: a resumed run first drops what the killed attempt logged past the point it
    resumes from, so the log reads as one uninterrupted run."""

    def __init__(self, path=None, keep=None):
        self.path = path
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if keep is not None and Path(path).exists():
                lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
                kept = []
                for ln in lines:
                    try:
                        rec = json.loads(ln)
                    except json.JSONDecodeError:  # a line cut by the kill
                        continue
                    if keep(rec):
                        kept.append(ln)
                atomic_write_text(Path(path), "".join(ln + "\n" for ln in kept))
        self.fh = open(path, "a") if path else None

    def write(self, **rec):
        if self.fh:
            self.fh.write(json.dumps(rec) + "\n")
            self.fh.flush()

    def close(self):
        if self.fh:
            self.fh.close()


@dataclass
class LoopResult:
    steps: int
    seconds: float
    last_loss: float
    val_losses: list
    retries: int
    stopped_early: bool = False
    step_seconds: float = 0.0  # time inside the optimisation steps only (no validation, no snapshots)


def _to_host(obj):
    """A copy of an optimizer state dict with every tensor in host memory (``load_state_dict`` moves them back)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return copy.deepcopy(obj)


def train_epochs(
    groups: list[dict],
    loss_fn: Callable[[object], torch.Tensor],
    batches: Callable[[int], Iterable],
    epochs: int,
    steps_per_epoch: int,
    *,
    clip: float | None = 1.0,
    schedule: Schedule | None = None,
    val_fn: Callable[[], float] | None = None,
    early_stop: bool = False,
    max_retries: int = 3,
    log: JsonLog | None = None,
    log_extra: dict | None = None,
    progress=None,
    recover: bool = True,
    backward: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    first_epoch: int = 0,
    first_step: int = 0,
    on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> LoopResult:
    """Train ``groups`` (AdamW param groups with their own ``lr``) for ``epochs`` epochs.

    ``batches(epoch)`` yields the epoch's batches (the caller shuffles, seeded by epoch, and skips
    what a resumed run already did); ``loss_fn(batch)`` returns a scalar loss — already
    back-propagated when ``backward=False`` (gradient accumulation, distributed no_sync).
    With ``recover`` the trained tensors are snapshotted at the start of every epoch; a non-finite
    loss or gradient restores them, halves every learning rate and redoes the epoch.
    ``on_step(steps_done, optimizer)`` runs after every optimizer step (periodic validation, checkpoints).
    """
    params = [p for g in groups for p in g["params"]]
    base_lrs = [g["lr"] for g in groups]
    schedule = schedule or Schedule(epochs * steps_per_epoch)
    log = log or JsonLog()
    extra = log_extra or {}
    opt = optimizer or torch.optim.AdamW(groups, weight_decay=0.0)
    run = _Run(opt, params, base_lrs, schedule, clip, log, extra, progress, on_step, backward, step=first_step)
    retries, t0, epoch, best_val = 0, time.time(), first_epoch, float("inf")
    while epoch < epochs:
        # the epoch's starting point is kept in host memory (on a GPU it would cost 3x the trained tensors' bytes)
        snap = snapshot(params) if recover else None
        opt_snap = _to_host(opt.state_dict()) if recover else None
        start_step = run.step
        if not all(run.take(loss_fn, batch, epoch) for batch in batches(epoch)):
            retries += 1
            log.write(**extra, event="non_finite_loss", epoch=epoch, step=run.step, retry=retries, lr_scale=run.lr_scale / 2)
            where = ", ".join(f"{k} {v}" for k, v in extra.items()) or "training"
            if retries > max_retries or not recover:
                raise QatlmError(f"{where}: loss stayed non-finite after {max_retries} retries with lower learning rates")
            restore(params, snap)
            opt.load_state_dict(opt_snap)
            run.lr_scale /= 2
            if progress is not None:
                progress.update(-(run.step - start_step))
            run.step = start_step
            continue
        if val_fn is not None:
            v = val_fn()
            run.vals.append(v)
            log.write(**extra, epoch=epoch, step=run.step, val_loss=v)
            if early_stop and v > best_val and recover:  # worse than the last epoch: go back to it and stop
                restore(params, snap)
                return run.result(t0, retries, stopped_early=True)
            best_val = min(best_val, v)
        epoch += 1
    return run.result(t0, retries)


def snapshot(params) -> list[torch.Tensor]:
    """A copy of the tensors in host memory (on a GPU it would cost their bytes again on the device)."""
    return [p.detach().to("cpu", copy=True) for p in params]


@torch.no_grad()
def restore(params, values) -> None:
    """Put a ``snapshot`` back into the tensors."""
    for p, v in zip(params, values):
        p.copy_(v)


@dataclass
class _Run:
    """The state of one ``train_epochs`` call that every step updates."""

    opt: torch.optim.Optimizer
    params: list
    base_lrs: list
    schedule: Schedule
    clip: float | None
    log: JsonLog
    extra: dict
    progress: object
    on_step: Callable | None
    backward: bool
    step: int = 0
    lr_scale: float = 1.0
    last: float = float("nan")
    step_time: float = 0.0
    vals: list = None

    def __post_init__(self):
        self.vals = []

    def take(self, loss_fn, batch, epoch: int) -> bool:
        """One optimizer step on ``batch``; False (nothing stepped) when the loss or the gradient is not finite."""
        ts = time.perf_counter()
        for g, lr in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = lr * self.lr_scale * self.schedule.factor(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        if not torch.isfinite(loss):
            return False
        if self.backward:
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip else float("inf"))
        if not torch.isfinite(gnorm):
            return False
        self.opt.step()
        self.last = loss.item()
        self.step_time += time.perf_counter() - ts
        self.log.write(**self.extra, epoch=epoch, step=self.step, loss=self.last, grad_norm=float(gnorm),
                       lr=self.opt.param_groups[0]["lr"])
        self.step += 1
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{self.last:.3g}", val=f"{self.vals[-1]:.3g}" if self.vals else "-")
        if self.on_step is not None:
            self.on_step(self.step, self.opt)
        return True

    def result(self, t0: float, retries: int, stopped_early: bool = False) -> LoopResult:
        return LoopResult(self.step, time.time() - t0, self.last, self.vals, retries, stopped_early=stopped_early,
                          step_seconds=self.step_time)
