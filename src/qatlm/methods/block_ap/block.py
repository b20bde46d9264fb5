"""Block-AP on one decoder block: fake-quantize its linears, train them (and norms) against the fp targets with
the guard against ending worse than RTN, then pack the block to integers."""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from qatlm.methods.block_ap.caches import ActivationChain
from qatlm.methods.block_ap.config import BlockAPConfig
from qatlm.methods.block_ap.optim import RelativeAdamW, block_loss
from qatlm.methods.block_ap.sharding import Shard, epoch_batches
from qatlm.model.arch import quant_targets, run_layer
from qatlm.model.layers import pack_model, swap_layers
from qatlm.quant.grid import QuantSpec
from qatlm.quant.layers import fake_quant_layer, packed_layer
from qatlm.quant.linear import FakeQuantLinear, check_target
from qatlm.summary import BlockRecord
from qatlm.train.loop import JsonLog, Schedule, restore, snapshot, train_epochs


class _Prefetch:
    """Batches read from the caches one step ahead by a background thread (into pinned memory when training
    on a GPU), so reading memory-mapped activations overlaps the previous step's compute."""

    def __init__(self, fetch, pin: bool):
        from concurrent.futures import ThreadPoolExecutor

        self.fetch, self.pin = fetch, pin
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qatlm-prefetch")

    def _load(self, idx):
        x, y = self.fetch(idx)
        return (idx, x.pin_memory(), y.pin_memory()) if self.pin else (idx, x, y)

    def __call__(self, batches):
        batches = iter(batches)
        nxt = next(batches, None)
        pending = self.pool.submit(self._load, nxt) if nxt is not None else None
        while pending is not None:
            item = pending.result()
            nxt = next(batches, None)
            pending = self.pool.submit(self._load, nxt) if nxt is not None else None
            yield item

    def close(self):
        self.pool.shutdown(wait=True)


@contextlib.contextmanager
def expert_token_counts(block):
    """While the block runs: tokens that reach each expert of a mixture of experts (``{"mlp.experts.3": n}``),
    counted at the input of the expert's first linear layer; empty for a block without experts."""
    counts, hooks = {}, []

    def counter(key):
        def hook(_module, inputs, _output):
            counts[key] += inputs[0].numel() // inputs[0].shape[-1]  # tokens in, whatever the leading dims
        return hook

    for name, mod in block.named_modules():
        m = _EXPERT.search(name)
        if m and isinstance(mod, nn.Linear) and m.group(0) not in counts:
            counts[m.group(0)] = 0
            hooks.append(mod.register_forward_hook(counter(m.group(0))))
    try:
        yield counts
    finally:
        for h in hooks:
            h.remove()


_EXPERT = re.compile(r"^(.*\.)?experts\.\d+")


def block_fake_quant(block, spec: QuantSpec, prefix: str) -> dict[str, FakeQuantLinear]:
    def make(name, lin):
        check_target(f"{prefix}.{name}", lin, spec)
        return fake_quant_layer(lin, spec, f"{prefix}.{name}")
    return swap_layers(block, make, names=list(quant_targets(block)))


def load_packed_block(block, spec: QuantSpec, state: dict, dtype, prefix: str = ""):
    """Rebuild a finished block (named ``prefix`` in the model) from its saved tensors (used by resume)."""
    swap_layers(block, lambda name, lin: packed_layer(lin.in_features, lin.out_features, spec, lin.bias is not None, dtype=dtype,
                                                      name=f"{prefix}.{name}"),
                names=list(quant_targets(block)))
    block.load_state_dict(state, strict=True)


@torch.no_grad()
def _relative_error(block, kw, chain: ActivationChain, shard: Shard, idx: torch.Tensor, energy: torch.Tensor, device, dtype,
                    kind: str = "mse") -> float:
    """The block's relative error on the samples ``idx`` (global numbers): squared error / energy of the block's
    own contribution, summed over every process's share."""
    rows = shard.mine(idx)
    tot = torch.zeros(1, dtype=torch.float64)
    for i in range(0, len(rows), chain.bs):
        r = rows[i : i + chain.bs]
        out = run_layer(block, chain.inputs[r].to(device, dtype), kw)
        tot += block_loss(out, chain.targets[r].to(device), kind, "sum").double().cpu()
    return float(shard.all_sum(tot)) / max(float(energy[idx].sum()), 1e-30)


@dataclass
class BlockContext:
    """What ``train_block`` needs besides the block and its data: where it runs and how it reports."""

    config: BlockAPConfig
    device: torch.device
    shard: Shard
    n_train: int
    n_val: int
    log: JsonLog
    progress: bool = True
    n_blocks: int = 0
    flops_time: list = field(default_factory=lambda: [0.0, 0.0])  # [training FLOPs, seconds] accumulated over blocks


