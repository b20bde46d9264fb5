"""EfficientQAT phase 2, E2E-QP: the integer weights stay frozen (and packed); only the step sizes
(optionally the zero points) are trained end to end with the language-model loss.

Two data modes: continual pre-training (causal-LM loss on text samples) and instruction tuning
(Alpaca fields or chat messages; loss on response tokens only). AdamW, weight decay 0, warmup 3%,
cosine decay, gradient-norm clipping at 0.3, gradient accumulation, periodic validation, a resumable
checkpoint every K steps. Under ``accelerate launch`` / ``torchrun`` the same code trains
data-parallel: each process takes its slice of every global batch and DDP averages the gradients.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from qatlm.errors import QatlmError, check_number
from qatlm.methods.block_ap import BlockAPConfig
from qatlm.model.arch import replace_module
from qatlm.quant.linear import PackedLinear, ScaleTrainLinear
from qatlm.train import JsonLog, Schedule, train_epochs


PAPER_E2E_STEPS = 128


@dataclass
class E2EQPConfig:
    data: str = "wikipedia"  # text source (continual pre-training) or instruction file (auto-detected)
    samples: int = 64  # training samples (text windows or instruction records)
    seqlen: int = 512
    val_samples: int = 8
    epochs: int = 1
    batch_size: int = 4  # global batch (all processes, all accumulation micro-steps)
    grad_accum: int = 1
    lr: float | None = None  # None: the paper's 2e-5 (2 bits) / 1e-5, scaled to the step budget (learning_rate)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    clip_grad: float = 0.3
    train_zeros: bool = False
    grad_checkpointing: bool = True  # recompute each block's activations in the backward pass (the paper's setting)
    val_every: int = 0  # steps between validations (0: at the end of every epoch only)
    save_every: int = 0  # steps between resumable checkpoints (0: every epoch); also every save_minutes
    save_minutes: float = 10.0  # a resumable checkpoint at least this often (0: by steps only)
    seed: int = 0

    def __post_init__(self):
        for name in ("samples", "epochs", "batch_size", "grad_accum"):
            check_number(name, getattr(self, name), at_least=1)
        check_number("seqlen", self.seqlen, at_least=2)
        for name in ("val_samples", "val_every", "save_every", "save_minutes", "clip_grad"):
            check_number(name, getattr(self, name), at_least=0)
        check_number("lr", self.lr, above=0)
        check_number("warmup_ratio", self.warmup_ratio, at_least=0, below=1)
        check_number("min_lr_ratio", self.min_lr_ratio, at_least=0, at_most=1)

    def learning_rate(self, bits: int, steps: int = PAPER_E2E_STEPS) -> float:
        """The paper's E2E-QP takes 128 steps (4096 samples, global batch 32, 1 epoch) at 2e-5 (2-bit) / 1e-5.
        Unless set, a shorter run keeps that lr x steps budget: lr x 128/steps, at most 1e-3."""
        if self.lr is not None:
            return self.lr
        return min(1e-3, (2e-5 if bits == 2 else 1e-5) * max(1.0, PAPER_E2E_STEPS / max(steps, 1)))


def attach_scale_training(model, train_zeros: bool = False) -> dict[str, ScaleTrainLinear]:
    """Packed layers -> ``ScaleTrainLinear`` (integers frozen); every other parameter frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, PackedLinear):
            layers[name] = ScaleTrainLinear(m, train_zeros=train_zeros)
            replace_module(model, name, layers[name])
    if not layers:
        raise QatlmError("the model has no packed layers: E2E-QP starts from a quantized checkpoint")
    return layers


def detach_scale_training(model) -> int:
    names = [n for n, m in model.named_modules() if isinstance(m, ScaleTrainLinear)]
    for n in names:
        replace_module(model, n, model.get_submodule(n).to_packed())
    return len(names)


