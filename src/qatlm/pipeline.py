"""The one pipeline every entry point goes through: source -> loading -> stages -> atomic output.

``run_pipeline(source, stages, out)`` is what ``qatlm quantize``, ``qatlm train``, ``qatlm demo`` and
``qatlm.quantize`` all call. It owns, in this order:

1. the recipe check (a quantizer needs a float model, a trainer a quantized one) before anything is loaded;
2. the output guards: an ``out`` that is, contains or lies inside an input (the source folder, a data file) is
   refused, and so is an existing ``out`` without ``overwrite`` (``resume`` continues an unfinished run, it never
   replaces a finished one); one run at a time per ``out`` (a lock beside it);
3. the work folder ``OUT.work``: resumable state, claimed for one source (its fingerprint), recipe and grid; an
   unfinished run there is continued only with ``resume`` and discarded only with ``overwrite``; on failure it is
   kept when it holds something to resume from, and removed otherwise;
4. loading: a float folder block by block when the recipe streams (RTN, Block-AP: host memory flat in depth),
   else whole; a packed checkpoint with ``load_quantized``; or the in-memory model given (its guards use the
   folder it was loaded from, when there is one);
5. the stages (``recipes.run_recipe``), data-parallel under ``torchrun`` / ``accelerate launch``;
6. the output, written atomically with the training summary (no local paths), log and loss curve; then the work
   folder goes.
"""

from __future__ import annotations