@dataclass
class TrainedParams:
    """What Block-AP trains in one block, by kind, and the unit each update is measured in (``RelativeAdamW``)."""

    weights: list
    scales: list
    zeros: list
    norms: list
    units: dict

    @property
    def all(self) -> list:
        return self.weights + self.scales + self.zeros + self.norms


FINEST_TUNED_QMAX = 15  # the finest grid (4 bits) the default learning rates were measured on


def select_trained(block, fq: dict[str, FakeQuantLinear], config: BlockAPConfig) -> TrainedParams:
    """Every quantized linear's weight, step size and zero point, and (as the reference) the block's other
    parameters named "weight" (the norms); biases stay. Updates of weights are in units of the groups' initial range
    (s0 · qmax): each group's, or the layer's mean; norms' optionally in their RMS. Step sizes' are in the same units up
    to 4 bits and in s0 · 15 on finer grids: a range unit moves a step size by qmax · lr of itself per step, so an 8-bit
    grid (qmax 255) would move its step sizes 17x faster, relative to themselves, than the 4-bit grid the rates were
    measured on (on SmolLM2, an 8-bit layer of a mixed model ended with step sizes ~3x its RTN ones)."""
    weights = [m.weight for m in fq.values()]
    scales = [m.scale for m in fq.values()]
    zeros = [m.zero for m in fq.values() if not m.spec.sym]
    units = {}
    for m in fq.values() if config.update_units != "absolute" else ():
        rng = (m.scale.detach().float() * m.spec.qmax).to(m.weight.dtype)
        if config.update_units == "layer":  # one unit per layer: its mean group range (scale-free, groups move alike)
            rng = torch.full_like(rng, float(rng.mean()))
        units[m.weight] = (rng, m.spec)
        units[m.scale] = (rng * (min(m.spec.qmax, FINEST_TUNED_QMAX) / m.spec.qmax), m.spec)
    for p in block.parameters():
        p.requires_grad_(False)
    fq_params = {id(p) for p in weights + scales + zeros}
    norms = [p for name, p in block.named_parameters() if config.train_norms and id(p) not in fq_params
             and name.rsplit(".", 1)[-1] == "weight" and p.is_floating_point()]
    if config.norm_updates == "relative":  # each norm's update in units of its own RMS, like the weights' in group ranges
        for p in norms:
            units[p] = (torch.full_like(p, float(p.detach().float().pow(2).mean().sqrt().clamp_min(1e-8))), config.spec)
    trained = TrainedParams(weights, scales, zeros, norms, units)
    for p in trained.all:
        p.requires_grad_(True)
    return trained


