"""The end-to-end loop of E2E-QP and DL-QAT: data (text windows or instruction records), the LM loss, gradient
accumulation, data-parallel processes (accelerate), periodic validation and a resumable checkpoint. A method says
what it trains and how that folds back into packed layers (``Trainable``); the step loop is ``train/loop.py``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from qatlm.data.examples import build_examples
from qatlm.errors import QatlmError
from qatlm.io import atomic_dir, resume_point, tidy_output
from qatlm.quant.linear import PackedLinear
from qatlm.summary import EndToEndSummary
from qatlm.train.loop import JsonLog, Schedule, train_epochs


def _save_state(folder: Path, named: dict, opt, step: int, epoch: int, meta: dict, best: "_Best"):
    """Trainable tensors (by parameter name), AdamW moments and the best validated tensors as safetensors (never
    pickled) + JSON counters."""
    atomic_dir(folder, lambda tmp: _write_state(tmp, named, opt, step, epoch, {**meta, "best": best.record()}, best))


def _write_state(tmp: Path, named: dict, opt, step: int, epoch: int, meta: dict, best: "_Best"):
    save_file({n: p.detach().cpu().contiguous() for n, p in named.items()}, tmp / "trainable.safetensors")
    save_file({n: t.contiguous() for n, t in best.tensors.items()}, tmp / "best.safetensors")
    moments, steps = {}, {}
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    for p, st in opt.state.items():
        i = index[id(p)]
        moments[f"{i}.exp_avg"] = st["exp_avg"].cpu().contiguous()
        moments[f"{i}.exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
        steps[i] = float(st["step"])
    save_file(moments, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "epoch": epoch, "adam_steps": steps, **meta}))


def _load_state(folder: Path, named: dict, opt, best: "_Best") -> dict:
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
    if "best" in state and (folder / "best.safetensors").is_file():
        best.tensors = load_file(folder / "best.safetensors")
        best.loss, best.step = state["best"]["val_loss"], state["best"]["step"]
    return state


class _Best:
    """The best validated state of what trains (host memory: the trained tensors' bytes once more). Starts as the
    model before the first step, validated; each validation that beats it replaces it; at the end, the model goes
    back to it. So the end-to-end phase never hands back a model worse, on validation, than the one it was given."""

    def __init__(self, named: dict, loss: float):
        self.named, self.loss, self.step = named, loss, 0
        self.tensors = {n: p.detach().to("cpu", copy=True) for n, p in named.items()}

    def offer(self, loss: float, step: int) -> None:
        if math.isfinite(loss) and not loss >= self.loss:  # (a nan start loss, no validation data, is beaten by any)
            self.loss, self.step = loss, step
            self.tensors = {n: p.detach().to("cpu", copy=True) for n, p in self.named.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for n, p in self.named.items():
            p.copy_(self.tensors[n].to(p.device))

    def record(self) -> dict:
        return {"val_loss": self.loss, "step": self.step}


@dataclass
class Trainable:
    """What an end-to-end method trains: AdamW groups (with their lr), and how to fold it back into packed layers."""

    groups: list
    merge: object  # callable() -> number of layers packed again
    info: dict


def _checkpointing(model, on: bool, enabled: bool) -> None:
    """Gradient checkpointing on or off, where the model supports it (transformers >= 5.x: the new names)."""
    if not (enabled and getattr(model, "supports_gradient_checkpointing", False)):
        return
    if on and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


@dataclass
class _Job:
    """One end-to-end run's fixed parts: the accelerator, the data, the step counts, the work folder."""

    acc: object
    config: object
    train: list
    val: list
    mode: str
    pad: int
    micro: int
    steps_per_epoch: int
    total: int
    done: int = 0  # optimizer steps taken so far (the step a validation is of)

    @property
    def world(self) -> int:
        return self.acc.num_processes

    def batches(self, first_step: int, first_epoch: int):
        cfg, rank, world = self.config, self.acc.process_index, self.world

        def epoch_batches(epoch):
            order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)).tolist()
            start = first_step - epoch * self.steps_per_epoch if epoch == first_epoch else 0
            for b in range(max(start, 0), self.steps_per_epoch):
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                yield idx[rank::world]  # this process's slice of the global batch
        return epoch_batches

    def lm_loss(self, m, batch):
        batch = {k: v.to(self.acc.device) for k, v in batch.items()}
        with self.acc.autocast():
            return m(**batch, use_cache=False).loss

    def loss_fn(self, ddp_model):
        from qatlm.data.instruct import collate

        def loss(local_idx):
            """Forward + backward over this process's micro-batches; returns the global mean loss."""
            chunks = [local_idx[i : i + self.micro] for i in range(0, len(local_idx), self.micro)]
            total_loss = torch.zeros((), device=self.acc.device)
            for j, ch in enumerate(chunks):
                sync = self.acc.no_sync(ddp_model) if (self.world > 1 and j < len(chunks) - 1) else contextlib.nullcontext()
                with sync:
                    part = self.lm_loss(ddp_model, collate([self.train[i] for i in ch], self.pad)) / len(chunks)
                    part.backward()  # always, even if not finite: every process must join the gradient all-reduce
                total_loss += part.detach()
            return self.acc.reduce(total_loss, reduction="mean") if self.world > 1 else total_loss
        return loss

    @torch.no_grad()
    def val_loss(self, model) -> float:
        from qatlm.data.instruct import collate

        if not self.val:
            return float("nan")
        model.eval()
        tot = sum(self.lm_loss(model, collate([ex], self.pad)).item() for ex in self.val) / len(self.val)
        model.train()
        return tot


