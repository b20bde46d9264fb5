"""The training loops, in one place.

- ``train_epochs``: the step loop every method composes: AdamW with parameter groups, warmup + cosine decay
  to a floor, gradient-norm clipping, per-step JSON logging, and recovery from non-finite losses (restore
  the last good state, halve the learning rate, retry the epoch). Block-AP trains each block with it.
- ``train_end_to_end``: the end-to-end loop of E2E-QP and DL-QAT around it: data (text windows or instruction
  records), the LM loss, gradient accumulation, data-parallel processes (accelerate), periodic validation and
  a resumable checkpoint (``Trainable`` says what a method trains and how it folds back into packed layers)."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from qatlm.data.examples import build_examples
from qatlm.errors import QatlmError
from qatlm.io import atomic_dir, atomic_write_text, resume_point, tidy_output
from qatlm.quant.linear import PackedLinear


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


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand heap memory that Python/torch already freed back to the OS (glibc ``malloc_trim``).

    Between Block-AP blocks many mid-sized tensors are freed; glibc keeps the pages, so the RSS
    creeps up block after block although nothing is alive. A no-op where glibc is absent."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


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
    lr_scale, retries, step, t0, last, vals = 1.0, 0, first_step, time.time(), float("nan"), []
    step_time = 0.0
    epoch = first_epoch
    best_val = float("inf")
    while epoch < epochs:
        # the epoch's starting point is kept in host memory (on a GPU it would cost 3x the trained tensors' bytes)
        snap = [p.detach().to("cpu", copy=True) for p in params] if recover else None
        opt_snap = _to_host(opt.state_dict()) if recover else None
        start_step = step
        failed = False
        for batch in batches(epoch):
            ts = time.perf_counter()
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * lr_scale * schedule.factor(step)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                failed = True
                break
            if backward:
                loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
            if not torch.isfinite(gnorm):
                failed = True
                break
            opt.step()
            last = loss.item()
            step_time += time.perf_counter() - ts
            log.write(**extra, epoch=epoch, step=step, loss=last, grad_norm=float(gnorm), lr=opt.param_groups[0]["lr"])
            step += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{last:.3g}", val=f"{vals[-1]:.3g}" if vals else "-")
            if on_step is not None:
                on_step(step, opt)
        if failed:
            retries += 1
            log.write(**extra, event="non_finite_loss", epoch=epoch, step=step, retry=retries, lr_scale=lr_scale / 2)
            where = ", ".join(f"{k} {v}" for k, v in extra.items()) or "training"
            if retries > max_retries or not recover:
                raise QatlmError(f"{where}: loss stayed non-finite after {max_retries} retries with lower learning rates")
            with torch.no_grad():
                for p, v in zip(params, snap):
                    p.copy_(v)
            opt.load_state_dict(opt_snap)
            lr_scale /= 2
            if progress is not None:
                progress.update(-(step - start_step))
            step = start_step
            continue
        if val_fn is not None:
            v = val_fn()
            vals.append(v)
            log.write(**extra, epoch=epoch, step=step, val_loss=v)
            if early_stop and v > best_val and recover:  # worse than the last epoch: go back to it and stop
                with torch.no_grad():
                    for p, old in zip(params, snap):
                        p.copy_(old)
                return LoopResult(step, time.time() - t0, last, vals, retries, stopped_early=True, step_seconds=step_time)
            best_val = min(best_val, v)
        epoch += 1
    return LoopResult(step, time.time() - t0, last, vals, retries, step_seconds=step_time)


def _save_state(folder: Path, named: dict, opt, step: int, epoch: int, meta: dict):
    """Trainable tensors (by parameter name) and AdamW moments as safetensors (never pickled) + JSON counters."""
    atomic_dir(folder, lambda tmp: _write_state(tmp, named, opt, step, epoch, meta))


def _write_state(tmp: Path, named: dict, opt, step: int, epoch: int, meta: dict):
    save_file({n: p.detach().cpu().contiguous() for n, p in named.items()}, tmp / "trainable.safetensors")
    moments, steps = {}, {}
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    for p, st in opt.state.items():
        i = index[id(p)]
        moments[f"{i}.exp_avg"] = st["exp_avg"].cpu().contiguous()
        moments[f"{i}.exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
        steps[i] = float(st["step"])
    save_file(moments, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "epoch": epoch, "adam_steps": steps, **meta}))


def _load_state(folder: Path, named: dict, opt) -> dict:
    params = load_file(folder / "trainable.safetensors")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(params[n])
    state = json.loads((folder / "state.json").read_text())
    moments = load_file(folder / "optimizer.safetensors")
    plist = [p for g in opt.param_groups for p in g["params"]]
    for i_str, step in state["adam_steps"].items():
        i = int(i_str)
        p = plist[i]
        opt.state[p] = {"step": torch.tensor(step), "exp_avg": moments[f"{i}.exp_avg"].to(p.device),
                        "exp_avg_sq": moments[f"{i}.exp_avg_sq"].to(p.device)}
    return state


@dataclass
class Trainable:
    """What an end-to-end method trains: AdamW groups (with their lr), and how to fold it back into packed layers."""

    groups: list
    merge: object  # callable() -> number of layers packed again
    info: dict


def train_end_to_end(model, config, tokenizer, make_trainable, method: str, work_dir=None, resume: bool = False,
                     progress: bool = True, accelerator=None, cache_dir=None, device=None) -> dict:
    """The end-to-end loop every method shares: ``make_trainable(model, config, total_steps)`` turns the
    packed layers into trainable ones and names what to train; the LM loss trains it; the layers are
    packed again at the end. ``config``: an ``E2EQPConfig`` (or a subclass: DL-QAT's). Returns a summary."""
    from accelerate import Accelerator

    from qatlm.data.instruct import collate

    # --device cpu trains on the CPU even where a GPU is visible; otherwise the GPU when there is one
    on_cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
    acc = accelerator or Accelerator(cpu=on_cpu, mixed_precision="no" if on_cpu else "bf16")
    world, rank = acc.num_processes, acc.process_index
    if config.batch_size % (world * config.grad_accum):
        raise QatlmError(f"global batch {config.batch_size} must be divisible by processes x accumulation ({world} x {config.grad_accum})")
    micro = config.batch_size // (world * config.grad_accum)
    max_len = getattr(model.config, "max_position_embeddings", None)
    train, val, mode = build_examples(config, tokenizer, max_len, cache_dir)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = make_trainable(model, config, total)
    groups = trainable.groups
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if config.grad_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x: the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(acc.device)
    model.train()
    ddp_model = acc.prepare_model(model) if world > 1 else model
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    work = Path(work_dir) if work_dir else None
    ckpt = work / "checkpoint" if work else None
    first_step = first_epoch = 0
    if work:
        tidy_output(ckpt)  # a kill between the two renames of a checkpoint replacement left the old one aside
    fingerprint = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:16]
    if work and resume_point(ckpt / "state.json", fingerprint, resume, lambda st: f"step {st['step']}/{total}") is not None:
        state = _load_state(ckpt, named, opt)
        first_step, first_epoch = state["step"], state["epoch"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    log = JsonLog(work / "train_log.jsonl" if (work and acc.is_main_process) else None,
                  keep=lambda r: r.get("step", 0) < first_step or (r.get("step") == first_step and "loss" not in r))

    def batches(epoch):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 7919 + epoch)).tolist()
        start = first_step - epoch * steps_per_epoch if epoch == first_epoch else 0
        for b in range(max(start, 0), steps_per_epoch):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            yield idx[rank::world]  # this process's slice of the global batch

    def lm_loss(m, batch):
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        with acc.autocast():
            return m(**batch, use_cache=False).loss

    def loss_fn(local_idx):
        """Forward + backward over this process's micro-batches; returns the global mean loss."""
        chunks = [local_idx[i : i + micro] for i in range(0, len(local_idx), micro)]
        total_loss = torch.zeros((), device=acc.device)
        for j, ch in enumerate(chunks):
            ctx = acc.no_sync(ddp_model) if (world > 1 and j < len(chunks) - 1) else contextlib.nullcontext()
            with ctx:
                loss = lm_loss(ddp_model, collate([train[i] for i in ch], pad)) / len(chunks)
                loss.backward()  # always, even if not finite: every process must join the gradient all-reduce
            total_loss += loss.detach()
        return acc.reduce(total_loss, reduction="mean") if world > 1 else total_loss

    @torch.no_grad()
    def val_fn():
        if not val:
            return float("nan")
        model.eval()
        tot = sum(lm_loss(model, collate([ex], pad)).item() for ex in val) / len(val)
        model.train()
        return tot

    vals = []
    last_save = [time.time()]

    def on_step(done, optimizer):  # done = optimizer steps taken so far
        if config.val_every and done % config.val_every == 0 and done < total:
            v = val_fn()
            vals.append((done, v))
            log.write(step=done, val_loss=v)
        every = config.save_every or steps_per_epoch
        due = done % every == 0 or (config.save_minutes > 0 and time.time() - last_save[0] >= 60 * config.save_minutes)
        if world > 1:  # every process must take the same decision (the main process's clock decides)
            flag = torch.tensor([int(due)], device=acc.device)
            torch.distributed.broadcast(flag, 0)
            due = bool(flag.item())
        if work and due and done < total:
            if acc.is_main_process:
                _save_state(ckpt, named, optimizer, done, done // steps_per_epoch, {"fingerprint": fingerprint, "config": asdict(config)})
            last_save[0] = time.time()
            acc.wait_for_everyone()

    before = val_fn()
    bar = tqdm(total=total, initial=first_step, desc=method, unit="step", disable=not (progress and acc.is_main_process))
    t0 = time.time()
    res = train_epochs(groups, loss_fn, batches, config.epochs, steps_per_epoch, clip=config.clip_grad,
                       schedule=Schedule(total, config.warmup_ratio, config.min_lr_ratio), val_fn=val_fn, log=log,
                       log_extra={"method": method}, progress=bar, backward=False, optimizer=opt,
                       first_epoch=first_epoch, first_step=first_step, on_step=on_step)
    bar.close()
    log.close()
    model.eval()
    if config.grad_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    n = trainable.merge()
    n_train = sum(p.numel() for p in named.values())
    n_total = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear))
    return {"method": method, "mode": mode, "config": asdict(config), **trainable.info, "layers": n, "trainable_params": n_train,
            "trainable_fraction": n_train / n_total,
            "val_loss_before": before, "val_losses": res.val_losses, "periodic_val": vals, "steps": res.steps,
            "retries": res.retries, "seconds": round(time.time() - t0, 1), "processes": world}


def run_end_to_end(model, config, context, make_trainable, method: str) -> dict:
    """The method protocol (``methods/base.py``) of an end-to-end method: ``train_end_to_end`` with the context's
    tokenizer, device, work folder, resume flag, progress, asset cache and accelerator."""
    if context.tokenizer is None:
        raise QatlmError(f"{method} trains end to end on text: pass a tokenizer")
    return train_end_to_end(model, config, context.tokenizer, make_trainable, method, context.work_dir, context.resume,
                            context.progress, context.accelerator, context.cache_dir, device=context.device)

