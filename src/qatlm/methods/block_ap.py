"""EfficientQAT phase 1, Block-AP: train each decoder block's weights *and* its step sizes / zero
points so that the quantized block reproduces the full-precision block (MSE), then fix it to integers.

For block i (default ``input_mode="quant"``): input = the outputs of the already-quantized blocks
0..i-1; target = the fp block i applied to the fp chain's input. Trained by default, as in the
reference: every quantized linear's weight (lr_weight), step size and zero point (lr_quant), and the
block's norm weights (lr_weight; biases stay fixed). Starts from RTN min-max grids. After training the
block is packed in place and its quantized outputs become the next block's inputs.

Nothing depends on the model's weight or activation scale:
- the loss is the block's squared error divided by the energy of the block's own contribution
  ``‖fp_out − fp_in‖²`` (a relative error: the same number for a model whose hidden states are 1000x larger);
- weight and step-size updates are measured in the layer's mean initial group range (max − min), so a
  learning rate means "fraction of a group's range per step" on every model (``RelativeAdamW``; every group
  of a layer moves by the same amount, as with the reference's absolute rates);
- a block whose trained validation error is not below its RTN error is retrained once at a tenth of the
  rates and otherwise falls back to its RTN grid: Block-AP never ends a block worse than RTN.

The parts, top to bottom: ``Shard`` (which calibration samples this process holds when several run data-
parallel under ``torchrun``), ``ActivationChain`` (the two activation caches, in RAM up to ``ram_budget_gb`` and
memory-mapped beyond, and how they advance block by block), ``train_block`` (one block: fake-quantize, train
with the guard, pack; returns the block's record), ``RunState`` (the work folder: finished blocks, summary,
chain snapshots; what ``resume=True`` continues from) and the driver ``quantize_block_ap``.

Resume: after every finished block its packed tensors are written to ``work_dir``, and (when that costs at
most a tenth of the time since the last one) the two chains' activations for the next block; a resumed run
restarts there without replaying finished blocks, and ends bit for bit where an uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from qatlm.errors import QatlmError, check_number
from qatlm.io import atomic_write_json, resume_point
from qatlm.methods.base import Context, with_grid
from qatlm.model.arch import capture_layer_inputs, defuse_experts, find_parts, first_layer_input, quant_targets, run_layer
from qatlm.model.layers import pack_model, swap_layers
from qatlm.model.lazy import block_file, check_source_weights, lazy_source, materialize_block, release_block, save_block
from qatlm.options import opt
from qatlm.quant.grid import QuantSpec, expand_groups
from qatlm.quant.kquant import fake_quant_layer, packed_layer
from qatlm.quant.linear import FakeQuantLinear, check_target
from qatlm.train import JsonLog, Schedule, release_freed_memory, train_epochs

PAPER_STEPS = 4096
MIN_STEPS = 128  # unset epochs: at least this many steps per block (the default 128 samples x 2 epochs at batch 2)
LOSSES = ("mse", "mse-capped")
CAP = 4.0  # "mse-capped": a token's squared error counts in full up to CAP x the batch's median target norm


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse", reduction: str = "mean") -> torch.Tensor:
    """Reconstruction loss of a block's output ``[b, L, d]`` against its full-precision target.

    "mse": plain mean squared error (the paper). "mse-capped": every token's squared error is scaled by
    ``min(1, (CAP·m / ‖y_t‖)²)``, m the median target norm of the batch: ordinary tokens keep weight 1,
    while a token whose hidden state is hundreds of times larger than the rest (the attention-sink
    token of many LLMs, e.g. SmolLM2's first position at norm ~2·10^4 against ~10^2) is judged by its
    *relative* error instead of dominating the sum with an absolute error that barely matters downstream.
    """
    err = (out.float() - target.float()).pow(2)
    if kind == "mse-capped":
        norm2 = target.float().pow(2).sum(-1, keepdim=True)
        ref = norm2.flatten().median() * CAP**2
        err = err * (ref / norm2.clamp_min(1e-20)).clamp(max=1.0)
    return err.sum() if reduction == "sum" else err.mean()


@with_grid
@dataclass
class BlockAPConfig:
    """EfficientQAT's Block-AP: each decoder block trained against its full-precision output, then fixed to integers."""

    streams: ClassVar[bool] = True  # can run block by block on a lazily loaded model

    grid: QuantSpec = opt(QuantSpec, "the integer grid")
    calib: str = opt("wikipedia", "calibration text: wikipedia (built-in) or a .txt/.jsonl/.parquet/dataset folder")
    calib_samples: int = opt(128, "calibration samples")
    calib_seqlen: int = opt(512, "tokens per calibration sample")
    val_samples: int = opt(16, "validation samples, disjoint from calibration")
    seed: int = opt(0, "seed for calibration sampling and shuffling")
    epochs: int | None = opt(None, "epochs per block", default_help=f"2 (the reference), or more so that each block trains at "
                             f"least {MIN_STEPS} steps (the default 128 samples at batch 2 give exactly 2)")
    batch_size: int = opt(2, "samples per step (the global batch under torchrun)")
    lr_quant: float | None = opt(None, "learning rate of step sizes (fraction of a group's range per step, see "
                                       "--update-units) and zero points (integer units)",
                                 default_help="1e-4 scaled by 4096/steps, at most 1e-2")
    lr_weight: float | None = opt(None, "learning rate of weights and norms, as a fraction of a group's range per step "
                                        "(see --update-units)",
                                  default_help="2e-5 at 2 bits / 1e-5 above, scaled by 4096/steps, at most 1e-3")
    min_lr_ratio: float = opt(0.05, "cosine decay ends at this fraction of each learning rate")
    clip_grad: float | None = opt(None, "gradient-norm clip", flag="block-clip-grad", default_help="none, as the reference")
    input_mode: str = opt("quant", "block inputs from the quantized chain (quant) or the fp chain (fp)", choices=("quant", "fp"))
    loss: str = opt("mse", "reconstruction loss: mse (the paper) or mse-capped (tokens of massive norm, e.g. attention sinks, "
                           "count by their relative error)", flag="block-loss", choices=LOSSES)
    train_norms: bool = opt(True, "train each block's norm weights with its linear weights, as the reference (biases stay fixed)")
    update_units: str = opt("layer", "units of the weights' and step sizes' learning rates: layer (the layer's mean initial "
                                     "group range: scale-free, every group of a layer alike), range (each group's own initial "
                                     "range: scale-free) or absolute (the reference's; only right for models whose group ranges "
                                     "are ~1)",
                            choices=("range", "layer", "absolute"))
    norm_updates: str = opt("absolute", "how norm weights move per step: absolute (lr_weight itself, as the reference) or "
                                        "relative (lr_weight times each norm's RMS: the same on a model whose norms are 10x "
                                        "larger)", choices=("absolute", "relative"))
    early_stop: bool = opt(False, "stop a block when its validation loss rises")
    ram_budget_gb: float = opt(8.0, "activation caches beyond this many GiB go to memory-mapped files")
    chain_batch: int = opt(8, "samples per forward when moving activations through a finished block")
    cache_dtype: str = opt("auto", "the two activation caches: auto = float32 on CPU, bfloat16 on GPU",
                           choices=("auto", "float32", "bfloat16", "float16"))

    def __post_init__(self):
        if self.input_mode not in ("quant", "fp"):
            raise QatlmError(f"input mode must be 'quant' or 'fp', got '{self.input_mode}'")
        if self.cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise QatlmError(f"--cache-dtype must be auto, float32, bfloat16 or float16, got '{self.cache_dtype}'")
        if self.update_units not in ("range", "layer", "absolute"):
            raise QatlmError(f"update units must be 'range', 'layer' or 'absolute', got '{self.update_units}'")
        if self.norm_updates not in ("absolute", "relative"):
            raise QatlmError(f"norm updates must be 'absolute' or 'relative', got '{self.norm_updates}'")
        if self.loss not in LOSSES:
            raise QatlmError(f"block loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        for name in ("calib_samples", "epochs", "batch_size", "chain_batch"):
            check_number(name, getattr(self, name), at_least=1)
        check_number("calib_seqlen", self.calib_seqlen, at_least=2)
        check_number("val_samples", self.val_samples, at_least=0)
        check_number("lr_quant", self.lr_quant, above=0)
        check_number("lr_weight", self.lr_weight, above=0)
        check_number("min_lr_ratio", self.min_lr_ratio, at_least=0, at_most=1)
        check_number("block_clip_grad", self.clip_grad, at_least=0)
        check_number("ram_budget_gb", self.ram_budget_gb, at_least=0)

    def cache_torch_dtype(self, device) -> torch.dtype:
        if self.cache_dtype == "auto":
            return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
        return getattr(torch, self.cache_dtype)

    def epochs_for(self, n_train: int) -> int:
        """The epochs a block trains for on ``n_train`` samples: ``epochs`` when set, else the reference's 2, raised
        so that a block takes at least MIN_STEPS steps (on a small calibration set more passes over the same tokens
        beat the same passes at a higher rate: SmolLM2 w4g128 on 64 samples, 44.02 -> 42.13 ppl)."""
        if self.epochs is not None:
            return self.epochs
        return max(2, math.ceil(MIN_STEPS / max(1, math.ceil(n_train / self.batch_size))))

    def learning_rates(self, steps: int) -> tuple[float, float]:
        """(lr_quant, lr_weight), both in units of a quantization group's initial range (max − min; see ``update_units``) per
        step (zero points: integer units). Unset ones keep the paper's lr x steps budget: the paper trains
        each block for 4096 steps (4096 samples, batch 2, 2 epochs) at 1e-4 / 2e-5 (1e-5 above 2 bits); with
        fewer steps the rate grows by 4096/steps, capped at 1e-2 / 1e-3. (The paper's rates are absolute;
        on SmolLM2, where these defaults were measured, the group ranges are ~1.0 at every setting, so the
        numbers coincide there, and they keep their meaning on models whose weights are 10x smaller.)"""
        scale = max(1.0, PAPER_STEPS / max(steps, 1))
        lq = self.lr_quant if self.lr_quant is not None else min(1e-2, 1e-4 * scale)
        lw = self.lr_weight if self.lr_weight is not None else min(1e-3, (2e-5 if self.bits == 2 else 1e-5) * scale)
        return lq, lw

    def fingerprint(self) -> str:
        keep = {k: v for k, v in asdict(self).items() if k not in ("ram_budget_gb", "chain_batch")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class RelativeAdamW(torch.optim.AdamW):
    """AdamW whose update of some parameters is multiplied element-wise by a per-group unit.

    ``units`` maps a parameter to ``(unit [out, groups], spec)``: a weight ``[out, in]`` (unit expanded over
    each group's columns) or a per-group tensor ``[out, groups]``. Adam's step is ~lr per element whatever the
    gradient's scale, so with the unit set to the group's range a learning rate reads "fraction of the
    group's range per step": the same on a model whose weights are 10x smaller (same as Adam on the
    reparametrised ``w / unit``, up to where epsilon enters)."""

    def __init__(self, groups, units: dict, **kw):
        super().__init__(groups, **kw)
        self.units = units

    @torch.no_grad()
    def step(self, closure=None):
        before = [(p, p.detach().clone()) for p in self.units if p.grad is not None]
        loss = super().step(closure)
        for p, old in before:
            unit, spec = self.units[p]
            delta = p - old
            if delta.shape != unit.shape:
                unit = expand_groups(unit, spec, delta.shape[1])
            p.copy_(old.add_(delta.mul_(unit)))
        return loss


class ActivationCache:
    """``[n, seqlen, hidden]`` activations in RAM while they fit the budget, else in a memory-mapped file."""

    def __init__(self, shape, dtype, budget: dict, folder: Path | None, name: str):
        nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        if nbytes <= budget["left"] or folder is None:
            self.t = torch.empty(shape, dtype=dtype)
            budget["left"] -= nbytes
            self.file = None
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self.file = folder / f"{name}.mmap"
            np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}[dtype]
            self.t = torch.from_numpy(np.memmap(self.file, dtype=np_dtype, mode="w+", shape=tuple(shape))).view(dtype)
        self.nbytes = nbytes

    def __getitem__(self, idx):
        return self.t[idx]

    def __setitem__(self, idx, v):
        self.t[idx] = v.to(self.t.dtype)


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


_CHAIN_ROWS = 64  # samples copied at a time between a cache and its snapshot file (bounded memory)
_CHAIN_OVERHEAD = 0.1  # at most this share of the run's time goes into writing chain snapshots


@torch.no_grad()
def _run_chain(block, kwargs, src: ActivationCache, dst: ActivationCache, n: int, bs: int, device, dtype) -> torch.Tensor:
    """``dst = block(src)`` batch by batch; returns each sample's ``‖dst − src‖²`` (the block's own contribution)."""
    energy = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, bs):
        x = src[i : i + bs].to(device, dtype)
        y = run_layer(block, x, kwargs)
        energy[i : i + len(x)] = (y.float() - x.float()).pow(2).sum((1, 2)).double().cpu()
        dst[i : i + bs] = y.float().cpu()
    return energy


class ActivationChain:
    """The activations Block-AP moves from block to block, for this process's samples: two caches, as the
    reference. With quantized-chain inputs (``input_mode="quant"``): ``fp`` (the full-precision chain,
    advanced in place: it holds block i's input, then its fp output = the training target) and ``q`` (the
    outputs of the already-quantized blocks = block i's training input). With ``input_mode="fp"`` two fp
    caches alternate. Each cache is in RAM while the budget lasts, else a memory-mapped file in ``folder``."""

    def __init__(self, n: int, seqlen: int, hidden: int, dtype: torch.dtype, input_mode: str, budget_bytes: int,
                 folder: Path | None, chain_batch: int):
        budget = {"left": int(budget_bytes)}
        shape = (n, seqlen, hidden)
        self.n, self.bs = n, chain_batch
        self.fp_in = ActivationCache(shape, dtype, budget, folder, "fp")
        self.fp_out = ActivationCache(shape, dtype, budget, folder, "fp_out") if input_mode == "fp" else self.fp_in
        self.q = ActivationCache(shape, dtype, budget, folder, "q") if input_mode == "quant" else None

    @property
    def inputs(self) -> ActivationCache:
        """Block i's training inputs."""
        return self.q if self.q is not None else self.fp_in

    @property
    def targets(self) -> ActivationCache:
        """Block i's training targets (valid after ``compute_targets``)."""
        return self.fp_out

    def caches(self) -> dict:
        return {"fp": self.fp_in} if self.q is None else {"fp": self.fp_in, "q": self.q}

    @torch.no_grad()
    def fill(self, model, ids: torch.Tensor, parts, device):
        """Layer-0 inputs of the samples ``ids``, through the model's own embedding path."""
        for i in range(0, len(ids), self.bs):
            h = first_layer_input(model, ids[i : i + self.bs].to(device), parts).float().cpu()
            for c in self.caches().values():
                c[i : i + len(h)] = h

    def compute_targets(self, block, kw, device, dtype) -> torch.Tensor:
        """Run the (still full-precision) block on the fp chain; returns each sample's energy ``‖out − in‖²``."""
        return _run_chain(block, kw, self.fp_in, self.fp_out, self.n, self.bs, device, dtype)

    def advance(self, block, kw, device, dtype):
        """After block i is packed: the quantized chain moves through it; the fp chain's output becomes the input."""
        if self.q is not None:
            _run_chain(block, kw, self.q, self.q, self.n, self.bs, device, dtype)
        self.fp_in, self.fp_out = self.fp_out, self.fp_in

    def save(self, folder: Path, suffix: str = ""):
        """Copy the caches (block i's inputs) into ``folder`` as ``.npy`` files, a few samples at a time."""
        for name, cache in self.caches().items():
            t = cache.t
            raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bf16: its bits as int16
            out = np.lib.format.open_memmap(folder / f"{name}{suffix}.npy", mode="w+", dtype=raw.numpy().dtype, shape=tuple(t.shape))
            for i in range(0, t.shape[0], _CHAIN_ROWS):
                out[i : i + _CHAIN_ROWS] = raw[i : i + _CHAIN_ROWS].numpy()
            out.flush()
            del out

    def load(self, folder: Path, suffix: str = "") -> bool:
        """Fill the caches from ``save``'s files; False (caches untouched) if any is missing or of another shape."""
        arrays = {}
        for name, cache in self.caches().items():
            f = folder / f"{name}{suffix}.npy"
            if not f.exists():
                return False
            a = np.load(f, mmap_mode="r", allow_pickle=False)
            if tuple(a.shape) != tuple(cache.t.shape):
                return False
            arrays[name] = a
        for name, cache in self.caches().items():
            dst = cache.t.view(torch.int16) if cache.t.dtype == torch.bfloat16 else cache.t
            for i in range(0, dst.shape[0], _CHAIN_ROWS):
                dst[i : i + _CHAIN_ROWS] = torch.from_numpy(np.array(arrays[name][i : i + _CHAIN_ROWS]))
        return True


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
def _expert_token_counts(block):
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


def _block_fake_quant(block, spec: QuantSpec, prefix: str) -> dict[str, FakeQuantLinear]:
    def make(name, lin):
        check_target(f"{prefix}.{name}", lin, spec)
        return fake_quant_layer(lin, spec)
    return swap_layers(block, make, names=list(quant_targets(block)))


def _load_packed_block(block, spec: QuantSpec, state: dict, dtype):
    """Rebuild a finished block from its saved tensors (used by resume)."""
    swap_layers(block, lambda name, lin: packed_layer(lin.in_features, lin.out_features, spec, lin.bias is not None, dtype=dtype),
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


def _snapshot(params) -> list[torch.Tensor]:
    """A copy in host memory (not on the training GPU, where it would cost the block's size again)."""
    return [p.detach().to("cpu", copy=True) for p in params]


@torch.no_grad()
def _restore(params, snap):
    for p, v in zip(params, snap):
        p.copy_(v)


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


def train_block(block, kw, chain: ActivationChain, energy: torch.Tensor, bi: int, prefix: str, ctx: BlockContext) -> dict:
    """Block-AP on one decoder block: swap its linears for fake-quantized ones (RTN start), train weights, step sizes,
    zero points (and norms) against the fp targets in ``chain``, retry at 0.1x or fall back to RTN if it does not beat
    RTN on validation, then pack it to integers in place. ``energy``: every sample's ``‖fp_out − fp_in‖²``.
    Returns the block's record (errors before/after, steps, retries, fallback)."""
    config, device, shard = ctx.config, ctx.device, ctx.shard
    spec, cpu = config.spec, device.type == "cpu"
    train_dtype = torch.float32
    n_tr, n_va = ctx.n_train, ctx.n_val
    L = chain.inputs.t.shape[1]
    steps_per_epoch = math.ceil(n_tr / config.batch_size)
    t_block = time.time()
    block.to(train_dtype)
    fq = _block_fake_quant(block, spec, prefix)
    tr_idx, va_idx = torch.arange(n_tr), torch.arange(n_tr, n_tr + n_va)
    eval_idx = va_idx if n_va else tr_idx

    def rel_error():
        return _relative_error(block, kw, chain, shard, eval_idx, energy, device, train_dtype, config.loss)

    rtn_val = rel_error()
    weights = [m.weight for m in fq.values()]
    scales = [m.scale for m in fq.values()]
    zeros = [m.zero for m in fq.values() if not m.spec.sym]
    # updates of weights and step sizes in units of the groups' initial range (s0 · qmax): each group's, or the layer's mean
    units = {}
    for m in fq.values() if config.update_units != "absolute" else ():
        rng = (m.scale.detach().float() * m.spec.qmax).to(m.weight.dtype)
        if config.update_units == "layer":  # one unit per layer: its mean group range (scale-free, groups move alike)
            rng = torch.full_like(rng, float(rng.mean()))
        units[m.weight] = units[m.scale] = (rng, m.spec)
    for p in block.parameters():
        p.requires_grad_(False)
    fq_params = {id(p) for p in weights + scales + zeros}
    # the reference trains every other parameter named "weight" (the norms) at the weight rate; biases stay
    norms = [p for name, p in block.named_parameters() if config.train_norms and id(p) not in fq_params
             and name.rsplit(".", 1)[-1] == "weight" and p.is_floating_point()]
    if config.norm_updates == "relative":  # each norm's update in units of its own RMS, like the weights' in group ranges
        for p in norms:
            units[p] = (torch.full_like(p, float(p.detach().float().pow(2).mean().sqrt().clamp_min(1e-8))), spec)
    trained = weights + scales + zeros + norms
    for p in trained:
        p.requires_grad_(True)
    n_epochs = config.epochs_for(n_tr)
    lr_q, lr_w = config.learning_rates(n_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(config.seed * 100003 + bi)
    epochs = [epoch_batches(n_tr, config.batch_size, gen) for _ in range(n_epochs)]

    def fetch(idx):
        rows = shard.mine(idx)
        return chain.inputs[rows], chain.targets[rows]

    prefetch = _Prefetch(fetch, pin=device.type == "cuda")

    def loss_fn(item):  # this process's share of the batch, back-propagated here; gradients summed over processes
        idx, x, y = item
        denom = max(float(energy[idx].sum()), 1e-30)
        if len(x):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not cpu):
                out = run_layer(block, x.to(device, train_dtype, non_blocking=True), kw)
            loss = block_loss(out, y.to(device, torch.float32, non_blocking=True), config.loss, "sum") / denom
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

    try:
        start = _snapshot(trained)  # the RTN starting point, for the guard
        attempts, fallback, after_val = [], False, rtn_val
        for lr_factor in (1.0, 0.1):  # guard: a block that ends worse than RTN is retrained once at a tenth of the rates
            if attempts:
                _restore(trained, start)
            groups = [{"params": scales + zeros, "lr": lr_q * lr_factor}, {"params": weights + norms, "lr": lr_w * lr_factor}]
            opt = RelativeAdamW(groups, units, weight_decay=0.0)
            bar = tqdm(total=n_epochs * steps_per_epoch, desc=f"block {bi}/{ctx.n_blocks - 1}", unit="step",
                       disable=not ctx.progress, leave=False, position=1)
            res = train_epochs(groups, loss_fn, lambda e: prefetch(epochs[e]), n_epochs, steps_per_epoch,
                               clip=config.clip_grad or None, schedule=Schedule(n_epochs * steps_per_epoch, 0.0, config.min_lr_ratio),
                               val_fn=rel_error if n_va else None, early_stop=config.early_stop, log=ctx.log,
                               log_extra={"block": bi, "lr_factor": lr_factor}, progress=bar, optimizer=opt, backward=False)
            bar.close()
            after_val = rel_error()
            attempts.append({"lr_factor": lr_factor, "val": after_val, "steps": res.steps})
            if after_val < rtn_val or res.steps == 0:
                break
        else:  # both attempts ended at or above RTN: keep the RTN grid
            _restore(trained, start)
            after_val, fallback = rtn_val, True
            ctx.log.write(event="rtn_fallback", block=bi, attempts=attempts)
    finally:
        prefetch.close()  # also when training stops with an error
    del opt
    n_lin = sum(m.in_features * m.out_features for m in fq.values())
    ctx.flops_time[0] += 6.0 * n_lin * res.steps * config.batch_size * L / shard.world
    ctx.flops_time[1] += res.step_seconds
    for p in block.parameters():
        p.requires_grad_(False)
    pack_model(block)
    return {"block": bi, "rtn_mse": rtn_val, "trained_mse": after_val, "steps": res.steps, "retries": res.retries,
            "val_losses": res.val_losses, "seconds": round(time.time() - t_block, 2), "stopped_early": res.stopped_early,
            "lr_retried": len(attempts) > 1, "rtn_fallback": fallback}


class RunState:
    """A Block-AP run's work folder: ``progress.json`` (settings fingerprint, finished blocks), ``summary.json``,
    ``blocks/`` (each finished block's packed tensors) and ``chain-K/`` (the activations block K starts from,
    named by ``chain.json``). Only the first process writes, except each process's own chain files.
    Without a folder nothing is kept (and nothing can be resumed)."""

    def __init__(self, work: Path | None, fingerprint: str, n_blocks: int, resume: bool, shard: Shard):
        self.work, self.fingerprint, self.n_blocks, self.shard = work, fingerprint, n_blocks, shard
        self.done = 0
        self.suffix = "" if shard.world == 1 else f"-rank{shard.rank}"
        self._snap = {"at": time.time(), "cost": 0.0}
        if work is None:
            return
        state = resume_point(work / "progress.json", fingerprint, resume, lambda st: f"block {st['done']}/{n_blocks}")
        if state is not None:
            self.done = state["done"]
        shard.barrier()  # every process has read the state before the first one rewrites it
        if shard.main:
            (work / "blocks").mkdir(parents=True, exist_ok=True)
            self._progress(self.done)

    def _progress(self, done: int):
        atomic_write_json(self.work / "progress.json", {"fingerprint": self.fingerprint, "done": done, "blocks": self.n_blocks})

    def cache_folder(self) -> Path | None:
        return None if self.work is None else self.work / f"activations{self.suffix}"

    def previous_blocks(self) -> list:
        f = self.work / "summary.json" if self.work else None
        return json.loads(f.read_text())["blocks"][: self.done] if (f and f.exists() and self.done) else []

    def packed(self, bi: int) -> dict:
        return load_file(block_file(self.work, bi))

    def restore_chain(self, chain: ActivationChain) -> int:
        """Fill ``chain`` from the latest snapshot if usable (at most ``done``, same caches, dtype and processes);
        returns the block it belongs to (0: none, start from the embeddings)."""
        meta_file = self.work / "chain.json" if (self.work and self.done) else None
        if meta_file is None or not meta_file.exists():
            return 0
        meta = json.loads(meta_file.read_text())
        caches = chain.caches()
        if (meta["block"] > self.done or meta["caches"] != sorted(caches) or meta.get("world", 1) != self.shard.world
                or meta["dtype"] != str(next(iter(caches.values())).t.dtype)):
            return 0
        ok = chain.load(self.work / meta["dir"], self.suffix)
        return meta["block"] if not self.shard.any(not ok) else 0

    def finish_block(self, bi: int, block, summary: dict, chain: ActivationChain):
        """Block ``bi`` is packed: write it, the summary and the progress; then snapshot the chains for block
        ``bi + 1`` while that costs at most ``_CHAIN_OVERHEAD`` of the time since the last snapshot (after the
        progress: a snapshot never runs ahead of the finished blocks)."""
        if self.work is None:
            return
        if self.shard.main:
            save_block(self.work, bi, block)
            atomic_write_json(self.work / "summary.json", summary)
            self._progress(bi + 1)
        due = bi + 1 < self.n_blocks and self._snap["cost"] <= _CHAIN_OVERHEAD * (time.time() - self._snap["at"])
        if self.shard.any(due):
            t = time.time()
            self._save_chain(bi + 1, chain)
            self._snap.update(at=time.time(), cost=time.time() - t)

    def _save_chain(self, block: int, chain: ActivationChain):
        import shutil

        folder = self.work / f"chain-{block}"
        if self.shard.main:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        self.shard.barrier()
        chain.save(folder, self.suffix)
        self.shard.barrier()  # every process's files are complete before chain.json names the folder
        if self.shard.main:
            meta_file = self.work / "chain.json"
            previous = json.loads(meta_file.read_text()).get("dir") if meta_file.exists() else None
            caches = chain.caches()
            atomic_write_json(meta_file, {"block": block, "dir": folder.name, "caches": sorted(caches), "world": self.shard.world,
                                     "dtype": str(next(iter(caches.values())).t.dtype)})
            if previous and previous != folder.name:
                shutil.rmtree(self.work / previous, ignore_errors=True)


def quantize_block_ap(model, config: BlockAPConfig, tokenizer=None, work_dir=None, resume: bool = False, calib=None,
                      device=None, progress: bool = True, log_path=None) -> dict:
    """Block-AP in place: ``model``'s decoder linears become ``PackedLinear``. Returns a summary dict.

    ``calib``: optional ``(train_ids [N, L], val_ids [M, L])``; otherwise sampled from ``config.calib``.
    Under torch.distributed (``torchrun``) every process calls this with the same arguments; each trains on its
    share of the samples (``Shard``), all end with the same model, and only the first writes the work folder.
    """
    from qatlm.data.text import calibration_samples

    t_start = time.time()
    defuse_experts(model)  # MoE: one linear layer per expert (the loaders have done it already)
    spec = config.spec
    device = torch.device(device or next(model.parameters()).device)
    work = Path(work_dir) if work_dir else None
    if calib is None:
        if tokenizer is None:
            raise QatlmError("block-ap needs calibration text: pass a tokenizer (or calib=(train_ids, val_ids))")
        calib = calibration_samples(tokenizer, config.calib, config.calib_samples, config.calib_seqlen, config.seed, config.val_samples)
    train_ids, val_ids = calib
    n_tr, n_va = len(train_ids), len(val_ids)
    all_ids = torch.cat([train_ids, val_ids]) if n_va else train_ids
    n, L = all_ids.shape
    shard = Shard(n_tr, n_va, config.batch_size)
    progress = progress and shard.main

    parts = find_parts(model)
    layers = parts.layers
    lazy = lazy_source(model) is not None  # blocks are read from the shards one at a time, and dropped when packed
    if lazy:
        check_source_weights(model, spec)
    else:
        for bi, block in enumerate(layers):  # bad weights or widths are refused before any work starts
            for name, lin in quant_targets(block).items():
                check_target(f"{parts.layers_name}.{bi}.{name}", lin, spec)
    fingerprint = config.fingerprint() + hashlib.sha256(all_ids.numpy().tobytes()).hexdigest()[:8]
    state = RunState(work, fingerprint, len(layers), resume, shard)
    # per-layer keyword arguments (rotary cos/sin, masks) recorded at batch 1 broadcast to any batch
    _, kwargs = capture_layer_inputs(model, all_ids[:1].to(device), parts)
    hidden = first_layer_input(model, all_ids[:1].to(device), parts).shape[-1]
    chain = ActivationChain(len(shard.ids), L, hidden, config.cache_torch_dtype(device), config.input_mode,
                            int(config.ram_budget_gb * 2**30), state.cache_folder(), config.chain_batch)
    chain.fill(model, all_ids[shard.ids], parts, device)
    # a resumed run starts from the snapshot of the chains (normally at the first unfinished block) instead of
    # replaying every finished block over both chains
    chain_start = state.restore_chain(chain)
    compute_dtype = next(model.parameters()).dtype
    log = JsonLog((log_path or (work / "train_log.jsonl" if work else None)) if shard.main else None,
                  keep=lambda r: r.get("block", 0) < state.done)
    n_epochs = config.epochs_for(n_tr)
    steps = n_epochs * math.ceil(n_tr / config.batch_size)
    lrs = config.learning_rates(steps)
    summary = {"method": "block-ap", "config": asdict(config), "epochs": n_epochs, "steps_per_block": steps,
               "lr_quant": lrs[0], "lr_weight": lrs[1], "blocks": state.previous_blocks(),
               "resumed_from_block": state.done, "replayed_blocks": state.done - chain_start, "processes": shard.world,
               "block_error": "validation squared error / energy of the fp block's own contribution (rtn_mse, trained_mse)"}
    ctx = BlockContext(config, device, shard, n_tr, n_va, log, progress, len(layers))
    overall = tqdm(total=len(layers), initial=state.done, desc="Block-AP", unit="block", disable=not progress, position=0)
    for bi, block in enumerate(layers):
        kw = kwargs[bi]
        if bi < chain_start:  # finished, and the chains were restored past it: only its integers are needed
            if not lazy:  # (lazily loaded blocks are assembled from their files at save time)
                _load_packed_block(block, spec, state.packed(bi), compute_dtype)
            continue
        if lazy:  # its weights were checked before the first block (check_source_weights)
            materialize_block(model, bi, compute_dtype, device)
        # the fp target is this block (still full precision) on the fp chain's input
        with _expert_token_counts(block) as routed:
            energy = shard.gather(chain.compute_targets(block, kw, device, compute_dtype), n)
        if bi < state.done:  # finished before the interruption: reload its integers, move the chain on
            _load_packed_block(block, spec, state.packed(bi), compute_dtype)
        else:
            rec = train_block(block, kw, chain, energy, bi, f"{parts.layers_name}.{bi}", ctx)
            if routed:  # MoE: experts no calibration token reached get no gradient and keep their RTN grid
                rec["experts_without_tokens"] = [e for e, c in routed.items() if int(shard.all_sum(torch.tensor([c])).item()) == 0]
            summary["blocks"].append(rec)
        block.to(compute_dtype)
        # the next block's quantized-chain input is this (now integer) block on its own quantized input
        chain.advance(block, kw, device, compute_dtype)
        release_freed_memory()
        if bi >= state.done:
            overall.update(1)
            log.write(event="block_done", **rec)
            if progress:
                note = (", kept the RTN grid (training did not beat it)" if rec["rtn_fallback"] else
                        ", retrained at 0.1x lr" if rec["lr_retried"] else "")
                tqdm.write(f"block {bi}/{len(layers) - 1}: relative error rtn {rec['rtn_mse']:.3g} -> trained {rec['trained_mse']:.3g}  "
                           f"({rec['seconds']:.1f}s{', non-finite retries ' + str(rec['retries']) if rec['retries'] else ''}{note})")
            state.finish_block(bi, block, summary, chain)
        if lazy:
            release_block(block)
    overall.close()
    log.close()
    shard.barrier()
    summary["seconds"] = round(time.time() - t_start, 1)
    ft = ctx.flops_time
    summary["train_flops_per_s"] = ft[0] / ft[1] if ft[1] else None
    summary["rtn_fallback_blocks"] = [b["block"] for b in summary["blocks"] if b.get("rtn_fallback")]
    unrouted = [f"{parts.layers_name}.{b['block']}.{e}" for b in summary["blocks"] for e in b.get("experts_without_tokens", [])]
    if any("experts_without_tokens" in b for b in summary["blocks"]):
        summary["experts_without_tokens"] = unrouted  # kept at their RTN grid
        if progress and unrouted:
            tqdm.write(f"{len(unrouted)} experts received no calibration token and keep their RTN grid (e.g. {unrouted[0]})")
    summary["lr_retried_blocks"] = [b["block"] for b in summary["blocks"] if b.get("lr_retried")]
    return summary


def run(model, config: BlockAPConfig, data=None, context: Context | None = None) -> dict:
    """The method protocol (``methods/base.py``); ``data``: optional ``(train_ids, val_ids)``."""
    c = context or Context()
    return quantize_block_ap(model, config, tokenizer=c.tokenizer, work_dir=c.work_dir, resume=c.resume, calib=data, device=c.device,
                             progress=c.progress, log_path=c.log_path)
