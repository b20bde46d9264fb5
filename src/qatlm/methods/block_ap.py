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
- weight and step-size updates are measured in each quantization group's initial range (max − min), so a
  learning rate means "fraction of the group's range per step" on every model (``RelativeAdamW``);
- a block whose trained validation error is not below its RTN error is retrained once at a tenth of the
  rates and otherwise falls back to its RTN grid: Block-AP never ends a block worse than RTN.

Activations live in RAM up to ``ram_budget_gb``, beyond it in memory-mapped files. After every
finished block its packed tensors are written to ``work_dir``; ``resume=True`` reloads them, rebuilds
the two input chains by running the finished blocks, and continues with the next block — giving the
same result as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from qatlm.errors import QatlmError, check_number
from qatlm.fsutil import atomic_write_text
from qatlm.model.lazy import block_file, check_source_weights, lazy_source, materialize_block, release_block, save_block
from qatlm.model.arch import capture_layer_inputs, find_parts, first_layer_input, quant_targets, replace_module, run_layer
from qatlm.quant.apply import check_target
from qatlm.quant.grid import QuantSpec, expand_groups
from qatlm.quant.linear import FakeQuantLinear, PackedLinear
from qatlm.train import JsonLog, Schedule, release_freed_memory, train_epochs


PAPER_STEPS = 4096
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