def forward_loss(block, x: torch.Tensor, y: torch.Tensor, kw: dict, kind: str, autocast: bool) -> torch.Tensor:
    """The block on ``x`` (fp32 master weights; bf16 autocast on an accelerator) and its summed reconstruction loss
    against ``y``: what one Block-AP step differentiates."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = run_layer(block, x, kw)
    return block_loss(out, y, kind, "sum")


@functools.cache
def compiled_forward_loss():
    """``forward_loss`` compiled once for the process: the blocks' parameters are graph inputs (torch inlines
    modules), so every block of one shape reuses the same compiled graph. Casts are kept as written
    (``emulate_precision_casts``): without it inductor skips the fp16 rounding of the step sizes and trains another
    grid than the one stored."""
    return torch.compile(forward_loss, dynamic=False, options={"emulate_precision_casts": True})


def block_step_loss(block, kw, energy: torch.Tensor, trained: list, ctx: BlockContext):
    """The loss of one batch (this process's share, back-propagated here; gradients summed over processes),
    normalised by the batch's energy so that it is a relative error."""
    device, shard, config = ctx.device, ctx.shard, ctx.config

    def loss_fn(item):
        idx, x, y = item
        denom = max(float(energy[idx].sum()), 1e-30)
        if len(x):
            fn = compiled_forward_loss() if config.compile_step else forward_loss
            loss = fn(block, x.to(device, torch.float32, non_blocking=True), y.to(device, torch.float32, non_blocking=True), kw,
                      config.loss, device.type != "cpu") / denom
            loss.backward()
        else:
            loss = torch.zeros((), device=device)
        if shard.world > 1:
            for p in trained:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                shard.all_sum(p.grad)
            loss = shard.all_sum(loss.detach().reshape(1).cpu().double()).reshape(())
        return loss.detach()
    return loss_fn


def train_guarded(trained: TrainedParams, loss_fn, batches, rel_error, rtn_val: float, bi: int, ctx: BlockContext):
    """Train; a block that ends at or above its RTN error is retrained once at a tenth of the rates, and otherwise
    keeps its RTN grid. Returns (loop result, final relative error, attempts, fell back to RTN)."""
    config, n_tr = ctx.config, ctx.n_train
    steps_per_epoch = math.ceil(n_tr / config.batch_size)
    n_epochs = config.epochs_for(n_tr)
    lr_q, lr_w = config.learning_rates(n_epochs * steps_per_epoch)
    start = snapshot(trained.all)  # the RTN starting point, for the guard
    attempts, fallback, after_val = [], False, rtn_val
    for lr_factor in (1.0, 0.1):
        if attempts:
            restore(trained.all, start)
        groups = [{"params": trained.scales + trained.zeros, "lr": lr_q * lr_factor},
                  {"params": trained.weights + trained.norms, "lr": lr_w * lr_factor}]
        opt = RelativeAdamW(groups, trained.units, weight_decay=0.0)
        bar = tqdm(total=n_epochs * steps_per_epoch, desc=f"block {bi}/{ctx.n_blocks - 1}", unit="step",
                   disable=not ctx.progress, leave=False, position=1)
        res = train_epochs(groups, loss_fn, batches, n_epochs, steps_per_epoch, clip=config.clip_grad or None,
                           schedule=Schedule(n_epochs * steps_per_epoch, 0.0, config.min_lr_ratio),
                           val_fn=rel_error if ctx.n_val else None, early_stop=config.early_stop, log=ctx.log,
                           log_extra={"block": bi, "lr_factor": lr_factor}, progress=bar, optimizer=opt, backward=False)
        bar.close()
        after_val = rel_error()
        attempts.append({"lr_factor": lr_factor, "val": after_val, "steps": res.steps})
        if after_val < rtn_val or res.steps == 0:
            break
    else:  # both attempts ended at or above RTN: keep the RTN grid
        restore(trained.all, start)
        after_val, fallback = rtn_val, True
        ctx.log.write(event="rtn_fallback", block=bi, attempts=attempts)
    return res, after_val, attempts, fallback


def train_block(block, kw, chain: ActivationChain, energy: torch.Tensor, bi: int, prefix: str, ctx: BlockContext) -> BlockRecord:
    """Block-AP on one decoder block: swap its linears for fake-quantized ones (RTN start), train weights, step sizes,
    zero points (and norms) against the fp targets in ``chain``, retry at 0.1x or fall back to RTN if it does not beat
    RTN on validation, then pack it to integers in place. ``energy``: every sample's ``‖fp_out − fp_in‖²``."""
    config, device, shard = ctx.config, ctx.device, ctx.shard
    n_tr, n_va = ctx.n_train, ctx.n_val
    t_block = time.time()
    block.to(torch.float32)
    fq = block_fake_quant(block, config.spec, prefix)
    eval_idx = torch.arange(n_tr, n_tr + n_va) if n_va else torch.arange(n_tr)

    def rel_error():
        return _relative_error(block, kw, chain, shard, eval_idx, energy, device, torch.float32, config.loss)

    rtn_val = rel_error()
    trained = select_trained(block, fq, config)
    gen = torch.Generator().manual_seed(config.seed * 100003 + bi)
    epochs = [epoch_batches(n_tr, config.batch_size, gen) for _ in range(config.epochs_for(n_tr))]

    def fetch(idx):
        rows = shard.mine(idx)
        return chain.inputs[rows], chain.targets[rows]

    prefetch = _Prefetch(fetch, pin=device.type == "cuda")
    try:
        res, after_val, attempts, fallback = train_guarded(trained, block_step_loss(block, kw, energy, trained.all, ctx),
                                                           lambda e: prefetch(epochs[e]), rel_error, rtn_val, bi, ctx)
    finally:
        prefetch.close()  # also when training stops with an error
    n_lin = sum(m.in_features * m.out_features for m in fq.values())
    ctx.flops_time[0] += 6.0 * n_lin * res.steps * config.batch_size * chain.inputs.t.shape[1] / shard.world
    ctx.flops_time[1] += res.step_seconds
    for p in block.parameters():
        p.requires_grad_(False)
    pack_model(block)
    return BlockRecord(block=bi, rtn_rel_error=rtn_val, trained_rel_error=after_val, steps=res.steps, retries=res.retries,
                       val_losses=res.val_losses, seconds=round(time.time() - t_block, 2), stopped_early=res.stopped_early,
                       lr_retried=len(attempts) > 1, rtn_fallback=fallback)