def build_examples(config: E2EQPConfig, tokenizer, max_len: int | None, cache_dir=None):
    """(train, val) lists of (ids, labels): instruction records or text windows."""
    from qatlm.data.instruct import instruction_examples, is_instruction_data, resolve_instruction_source
    from qatlm.data.text import calibration_samples

    if max_len and config.seqlen > max_len:
        raise QatlmError(f"sequence length {config.seqlen} is above the model's limit of {max_len} positions")
    source = resolve_instruction_source(config.data, cache_dir)
    if is_instruction_data(source):
        ex = instruction_examples(source, tokenizer, config.seqlen)
        g = torch.Generator().manual_seed(config.seed)
        order = torch.randperm(len(ex), generator=g).tolist()
        need = config.samples + config.val_samples
        if len(ex) < need:
            raise QatlmError(f"{config.data} has {len(ex)} usable records; asked for {config.samples} + {config.val_samples}")
        ex = [ex[i] for i in order[:need]]
        return ex[: config.samples], ex[config.samples :], "instruct"
    tr, va = calibration_samples(tokenizer, config.data, config.samples, config.seqlen, config.seed + 1, config.val_samples, cache_dir)
    return [(r.tolist(), r.tolist()) for r in tr], [(r.tolist(), r.tolist()) for r in va], "pretrain"


def _save_state(folder: Path, named: dict, opt, step: int, epoch: int, meta: dict):
    """Trainable tensors (by parameter name) and AdamW moments as safetensors (never pickled) + JSON counters."""
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
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
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)


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


def scale_trainable(model, config: E2EQPConfig, total_steps: int) -> Trainable:
    """E2E-QP: step sizes (and optionally zero points) of every packed layer."""
    bits = next(m.spec.bits for m in model.modules() if isinstance(m, PackedLinear))
    layers = attach_scale_training(model, config.train_zeros)
    params = [m.scale for m in layers.values()] + [m.zero for m in layers.values() if m.zero is not None]
    lr = config.learning_rate(bits, total_steps)
    return Trainable([{"params": params, "lr": lr}], lambda: detach_scale_training(model), {"lr": lr, "layers": len(layers)})


def train_e2e_qp(model, config: E2EQPConfig, tokenizer, work_dir=None, resume: bool = False, progress: bool = True,
                 accelerator=None, cache_dir=None, device=None) -> dict:
    """Train the step sizes of a packed model in place; returns a summary. Packs the result at the end."""
    return train_end_to_end(model, config, tokenizer, scale_trainable, "e2e-qp", work_dir, resume, progress, accelerator, cache_dir,
                            device=device)


def train_end_to_end(model, config: E2EQPConfig, tokenizer, make_trainable, method: str, work_dir=None, resume: bool = False,
                     progress: bool = True, accelerator=None, cache_dir=None, device=None) -> dict:
    """The end-to-end loop every method shares: ``make_trainable(model, config, total_steps)`` turns the
    packed layers into trainable ones and names what to train; the LM loss trains it; the layers are
    packed again at the end. Returns a summary."""
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
    if work and ckpt.exists():
        if not resume:
            raise QatlmError(f"{work} holds an unfinished run: pass --resume to continue it, or --overwrite to start over")
        state = _load_state(ckpt, named, opt)
        if state.get("config") != asdict(config):
            raise QatlmError(f"cannot resume from {work}: it was started with other settings")
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
                _save_state(ckpt, named, optimizer, done, done // steps_per_epoch, {"config": asdict(config)})
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


@dataclass
class EfficientQATConfig(BlockAPConfig):
    """Block-AP, then E2E-QP on the same text (or ``e2e_data``), as one recipe."""

    e2e_data: str | None = None
    e2e_samples: int | None = None  # default: the calibration sample count
    e2e_epochs: int = 1
    e2e_batch_size: int = 4
    e2e_lr: float | None = None
    train_zeros: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_number("e2e_samples", self.e2e_samples, at_least=1)
        check_number("e2e_epochs", self.e2e_epochs, at_least=1)
        check_number("e2e_batch_size", self.e2e_batch_size, at_least=1)
        check_number("e2e_lr", self.e2e_lr, above=0)


def quantize_efficientqat(model, config: EfficientQATConfig, tokenizer=None, work_dir=None, resume=False, **kw) -> dict:
    from qatlm.methods.block_ap import quantize_block_ap

    work = Path(work_dir) if work_dir else None
    s1 = quantize_block_ap(model, config, tokenizer=tokenizer, work_dir=work, resume=resume, **kw)
    e2e = E2EQPConfig(data=config.e2e_data or config.calib, samples=config.e2e_samples or config.calib_samples,
                      seqlen=config.calib_seqlen, val_samples=config.val_samples, epochs=config.e2e_epochs,
                      batch_size=config.e2e_batch_size, lr=config.e2e_lr, train_zeros=config.train_zeros, seed=config.seed)
    s2 = train_e2e_qp(model, e2e, tokenizer, work_dir=work / "e2e" if work else None, resume=resume, progress=kw.get("progress", True))
    return {**s1, "method": "efficientqat", "e2e": s2}