@dataclass
class BlockAPConfig:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    v1_zeros: bool = False  # keep zero points >= 1 so a GPTQ v1 export is exact
    lm_head: bool = False
    calib: str = "wikipedia"
    calib_samples: int = 128
    calib_seqlen: int = 512
    val_samples: int = 16
    seed: int = 0
    epochs: int = 2
    batch_size: int = 2
    lr_quant: float | None = None  # None: step-scaled from 1e-4 (see learning_rates); in units of each group's range
    lr_weight: float | None = None  # None: step-scaled from 2e-5 (2-bit) / 1e-5 (3-8 bit); in units of each group's range
    min_lr_ratio: float = 0.05
    clip_grad: float | None = None  # the reference does not clip Block-AP gradients
    input_mode: str = "quant"  # "quant": quantized-chain inputs; "fp": full-precision-chain inputs
    loss: str = "mse"  # "mse" (paper) or "mse-capped": tokens of massive norm (attention sinks) weigh as a typical token
    train_norms: bool = True  # the reference trains every block weight that is not quantized (norms), biases stay fixed
    early_stop: bool = False
    ram_budget_gb: float = 8.0
    chain_batch: int = 8  # samples per forward when moving activations through a finished block
    cache_dtype: str = "auto"  # activation caches: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16

    def __post_init__(self):
        self.spec  # validates bits / group size
        if self.lm_head:
            raise QatlmError("block-ap trains decoder blocks only; quantize the LM head with rtn (drop --lm-head)")
        if self.input_mode not in ("quant", "fp"):
            raise QatlmError(f"input mode must be 'quant' or 'fp', got '{self.input_mode}'")
        if self.cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise QatlmError(f"--cache-dtype must be auto, float32, bfloat16 or float16, got '{self.cache_dtype}'")
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

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym, 1 if self.v1_zeros else 0)

    def cache_torch_dtype(self, device) -> torch.dtype:
        if self.cache_dtype == "auto":
            return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
        return getattr(torch, self.cache_dtype)

    def learning_rates(self, steps: int) -> tuple[float, float]:
        """(lr_quant, lr_weight), both in units of each quantization group's initial range (max − min) per
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


_CHAIN_ROWS = 64  # samples copied at a time between a cache and its snapshot file (bounded memory)
_CHAIN_OVERHEAD = 0.1  # at most this share of the run's time goes into writing chain snapshots


def _save_chain(work: Path, block: int, caches: dict) -> None:
    """Snapshot the activation caches that block ``block`` reads (``{name: ActivationCache}``) so that a resumed
    run starts there without replaying the finished blocks. ``work/chain.json`` names the complete snapshot;
    it is switched atomically after the files are written, then the older snapshot is removed."""
    import shutil

    folder = work / f"chain-{block}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, cache in caches.items():
        t = cache.t
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bf16: its bits as int16
        out = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=raw.numpy().dtype, shape=tuple(t.shape))
        for i in range(0, t.shape[0], _CHAIN_ROWS):
            out[i : i + _CHAIN_ROWS] = raw[i : i + _CHAIN_ROWS].numpy()
        out.flush()
        del out
    previous = json.loads((work / "chain.json").read_text()).get("dir") if (work / "chain.json").exists() else None
    _atomic_json(work / "chain.json", {"block": block, "dir": folder.name, "caches": sorted(caches),
                                       "dtype": str(next(iter(caches.values())).t.dtype)})
    if previous and previous != folder.name:
        shutil.rmtree(work / previous, ignore_errors=True)


def _load_chain(work: Path, caches: dict, done_blocks: int) -> int:
    """Fill ``caches`` from the latest snapshot if it is usable (at most ``done_blocks``, same caches, shapes and
    dtype); returns the block it belongs to (0: none, start from the embeddings)."""
    meta_file = work / "chain.json"
    if not meta_file.exists():
        return 0
    meta = json.loads(meta_file.read_text())
    block, folder = meta["block"], work / meta["dir"]
    if block > done_blocks or meta["caches"] != sorted(caches) or meta["dtype"] != str(next(iter(caches.values())).t.dtype):
        return 0
    arrays = {}
    for name, cache in caches.items():
        f = folder / f"{name}.npy"
        if not f.exists():
            return 0
        a = np.load(f, mmap_mode="r", allow_pickle=False)
        if tuple(a.shape) != tuple(cache.t.shape):
            return 0
        arrays[name] = a
    for name, cache in caches.items():
        dst = cache.t.view(torch.int16) if cache.t.dtype == torch.bfloat16 else cache.t
        for i in range(0, dst.shape[0], _CHAIN_ROWS):
            dst[i : i + _CHAIN_ROWS] = torch.from_numpy(np.array(arrays[name][i : i + _CHAIN_ROWS]))
    return block


def _chain_caches(fp_in, q_in) -> dict:
    return {"fp": fp_in} if q_in is None else {"fp": fp_in, "q": q_in}


def _atomic_json(path: Path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2))


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


def _block_fake_quant(block, spec: QuantSpec, prefix: str) -> dict[str, FakeQuantLinear]:
    layers = {}
    for name, lin in quant_targets(block).items():
        check_target(f"{prefix}.{name}", lin, spec)
        layers[name] = FakeQuantLinear(lin, spec)
        replace_module(block, name, layers[name])
    return layers


def _pack_block(block):
    for n in [n for n, m in block.named_modules() if isinstance(m, FakeQuantLinear)]:
        replace_module(block, n, block.get_submodule(n).to_packed())


def _load_packed_block(block, spec: QuantSpec, state: dict, dtype):
    """Rebuild a finished block from its saved tensors (used by resume)."""
    for name, lin in quant_targets(block).items():
        replace_module(block, name, PackedLinear(lin.in_features, lin.out_features, spec, lin.bias is not None, dtype=dtype))
    block.load_state_dict(state, strict=True)


@torch.no_grad()
def _mean_loss(block, kwargs, x: ActivationCache, y: ActivationCache, idx, bs, device, dtype, energy: torch.Tensor,
               kind: str = "mse") -> float:
    """The block's relative error on samples ``idx``: squared error / energy of the block's own contribution."""
    tot = 0.0
    for i in range(0, len(idx), bs):
        b = idx[i : i + bs]
        tot += block_loss(run_layer(block, x[b].to(device, dtype), kwargs), y[b].to(device), kind, "sum").item()
    return tot / max(float(energy[idx].sum()), 1e-30)


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _restore(params, snap):
    for p, v in zip(params, snap):
        p.copy_(v)


def quantize_block_ap(model, config: BlockAPConfig, tokenizer=None, work_dir=None, resume: bool = False, calib=None,
                      device=None, progress: bool = True, log_path=None) -> dict:
    """Block-AP in place: ``model``'s decoder linears become ``PackedLinear``. Returns a summary dict.

    ``calib``: optional ``(train_ids [N, L], val_ids [M, L])``; otherwise sampled from ``config.calib``.
    """
    from qatlm.data.text import calibration_samples

    t_start = time.time()
    spec = config.spec
    device = torch.device(device or next(model.parameters()).device)
    cpu = device.type == "cpu"
    work = Path(work_dir) if work_dir else None
    if calib is None:
        if tokenizer is None:
            raise QatlmError("block-ap needs calibration text: pass a tokenizer (or calib=(train_ids, val_ids))")
        calib = calibration_samples(tokenizer, config.calib, config.calib_samples, config.calib_seqlen, config.seed, config.val_samples)
    train_ids, val_ids = calib
    n_tr, n_va = len(train_ids), len(val_ids)
    all_ids = torch.cat([train_ids, val_ids]) if n_va else train_ids
    n, L = all_ids.shape

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
    progress_file = work / "progress.json" if work else None
    done_blocks = 0
    if work:
        (work / "blocks").mkdir(parents=True, exist_ok=True)
        if progress_file.exists():
            state = json.loads(progress_file.read_text())
            if not resume:
                raise QatlmError(f"{work} holds an unfinished run (block {state['done']}/{len(layers)}): pass --resume to continue it, or --overwrite to start over")
            if state["fingerprint"] != fingerprint:
                raise QatlmError(f"cannot resume from {work}: it was started with other settings or calibration data")
            done_blocks = state["done"]
        _atomic_json(progress_file, {"fingerprint": fingerprint, "done": done_blocks, "blocks": len(layers)})
    # per-layer keyword arguments (rotary cos/sin, masks) recorded at batch 1 broadcast to any batch
    _, kwargs = capture_layer_inputs(model, all_ids[:1].to(device), parts)
    # layer-0 inputs of all samples, through the model's own embedding path
    budget = {"left": int(config.ram_budget_gb * 2**30)}
    caches_dir = work / "activations" if work else None
    hidden = first_layer_input(model, all_ids[:1].to(device), parts).shape[-1]
    # two caches, as the reference: with quantized-chain inputs the fp chain advances in place (fp_in is
    # fp_out), beside the quantized chain; with fp inputs the two fp caches alternate
    cdt = config.cache_torch_dtype(device)
    fp_in = ActivationCache((n, L, hidden), cdt, budget, caches_dir, "fp")
    fp_out = ActivationCache((n, L, hidden), cdt, budget, caches_dir, "fp_out") if config.input_mode == "fp" else fp_in
    q_in = ActivationCache((n, L, hidden), cdt, budget, caches_dir, "q") if config.input_mode == "quant" else None
    for i in range(0, n, config.chain_batch):
        h = first_layer_input(model, all_ids[i : i + config.chain_batch].to(device), parts).float().cpu()
        fp_in[i : i + len(h)] = h
        if q_in is not None:
            q_in[i : i + len(h)] = h

    # a resumed run starts from the snapshot of the chains (normally at the first unfinished block) instead of
    # replaying every finished block over both chains
    chain_start = _load_chain(work, _chain_caches(fp_in, q_in), done_blocks) if (work and done_blocks) else 0
    compute_dtype = next(model.parameters()).dtype
    train_dtype = torch.float32
    steps_per_epoch = math.ceil(n_tr / config.batch_size)
    log = JsonLog(log_path or (work / "train_log.jsonl" if work else None), keep=lambda r: r.get("block", 0) < done_blocks)
    lrs = config.learning_rates(config.epochs * steps_per_epoch)
    summary = {"method": "block-ap", "config": asdict(config), "lr_quant": lrs[0], "lr_weight": lrs[1], "blocks": [],
               "resumed_from_block": done_blocks, "replayed_blocks": done_blocks - chain_start,
               "block_error": "validation squared error / energy of the fp block's own contribution (rtn_mse, trained_mse)"}
    if work and (work / "summary.json").exists() and done_blocks:
        summary["blocks"] = json.loads((work / "summary.json").read_text())["blocks"][:done_blocks]

    tr_idx = torch.arange(n_tr)
    va_idx = torch.arange(n_tr, n)
    flops_time = [0.0, 0.0]  # (training FLOPs, seconds) of the optimisation steps (validation excluded)
    overall = tqdm(total=len(layers), initial=done_blocks, desc="Block-AP", unit="block", disable=not progress, position=0)
    last_snapshot = {"at": time.time(), "cost": 0.0}
    for bi, block in enumerate(layers):
        kw = kwargs[bi]
        prefix = f"{parts.layers_name}.{bi}"
        if bi < chain_start:  # finished, and the chains were restored past it: only its integers are needed
            if not lazy:  # (lazily loaded blocks are assembled from their files at save time)
                _load_packed_block(block, spec, load_file(block_file(work, bi)), compute_dtype)
            continue
        if lazy:  # its weights were checked before the first block (check_source_weights)
            materialize_block(model, bi, compute_dtype, device)
        # the fp target is this block (still full precision) on the fp chain's input
        energy = _run_chain(block, kw, fp_in, fp_out, n, config.chain_batch, device, compute_dtype)
        if bi < done_blocks:  # finished before the interruption: reload its integers, move the chain on
            _load_packed_block(block, spec, load_file(block_file(work, bi)), compute_dtype)
            if q_in is not None:
                _run_chain(block, kw, q_in, q_in, n, config.chain_batch, device, compute_dtype)
            fp_in, fp_out = fp_out, fp_in
            if lazy:
                release_block(block)
            continue
        t_block = time.time()
        block.to(train_dtype)
        fq = _block_fake_quant(block, spec, prefix)
        x_in = q_in if q_in is not None else fp_in
        eval_idx = va_idx if n_va else tr_idx
        rtn_val = _mean_loss(block, kw, x_in, fp_out, eval_idx, config.chain_batch, device, train_dtype, energy, config.loss)
        weights = [m.weight for m in fq.values()]
        scales = [m.scale for m in fq.values()]
        zeros = [m.zero for m in fq.values()] if not spec.sym else []
        # updates of weights and step sizes in units of each group's initial range (s0 · qmax)
        units = {}
        for m in fq.values():
            rng = (m.scale.detach().float() * spec.qmax).to(m.weight.dtype)
            units[m.weight] = units[m.scale] = (rng, spec)
        for p in block.parameters():
            p.requires_grad_(False)
        fq_params = {id(p) for p in weights + scales + zeros}
        # the reference trains every other parameter named "weight" (the norms) at the weight rate; biases stay
        norms = [p for name, p in block.named_parameters() if config.train_norms and id(p) not in fq_params
                 and name.rsplit(".", 1)[-1] == "weight" and p.is_floating_point()]
        trained = weights + scales + zeros + norms
        for p in trained:
            p.requires_grad_(True)
        lr_q, lr_w = config.learning_rates(config.epochs * steps_per_epoch)
        gen = torch.Generator().manual_seed(config.seed * 100003 + bi)
        perms = [torch.randperm(n_tr, generator=gen) for _ in range(config.epochs)]

        def batches(epoch, perms=perms):
            p = perms[epoch]
            for i in range(0, n_tr, config.batch_size):
                yield p[i : i + config.batch_size]

        def loss_fn(idx, block=block, kw=kw, x_in=x_in, y_out=fp_out, energy=energy):
            x = x_in[idx].to(device, train_dtype)
            y = y_out[idx].to(device, torch.float32)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not cpu):
                out = run_layer(block, x, kw)
            return block_loss(out, y, config.loss, "sum") / max(float(energy[idx].sum()), 1e-30)

        val_fn = (lambda block=block, kw=kw, x_in=x_in, y_out=fp_out, energy=energy: _mean_loss(
            block, kw, x_in, y_out, va_idx, config.chain_batch, device, train_dtype, energy, config.loss)) if n_va else None
        start = _snapshot(trained)  # the RTN starting point, for the guard
        attempts, fallback, after_val = [], False, rtn_val
        for lr_factor in (1.0, 0.1):  # guard: a block that ends worse than RTN is retrained once at a tenth of the rates
            if attempts:
                _restore(trained, start)
            groups = [{"params": scales + zeros, "lr": lr_q * lr_factor}, {"params": weights + norms, "lr": lr_w * lr_factor}]
            opt = RelativeAdamW(groups, units, weight_decay=0.0)
            bar = tqdm(total=config.epochs * steps_per_epoch, desc=f"block {bi}/{len(layers) - 1}", unit="step", disable=not progress, leave=False, position=1)
            res = train_epochs(groups, loss_fn, batches, config.epochs, steps_per_epoch, clip=config.clip_grad or None,
                               schedule=Schedule(config.epochs * steps_per_epoch, 0.0, config.min_lr_ratio), val_fn=val_fn,
                               early_stop=config.early_stop, log=log, log_extra={"block": bi, "lr_factor": lr_factor},
                               progress=bar, optimizer=opt)
            bar.close()
            after_val = _mean_loss(block, kw, x_in, fp_out, eval_idx, config.chain_batch, device, train_dtype, energy, config.loss)
            attempts.append({"lr_factor": lr_factor, "val": after_val, "steps": res.steps})
            if after_val < rtn_val or res.steps == 0:
                break
        else:  # both attempts ended at or above RTN: keep the RTN grid
            _restore(trained, start)
            after_val, fallback = rtn_val, True
            log.write(event="rtn_fallback", block=bi, attempts=attempts)
        del opt
        n_lin = sum(m.in_features * m.out_features for m in fq.values())
        flops_time[0] += 6.0 * n_lin * res.steps * config.batch_size * L
        flops_time[1] += res.step_seconds
        for p in block.parameters():
            p.requires_grad_(False)
        _pack_block(block)
        block.to(compute_dtype)
        # the next block's quantized-chain input is this (now integer) block on its own quantized input
        if q_in is not None:
            _run_chain(block, kw, q_in, q_in, n, config.chain_batch, device, compute_dtype)
        fp_in, fp_out = fp_out, fp_in
        del fq, weights, scales, zeros, norms, trained, start, units, groups  # the fake-quant layers still hold fp weights
        release_freed_memory()
        rec = {"block": bi, "rtn_mse": rtn_val, "trained_mse": after_val, "steps": res.steps, "retries": res.retries,
               "val_losses": res.val_losses, "seconds": round(time.time() - t_block, 2), "stopped_early": res.stopped_early,
               "lr_retried": len(attempts) > 1, "rtn_fallback": fallback}
        summary["blocks"].append(rec)
        overall.update(1)
        log.write(event="block_done", **rec)
        if progress:
            note = ", kept the RTN grid (training did not beat it)" if fallback else ", retrained at 0.1x lr" if len(attempts) > 1 else ""
            tqdm.write(f"block {bi}/{len(layers) - 1}: relative error rtn {rtn_val:.3g} -> trained {after_val:.3g}  "
                       f"({rec['seconds']:.1f}s{', non-finite retries ' + str(res.retries) if res.retries else ''}{note})")
        if work:
            save_block(work, bi, block)
            _atomic_json(work / "summary.json", summary)
            _atomic_json(progress_file, {"fingerprint": fingerprint, "done": bi + 1, "blocks": len(layers)})
            # snapshot the chains for block bi + 1 while that costs at most _CHAIN_OVERHEAD of the time since the last
            # one (after progress.json: a snapshot never runs ahead of the finished blocks)
            if bi + 1 < len(layers) and last_snapshot["cost"] <= _CHAIN_OVERHEAD * (time.time() - last_snapshot["at"]):
                t_snap = time.time()
                _save_chain(work, bi + 1, _chain_caches(fp_in, q_in))
                last_snapshot.update(at=time.time(), cost=time.time() - t_snap)
            if lazy:
                release_block(block)
    overall.close()
    log.close()
    summary["seconds"] = round(time.time() - t_start, 1)
    summary["train_flops_per_s"] = flops_time[0] / flops_time[1] if flops_time[1] else None
    summary["rtn_fallback_blocks"] = [b["block"] for b in summary["blocks"] if b.get("rtn_fallback")]
    summary["lr_retried_blocks"] = [b["block"] for b in summary["blocks"] if b.get("lr_retried")]
    return summary

