"""The Python API: one config dataclass per method, recipes as lists of them, and one verb.

    summary = qatlm.quantize(model, qatlm.BlockAPConfig(bits=2, group_size=64), tokenizer=tok, out="out/w2g64")
    summary = qatlm.quantize(model, qatlm.recipe("efficientqat", grid=qatlm.QuantSpec(2, 64)), tokenizer=tok)
    summary = qatlm.quantize(model, [qatlm.BlockAPConfig(2, 64, epochs=1), qatlm.DLQATConfig(samples=256)], tokenizer=tok)

``config`` is one stage (RTN, Block-AP on a float model; E2E-QP, DL-QAT on a packed one) or a list of stages
run in order (``qatlm.recipes``). The model is changed in place and the run's summary returned. With ``out``
the API owns the folders: resumable state in ``out.work`` (``resume=True`` continues an interrupted run), the
packed checkpoint written atomically to ``out`` with ``training_summary.json``, then the work folder removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from qatlm.errors import QatlmError
from qatlm.methods.base import Context
from qatlm.recipes import RECIPES, STAGES, build_recipe, check_stages, grid_of, run_recipe

METHODS = RECIPES  # recipe name -> its stage config classes


def recipe(name: str, grid=None, **stages) -> list:
    """The stage configs of a named recipe: ``grid`` (a ``QuantSpec``) for its quantizer stage, and per stage
    a dict of fields by method name (``block_ap={...}``, ``e2e_qp={...}``, ``dl_qat={...}``, ``rtn={...}``)."""
    if name not in RECIPES:
        raise QatlmError(f"unknown recipe '{name}'; choose one of {', '.join(RECIPES)}")
    classes = RECIPES[name]
    names = [STAGES[c][0].replace("-", "_") for c in classes]
    unknown = set(stages) - set(names)
    if unknown:
        raise QatlmError(f"recipe {name} has no stage {sorted(unknown)[0]}; its stages: {', '.join(names)}")
    values = [dict(stages.get(n, {})) for n in names]
    if grid is not None:
        values[0]["grid"] = grid
    return build_recipe(name, values)


def quantize(model: nn.Module, config, *, tokenizer=None, out=None, resume: bool = False, overwrite: bool = False, device=None,
             progress: bool = True, cache_dir=None, calib=None, log_path=None, accelerator=None) -> dict:
    """Run one stage or a list of stages on ``model`` in place; returns the summary. ``calib``: optional
    pre-tokenized ``(train_ids, val_ids)`` for a first Block-AP stage."""
    from qatlm.model.checkpoint import save_quantized
    from qatlm.model.layers import packed_layers
    from qatlm.quant.linear import FakeQuantLinear, PackedLinear

    stages = list(config) if isinstance(config, (list, tuple)) else [config]
    check_stages(stages, model_is_quantized=any(isinstance(m, (PackedLinear, FakeQuantLinear)) for m in model.modules()))
    work = None
    if out is not None:
        out = Path(out).expanduser()
        work = out.parent / f"{out.name}.work"
        if out.exists() and not (overwrite or resume):
            raise QatlmError(f"{out} exists: pass overwrite=True to replace it")
        if work.exists() and not resume:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    ctx = Context(tokenizer=tokenizer, device=device, work_dir=work, resume=resume, progress=progress, cache_dir=cache_dir,
                  log_path=log_path, accelerator=accelerator)
    summary = run_recipe(model, stages, calib, ctx)
    if out is not None:
        layers = packed_layers(model)
        if not layers:
            raise QatlmError(f"{summary['method']} left no packed layers to save")
        spec = grid_of(stages) or next(iter(layers.values())).spec
        from qatlm.model.lazy import lazy_source

        save_quantized(model, out, spec, tokenizer=tokenizer, overwrite=True, meta={"method": summary["method"]},
                       block_files=work if lazy_source(model) is not None else None,  # a streamed model's blocks are there
                       report=lambda tmp: (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n"))
        shutil.rmtree(work, ignore_errors=True)
    return summary
