"""The Block-AP driver: calibration data, the chains, then every block in order through the sequential-block
pipeline (``model/sequential.py``), with resume."""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from qatlm.errors import QatlmError
from qatlm.methods.base import Context
from qatlm.methods.block_ap.block import BlockContext, expert_token_counts, load_packed_block, train_block
from qatlm.methods.block_ap.caches import ActivationChain
from qatlm.methods.block_ap.config import BlockAPConfig
from qatlm.methods.block_ap.sharding import Shard
from qatlm.methods.block_ap.state import RunState
from qatlm.model.arch import capture_layer_inputs, defuse_experts, first_layer_input, quant_targets
from qatlm.model.lazy import check_source_weights
from qatlm.model.sequential import SequentialBlocks
from qatlm.memory import release_freed_memory
from qatlm.quant.linear import check_target
from qatlm.summary import BlockAPSummary
from qatlm.train.loop import JsonLog


def calibration_ids(config: BlockAPConfig, tokenizer, calib, cache_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_ids [N, L], val_ids [M, L])``: the given ones, or sampled from ``config.calib``."""
    from qatlm.data.text import calibration_samples

    if calib is not None:
        return calib
    if tokenizer is None:
        raise QatlmError("block-ap needs calibration text: pass a tokenizer (or calib=(train_ids, val_ids))")
    return calibration_samples(tokenizer, config.calib, config.calib_samples, config.calib_seqlen, config.seed, config.val_samples,
                               cache_dir=cache_dir)


def check_blocks(model, blocks: SequentialBlocks, spec) -> None:
    """Bad weights or widths are refused before any work starts (a lazy model: read tensor by tensor)."""
    if blocks.lazy:
        check_source_weights(model, spec)
        return
    for bi, block in enumerate(blocks.parts.layers):
        for name, lin in quant_targets(block).items():
            check_target(f"{blocks.name(bi)}.{name}", lin, spec)


def start_summary(config: BlockAPConfig, n_tr: int, state: RunState, chain_start: int, world: int) -> BlockAPSummary:
    n_epochs = config.epochs_for(n_tr)
    steps = n_epochs * math.ceil(n_tr / config.batch_size)
    lq, lw = config.learning_rates(steps)
    return BlockAPSummary(config=asdict(config), epochs=n_epochs, steps_per_block=steps, lr_quant=lq, lr_weight=lw,
                          blocks=state.previous_blocks(), resumed_from_block=state.done, replayed_blocks=state.done - chain_start,
                          processes=world)


def report_block(rec, n_blocks: int) -> None:
    note = (", kept the RTN grid (training did not beat it)" if rec.rtn_fallback else
            ", retrained at 0.1x lr" if rec.lr_retried else "")
    retries = f", non-finite retries {rec.retries}" if rec.retries else ""
    tqdm.write(f"block {rec.block}/{n_blocks - 1}: relative error rtn {rec.rtn_rel_error:.3g} -> trained "
               f"{rec.trained_rel_error:.3g}  ({rec.seconds:.1f}s{retries}{note})")


def finish_summary(summary: BlockAPSummary, ctx: BlockContext, layers_name: str, t_start: float) -> BlockAPSummary:
    summary.seconds = round(time.time() - t_start, 1)
    flops, seconds = ctx.flops_time
    summary.train_flops_per_s = flops / seconds if seconds else None
    summary.rtn_fallback_blocks = [b.block for b in summary.blocks if b.rtn_fallback]
    summary.lr_retried_blocks = [b.block for b in summary.blocks if b.lr_retried]
    if any(b.experts_without_tokens is not None for b in summary.blocks):
        unrouted = [f"{layers_name}.{b.block}.{e}" for b in summary.blocks for e in (b.experts_without_tokens or [])]
        summary.experts_without_tokens = unrouted  # kept at their RTN grid
        if ctx.progress and unrouted:
            tqdm.write(f"{len(unrouted)} experts received no calibration token and keep their RTN grid (e.g. {unrouted[0]})")
    return summary


def quantize_block_ap(model, config: BlockAPConfig, tokenizer=None, work_dir=None, resume: bool = False, calib=None,
                      device=None, progress: bool = True, log_path=None, cache_dir=None) -> BlockAPSummary:
    """Block-AP in place: ``model``'s decoder linears become ``PackedLinear``. Returns the run's summary.

    ``calib``: optional ``(train_ids [N, L], val_ids [M, L])``; otherwise sampled from ``config.calib``.
    Under torch.distributed (``torchrun``) every process calls this with the same arguments; each trains on its
    share of the samples (``Shard``), all end with the same model, and only the first writes the work folder.
    """
    t_start = time.time()
    defuse_experts(model)  # MoE: one linear layer per expert (the loaders have done it already)
    device = torch.device(device or next(model.parameters()).device)
    work = Path(work_dir) if work_dir else None
    train_ids, val_ids = calibration_ids(config, tokenizer, calib, cache_dir)
    n_tr, n_va = len(train_ids), len(val_ids)
    all_ids = torch.cat([train_ids, val_ids]) if n_va else train_ids
    shard = Shard(n_tr, n_va, config.batch_size)
    compute_dtype = next(model.parameters()).dtype
    blocks = SequentialBlocks(model, work, compute_dtype, device)
    check_blocks(model, blocks, config.spec)
    fingerprint = config.fingerprint() + hashlib.sha256(all_ids.numpy().tobytes()).hexdigest()[:8]
    state = RunState(work, fingerprint, len(blocks), resume, shard)
    if state.recovered and progress and shard.main:
        tqdm.write(f"the work folder's progress.json was damaged: {state.recovered} finished blocks verified and recovered",
                   file=sys.stderr)
    # per-layer keyword arguments (rotary cos/sin, masks) recorded at batch 1 broadcast to any batch
    _, kwargs = capture_layer_inputs(model, all_ids[:1].to(device), blocks.parts)
    hidden = first_layer_input(model, all_ids[:1].to(device), blocks.parts).shape[-1]
    chain = ActivationChain(len(shard.ids), all_ids.shape[1], hidden, config.cache_torch_dtype(device), config.input_mode,
                            int(config.ram_budget_gb * 2**30), state.cache_folder(), config.chain_batch)
    chain.fill(model, all_ids[shard.ids], blocks.parts, device)
    # a resumed run starts from the snapshot of the chains (normally at the first unfinished block) instead of
    # replaying every finished block over both chains
    chain_start = state.restore_chain(chain)
    log = JsonLog((log_path or (work / "train_log.jsonl" if work else None)) if shard.main else None,
                  keep=lambda r: r.get("block", 0) < state.done)
    summary = start_summary(config, n_tr, state, chain_start, shard.world)
    ctx = BlockContext(config, device, shard, n_tr, n_va, log, progress and shard.main, len(blocks))
    overall = tqdm(total=len(blocks), initial=state.done, desc="Block-AP", unit="block", disable=not ctx.progress, position=0)
    for bi, block in blocks.blocks(load=lambda i: i >= chain_start):
        if bi < chain_start:  # finished, and the chains were restored past it: only its integers are needed
            if not blocks.lazy:  # (lazily loaded blocks are assembled from their files at save time)
                load_packed_block(block, config.spec, state.packed(bi), compute_dtype, blocks.name(bi))
            continue
        rec = run_one_block(block, bi, kwargs[bi], chain, state, ctx, blocks, compute_dtype, all_ids.shape[0])
        if rec is not None:
            summary.blocks.append(rec)
            overall.update(1)
            log.write(event="block_done", **asdict(rec))
            if ctx.progress:
                report_block(rec, len(blocks))
            state.finish_block(bi, block, summary, chain, blocks.save)
    overall.close()
    log.close()
    shard.barrier()
    return finish_summary(summary, ctx, blocks.parts.layers_name, t_start)


def run_one_block(block, bi: int, kw, chain: ActivationChain, state: RunState, ctx: BlockContext, blocks: SequentialBlocks,
                  compute_dtype, n: int):
    """Targets, then training (or, for a block finished before an interruption, its saved integers), then the chains
    move on through the packed block. Returns the block's record (None for a block finished earlier)."""
    device, shard = ctx.device, ctx.shard
    # the fp target is this block (still full precision) on the fp chain's input
    with expert_token_counts(block) as routed:
        energy = shard.gather(chain.compute_targets(block, kw, device, compute_dtype), n)
    rec = None
    if bi < state.done:  # finished before the interruption: reload its integers, move the chain on
        load_packed_block(block, ctx.config.spec, state.packed(bi), compute_dtype, blocks.name(bi))
    else:
        rec = train_block(block, kw, chain, energy, bi, blocks.name(bi), ctx)
        if routed:  # MoE: experts no calibration token reached get no gradient and keep their RTN grid
            rec.experts_without_tokens = [e for e, c in routed.items() if int(shard.all_sum(torch.tensor([c])).item()) == 0]
    block.to(compute_dtype)
    # the next block's quantized-chain input is this (now integer) block on its own quantized input
    chain.advance(block, kw, device, compute_dtype)
    release_freed_memory()
    return rec


def run(model, config: BlockAPConfig, data=None, context: Context | None = None) -> BlockAPSummary:
    """The method protocol (``methods/base.py``); ``data``: optional ``(train_ids, val_ids)``."""
    c = context or Context()
    return quantize_block_ap(model, config, tokenizer=c.tokenizer, work_dir=c.work_dir, resume=c.resume, calib=data, device=c.device,
                             progress=c.progress, log_path=c.log_path, cache_dir=c.cache_dir)