import contextlib
import hashlib
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qatlm.errors import QatlmError
from qatlm.io import check_output, claim_work_dir, output_lock, resumable, source_fingerprint, work_dir_guard
from qatlm.methods.base import Context
from qatlm.quant.grid import grid_names
from qatlm.recipes import check_stages, grid_of, is_quantizer, recipe_name, run_recipe
from qatlm.summary import RunSummary


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Source:
    """What the stages start from: a folder (float or packed) or a model already in memory."""

    folder: Path | None  # the folder it is (or was loaded) from; None for a model built in memory
    model: nn.Module | None = None
    quantized: bool = False
    quant_config: dict = field(default_factory=dict)
    name: str | None = None  # what the checkpoint records as its source: the hub id, or the folder's name

    @classmethod
    def of(cls, source, revision: str | None = None) -> "Source":
        from qatlm.model.checkpoint import read_quant_config
        from qatlm.model.source import check_model_dir, is_quantized_dir
        from qatlm.quant.linear import FakeQuantLinear, PackedLinear

        if not isinstance(source, (nn.Module, str, os.PathLike)):
            raise QatlmError(f"the model must be a model folder (a path) or a torch model, not a {type(source).__name__}")
        if isinstance(source, nn.Module):
            origin = getattr(source, "name_or_path", "") or getattr(getattr(source, "config", None), "_name_or_path", "")
            folder = Path(origin).expanduser() if origin and Path(origin).expanduser().is_dir() else None
            quantized = any(isinstance(m, (PackedLinear, FakeQuantLinear)) for m in source.modules())
            return cls(folder, source, quantized)
        from qatlm.model.source import resolve_model

        folder = check_model_dir(resolve_model(source, revision))
        name = folder.name if Path(str(source)).expanduser().exists() else str(source)  # (a hub id names itself)
        if is_quantized_dir(folder):
            folder, qc = read_quant_config(folder)
            return cls(folder, None, True, qc, name)
        return cls(folder, name=name)

    def check_grid(self, stages) -> None:
        """The end-to-end methods train uniform grids: a K-quant checkpoint is refused before it is loaded."""
        from qatlm.model.checkpoint import spec_from_config

        spec = spec_from_config(self.quant_config) if self.quant_config else None
        if spec is not None and spec.kformat is not None:
            method = next(recipe_name([s]) for s in stages if not is_quantizer(s))
            raise QatlmError(f"{method} trains uniform grids only; {self.folder} is on the {spec.format} grid "
                             "(use rtn or block-ap for K-quant grids)")

    def check_positions(self, stages, given_calib: bool = False) -> None:
        """A window longer than the model's positions is refused before anything is loaded (the calibration's of
        Block-AP, the end-to-end stage's), naming the flag that sets it."""
        if self.model is not None:
            limit = getattr(self.model.config, "max_position_embeddings", None)
        else:
            from qatlm.model.source import read_config_json

            limit = read_config_json(self.folder).get("max_position_embeddings")
        if not isinstance(limit, int):
            return
        after_quantizer = any(is_quantizer(s) for s in stages)
        for i, st in enumerate(stages):
            for name, flag in (("calib_seqlen", "--calib-seqlen"), ("seqlen", "--e2e-seqlen" if after_quantizer else "--seqlen")):
                value = None if (i == 0 and given_calib) else getattr(st, name, None)  # (pre-tokenized data: its own length)
                if isinstance(value, int) and value > limit:
                    raise QatlmError(f"{flag} {value} is above the model's limit of {limit} positions")

    def fingerprint(self) -> str:
        if self.folder is not None:
            return source_fingerprint(self.folder)
        h = hashlib.sha256()  # a model built in memory: its tensors' names, shapes and first values
        for name, t in self.model.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.device.type != "meta" and t.numel():
                h.update(t.detach().flatten()[:64].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def _text_inputs(stages) -> list:
    """The data files the stages read (protected like the source: an output never replaces them)."""
    files = [getattr(s, k, None) for s in stages for k in ("calib", "data")]
    return [f for f in files if f and Path(str(f)).expanduser().exists()]


def _launch(stages, device) -> tuple[int, int, str, str]:
    """(processes, rank, device to load on, device to run on). Under ``torchrun`` / ``accelerate launch`` torch.distributed is initialised here
    (gloo on CPU, NCCL with one GPU per process, ``cuda:LOCAL_RANK``); end-to-end stages let accelerate do it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, device, device
    names = [recipe_name([s]) for s in stages]
    if any(is_quantizer(s) for s in stages):
        if names != ["block-ap"]:
            raise QatlmError(f"--method {recipe_name(stages)} runs in one process; data-parallel quantize (torchrun) is for "
                             "block-ap (train e2e-qp / dl-qat with torchrun instead)")
        import torch.distributed as dist

        cuda = torch.device(device).type == "cuda"
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return dist.get_world_size(), dist.get_rank(), device, device
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available() or torch.device(device).type == "cpu")
    return state.num_processes, state.process_index, "cpu", device  # accelerate moves the model to each process's device


def _barrier(world: int, stages) -> None:
    if world <= 1:
        return
    if any(is_quantizer(s) for s in stages):
        torch.distributed.barrier()
    else:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def _load(src: Source, stages, device, say) -> tuple[nn.Module, bool]:
    """The model to run the stages on, and whether it was loaded lazily (block by block)."""
    from qatlm.memory import adapt_to_free_memory
    from qatlm.model.checkpoint import load_fp_model, load_quantized, weights_size
    from qatlm.model.lazy import LazyUnsupported, lazy_source, load_lazy_model

    if src.model is not None:  # (one loaded with load_lazy_model streams too)
        return src.model, lazy_source(src.model) is not None
    if src.quantized:
        adapt_to_free_memory(weights_size(src.folder), device)
        return load_quantized(src.folder, device=device), False
    # RTN and Block-AP go block by block: each block is read from the shards when its turn comes
    streams = len(stages) == 1 and getattr(type(stages[0]), "streams", False) and not getattr(stages[0], "lm_head", False)
    if streams:
        try:
            return load_lazy_model(src.folder, device=device), True
        except LazyUnsupported as e:
            say(f"loading the whole model instead: {e}")
    return load_fp_model(src.folder, device=device), False


def _note_group_size(model, spec, say) -> None:
    from qatlm.model.arch import find_parts, quant_targets

    widths = [m.in_features for m in quant_targets(find_parts(model).layers[0]).values()]
    if spec is not None and widths and spec.group_size > max(widths):
        say(f"note: group size {spec.group_size} is larger than every layer's input width (at most {max(widths)}): each "
            "output row is one group, i.e. per-channel quantization")


def without_local_paths(obj):
    """A shared artefact names data files, not the user's directories: path values keep their last part."""
    if isinstance(obj, dict):
        return {k: without_local_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [without_local_paths(v) for v in obj]
    if isinstance(obj, str) and "/" in obj and Path(obj).expanduser().exists():
        return Path(obj).name
    return obj


def write_training_report(summary: RunSummary, work: Path | None, out: Path, say=None) -> None:
    """Beside the checkpoint: the summary (no local paths), the training log and its loss curve. RTN alone trains
    nothing and writes none of them."""
    if summary.stages == ["rtn"] and summary.mixed is None:
        return
    if summary.mixed is not None:
        from qatlm.eval.plots import allocation_map

        allocation_map(summary.mixed.layers, out / "allocation.png", summary.mixed.target_bpw)
    (out / "training_summary.json").write_text(json.dumps(without_local_paths(summary.to_dict()), indent=2) + "\n")
    logs = [] if work is None else [f for f in (work / "train_log.jsonl", *sorted(work.glob("stage-*/train_log.jsonl"))) if f.exists()]
    if logs:
        (out / "training_log.jsonl").write_text("".join(f.read_text() for f in logs))
        from qatlm.eval.plots import loss_curve

        loss_curve(out / "training_log.jsonl", out / "training_loss.png", summary.block_ap)
    if say is not None:
        report_training(summary, say)


def report_training(summary: RunSummary, say) -> None:
    """The lines a run closes with: validation loss of an end-to-end stage, and Block-AP's per-block errors."""
    m = summary.mixed
    if m is not None:
        names = grid_names(m.grids)
        say(f"mixed precision: {m.bits_per_weight:.3f} bits/weight for a budget of {m.target_bpw:g} ("
            + ", ".join(f"{names[t]} x{n}" for t, n in m.grids.items()) + f"); RTN block error predicted {sum(m.predicted_block_errors):.3g}, "
            f"measured {sum(m.measured_block_errors):.3g}; allocation.png shows it")
    e2e = summary.end_to_end
    if e2e is not None and e2e.cost:
        c = e2e.cost
        say(f"trained {c['trainable_params']:,} parameters: magnitudes {c['magnitude_params']:,}, LoRA rank {c['rank']} "
            f"{c['lora_params']:,} ({100 * e2e.trainable_fraction:.2f}% of the model)")
    if e2e is not None and e2e.val_loss_before is not None and e2e.val_losses:
        line = f"validation loss {e2e.val_loss_before:.4f} -> {e2e.val_loss_after:.4f}"
        if e2e.bought_nothing:
            line += (f" ({e2e.method} bought nothing: every validated state was worse than the model it started from, "
                     "which is returned unchanged)")
        elif e2e.restored_best:
            line += f" (the best validated state, step {e2e.best_step}; the last was {e2e.val_losses[-1]:.4f})"
        say(line)
    if summary.block_ap is None or not summary.block_ap.blocks:
        return
    say("block  error(RTN)   error(trained)  change   (squared error / energy of the fp block's contribution)")
    for b in summary.block_ap.blocks:
        flag = "  kept RTN" if b.rtn_fallback else "  (0.1x lr)" if b.lr_retried else ""
        change = 100 * (b.trained_rel_error / b.rtn_rel_error - 1) if b.rtn_rel_error else 0.0
        say(f"{b.block:>5}  {b.rtn_rel_error:.4e}   {b.trained_rel_error:.4e}      {change:+.1f}%{flag}")


def _claim(work: Path, src: Source, stages, resume: bool, overwrite: bool) -> None:
    """The work folder belongs to one source, recipe and grid; an unfinished run there is never silently lost."""
    if work.exists() and not resume:
        if overwrite:
            shutil.rmtree(work)
        elif resumable(work):
            raise QatlmError(f"{work} holds an unfinished run: pass --resume (resume=True) to continue it, or --overwrite "
                             "(overwrite=True) to start over")
    grid = grid_of(stages)
    claim_work_dir(work, f"{src.fingerprint()}|{recipe_name(stages)}|{grid.tag if grid else '-'}", resume)


def _save(model, out: Path, src: Source, stages, summary: RunSummary, tokenizer, work: Path, lazy: bool, save_dtype: str, say):
    from qatlm.model.checkpoint import save_quantized, source_dtype, spec_from_config
    from qatlm.model.layers import packed_layers

    layers = packed_layers(model)
    if not layers:
        raise QatlmError(f"{summary.method} left no packed layers to save")
    spec = grid_of(stages) or (spec_from_config(src.quant_config) if src.quant_config else next(iter(layers.values())).spec)
    if spec.mixed:  # the card and the hints route every layer grid the allocation chose
        from qatlm.model.checkpoint import layer_grids

        spec = dataclasses.replace(spec, layers=tuple(sorted((n, s.tag) for n, s in layer_grids(model, spec).items())))
    if src.quantized:
        prev = (src.quant_config.get("meta") or {}).get("qatlm", {}).get("method", "gptq") if src.quant_config else None
        method = f"{prev}+{summary.method}" if prev else summary.method
    else:
        method = summary.method
    meta = {"method": method}
    if src.folder is not None:
        meta["source"] = src.name or src.folder.name
    if save_dtype == "auto":
        dtype = source_dtype(src.folder, builtin_fp16=True) if (src.folder is not None and not src.quantized) else None
    else:
        dtype = getattr(torch, save_dtype)
    if src.folder is not None and not src.quantized:
        meta["source_dtype"] = str(source_dtype(src.folder, builtin_fp16=False)).removeprefix("torch.")

    def report(tmp: Path):
        from qatlm.export.card import write_card

        write_card(tmp, source=meta.get("source"), method=method, grid=spec.tag, kind="kquant" if spec.kformat else "gptq",
                   spec=spec, summary=summary)
        write_training_report(summary, work, tmp, say)

    save_quantized(model, out, spec, tokenizer=tokenizer, overwrite=True, meta=meta, dtype=dtype, report=report,
                   block_files=work if lazy else None)


def run_pipeline(source, stages, out=None, *, resume: bool = False, overwrite: bool = False, device=None, tokenizer=None,
                 calib=None, save_dtype: str = "auto", progress: bool = True, cache_dir=None, accelerator=None, log_path=None,
                 revision: str | None = None, say=_stderr) -> RunSummary:
    """Run ``stages`` on ``source`` (a model folder, float or packed, a hub id at ``revision``, or a model in memory,
    changed in place) and, with ``out``, write the packed checkpoint there. Returns the run's summary. See the module
    docstring."""
    stages = list(stages) if isinstance(stages, (list, tuple)) else [stages]
    src = Source.of(source, revision)
    check_stages(stages, model_is_quantized=src.quantized)
    src.check_grid(stages)
    if tokenizer is None and src.folder is None:  # (a folder brings its own; checked when loaded)
        for i, st in enumerate(stages):
            if not is_quantizer(st):
                raise QatlmError(f"{recipe_name([st])} trains end to end on text: pass a tokenizer")
            if hasattr(st, "calib") and not (i == 0 and calib is not None):
                raise QatlmError("block-ap needs calibration text: pass a tokenizer (or calib=(train_ids, val_ids))")
    src.check_positions(stages, given_calib=calib is not None)
    say = say if progress else (lambda msg: None)
    if src.model is not None:  # a model in memory runs where it is (``device``: None = there)
        world, rank, load_device, run_device = 1, 0, None, device
    else:
        world, rank, load_device, run_device = _launch(stages, device or "cpu")
    main = rank == 0
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise QatlmError(f"out must be a folder path, not a {type(out).__name__}")
    if out is not None and not str(out).strip():
        raise QatlmError("the output folder name is empty (--out '')")
    out = Path(out).expanduser() if out is not None else None
    work = out.parent / f"{out.name}.work" if out is not None else None
    if out is not None and main:
        check_output(out, [src.folder, *_text_inputs(stages)], overwrite)
    with output_lock(out) if (out is not None and main) else contextlib.nullcontext():
        if work is not None and main:
            _claim(work, src, stages, resume, overwrite)
        _barrier(world, stages)  # the work folder is claimed before any process uses it
        with work_dir_guard(work) if (work is not None and main) else contextlib.nullcontext():
            t0 = time.time()
            model, lazy = _load(src, stages, load_device, say)
            if tokenizer is None and src.folder is not None:
                from qatlm.model.checkpoint import load_tokenizer

                tokenizer = load_tokenizer(src.folder)
            if src.model is None and main:
                verb = "quantizing" if any(is_quantizer(st) for st in stages) else "training"
                grid = f" at {grid_of(stages).tag}" if grid_of(stages) else ""
                say(f"{verb} with {recipe_name(stages)}{grid} on {run_device}" + (" (block by block)" if lazy else "")
                    + (f", {world} data-parallel processes" if world > 1 else ""))
            if grid_of(stages) is not None:
                _note_group_size(model, grid_of(stages), say if main else (lambda m: None))
            ctx = Context(tokenizer=tokenizer, device=run_device, work_dir=work,
                          resume=resume, progress=progress and main, cache_dir=cache_dir, log_path=log_path, accelerator=accelerator)
            summary = run_recipe(model, stages, calib, ctx)
            summary.device = str(run_device or next(model.parameters()).device)
            if out is not None and main:
                _save(model, out, src, stages, summary, tokenizer, work, lazy, save_dtype, say)
                say(f"saved {out} in {time.time() - t0:.1f}s")
        _barrier(world, stages)  # nobody removes the work folder while another process still reads it
        if work is not None and main:
            shutil.rmtree(work, ignore_errors=True)
    if world > 1 and any(is_quantizer(s) for s in stages):
        torch.distributed.destroy_process_group()
    return summary