def _prepare(model, config, tokenizer, accelerator, cache_dir, device) -> _Job:
    from accelerate import Accelerator

    # --device cpu trains on the CPU even where a GPU is visible; otherwise the GPU when there is one
    on_cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
    acc = accelerator or Accelerator(cpu=on_cpu, mixed_precision="no" if on_cpu else "bf16")
    world = acc.num_processes
    if config.batch_size % (world * config.grad_accum):
        raise QatlmError(f"global batch {config.batch_size} must be divisible by processes x accumulation ({world} x {config.grad_accum})")
    max_len = getattr(model.config, "max_position_embeddings", None)
    train, val, mode = build_examples(config, tokenizer, max_len, cache_dir)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return _Job(acc, config, train, val, mode, pad, config.batch_size // (world * config.grad_accum), steps_per_epoch,
                steps_per_epoch * config.epochs)


def _periodic(job: _Job, model, named: dict, fingerprint: str, ckpt: Path | None, log: JsonLog, vals: list, best: _Best):
    """After every optimizer step: validation every ``val_every`` steps, a resumable checkpoint when due."""
    config, acc = job.config, job.acc
    last_save = [time.time()]

    def on_step(done, optimizer):  # done = optimizer steps taken so far
        job.done = done
        if config.val_every and done % config.val_every == 0 and done < job.total:
            v = job.val_loss(model)
            vals.append((done, v))
            best.offer(v, done)
            log.write(step=done, val_loss=v)
        every = config.save_every or job.steps_per_epoch
        due = done % every == 0 or (config.save_minutes > 0 and time.time() - last_save[0] >= 60 * config.save_minutes)
        if job.world > 1:  # every process must take the same decision (the main process's clock decides)
            flag = torch.tensor([int(due)], device=acc.device)
            torch.distributed.broadcast(flag, 0)
            due = bool(flag.item())
        if ckpt is not None and due and done < job.total:
            if acc.is_main_process:
                _save_state(ckpt, named, optimizer, done, done // job.steps_per_epoch, {"fingerprint": fingerprint, "config": asdict(config)},
                            best)
            last_save[0] = time.time()
            acc.wait_for_everyone()
    return on_step


def run_fingerprint(config, train: list, val: list) -> str:
    """What a resumed run must share with the run it continues: every setting but where the data file lies, and the
    data itself (the tokens of every example: the same text under another path resumes; an edited text does not)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in asdict(config).items() if k != "data"}, sort_keys=True).encode())
    for ids, labels in (*train, *val):
        h.update(json.dumps([ids, labels]).encode())
    return h.hexdigest()[:16]


def train_end_to_end(model, config, tokenizer, make_trainable, method: str, work_dir=None, resume: bool = False,
                     progress: bool = True, accelerator=None, cache_dir=None, device=None) -> EndToEndSummary:
    """The end-to-end loop every method shares: ``make_trainable(model, config, total_steps)`` turns the
    packed layers into trainable ones and names what to train; the LM loss trains it; the layers are
    packed again at the end. ``config``: an ``EndToEndConfig`` (E2E-QP's or DL-QAT's). Returns a summary."""
    job = _prepare(model, config, tokenizer, accelerator, cache_dir, device)
    acc = job.acc
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = make_trainable(model, config, job.total)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _checkpointing(model, True, config.grad_checkpointing)
    model.to(acc.device)
    model.train()
    ddp_model = acc.prepare_model(model) if job.world > 1 else model
    opt = torch.optim.AdamW(trainable.groups, weight_decay=0.0)
    work = Path(work_dir) if work_dir else None
    ckpt = work / "checkpoint" if work else None
    first_step = first_epoch = 0
    if work:
        tidy_output(ckpt)  # a kill between the two renames of a checkpoint replacement left the old one aside
    fingerprint = run_fingerprint(config, job.train, job.val)
    before = job.val_loss(model)  # the model as it came, before any step (and before a resumed state is loaded)
    best = _Best(named, before)
    if work and resume_point(ckpt / "state.json", fingerprint, resume, lambda st: f"step {st['step']}/{job.total}") is not None:
        state = _load_state(ckpt, named, opt, best)
        first_step, first_epoch = state["step"], state["epoch"]
    log = JsonLog(work / "train_log.jsonl" if (work and acc.is_main_process) else None,
                  keep=lambda r: r.get("step", 0) < first_step or (r.get("step") == first_step and "loss" not in r))
    vals = []
    job.done = first_step

    def validate():
        v = job.val_loss(model)
        best.offer(v, job.done)
        return v
    bar = tqdm(total=job.total, initial=first_step, desc=method, unit="step", disable=not (progress and acc.is_main_process))
    t0 = time.time()
    res = train_epochs(trainable.groups, job.loss_fn(ddp_model), job.batches(first_step, first_epoch), config.epochs,
                       job.steps_per_epoch, clip=config.clip_grad, schedule=Schedule(job.total, config.warmup_ratio, config.min_lr_ratio),
                       val_fn=validate, log=log, log_extra={"method": method}, progress=bar, backward=False,
                       optimizer=opt, first_epoch=first_epoch, first_step=first_step,
                       on_step=_periodic(job, model, named, fingerprint, ckpt, log, vals, best))
    bar.close()
    restored = math.isfinite(best.loss) and best.step != job.done
    if restored:  # a later state validated worse than an earlier one (or than the model it was given): keep the best
        best.restore()
        log.write(method=method, event="kept_best", step=best.step, val_loss=best.loss)
    log.close()
    model.eval()
    _checkpointing(model, False, config.grad_checkpointing)
    n = trainable.merge()
    n_train = sum(p.numel() for p in named.values())
    n_total = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear))
    return EndToEndSummary(method=method, mode=job.mode, config=asdict(config), layers=n, trainable_params=n_train,
                           trainable_fraction=n_train / n_total, val_loss_before=before, val_losses=res.val_losses, steps=res.steps,
                           retries=res.retries, seconds=round(time.time() - t0, 1), processes=job.world, periodic_val=vals,
                           best_step=best.step if math.isfinite(best.loss) else None,
                           best_val_loss=best.loss if math.isfinite(best.loss) else None, restored_best=restored, **trainable.info)


def run_end_to_end(model, config, context, make_trainable, method: str) -> EndToEndSummary:
    """The method protocol (``methods/base.py``) of an end-to-end method: ``train_end_to_end`` with the context's
    tokenizer, device, work folder, resume flag, progress, asset cache and accelerator."""
    if context.tokenizer is None:
        raise QatlmError(f"{method} trains end to end on text: pass a tokenizer")
    return train_end_to_end(model, config, context.tokenizer, make_trainable, method, context.work_dir, context.resume,
                            context.progress, context.accelerator, context.cache_dir, device=context.device)
