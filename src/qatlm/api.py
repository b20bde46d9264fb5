"""The Python API: one config dataclass per method, recipes as lists of them, and one verb.

    summary = qatlm.quantize(model, qatlm.BlockAPConfig(bits=2, group_size=64), tokenizer=tok, out="out/w2g64")
    summary = qatlm.quantize(model, qatlm.recipe("efficientqat", grid=qatlm.QuantSpec(2, 64)), tokenizer=tok)
    summary = qatlm.quantize(model, [qatlm.BlockAPConfig(2, 64, epochs=1), qatlm.DLQATConfig(samples=256)], tokenizer=tok)

``model`` is a model folder or a model in memory; ``config`` one stage (RTN, Block-AP on a float model; E2E-QP,
DL-QAT on a packed one) or a list of stages run in order (``qatlm.recipes``). It is the same pipeline as the
command line (``qatlm.pipeline.run_pipeline``): with ``out``, resumable state in ``out.work`` (``resume=True``
continues an interrupted run), the checkpoint written atomically to ``out``, the same refusals (an output that
is or contains an input, an existing output without ``overwrite``, a second run on the same output).
"""

from __future__ import annotations

from qatlm.errors import QatlmError, crash_report
from qatlm.pipeline import run_pipeline
from qatlm.recipes import RECIPES, STAGES, build_recipe
from qatlm.summary import RunSummary

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


def quantize(model, config, *, tokenizer=None, out=None, resume: bool = False, overwrite: bool = False, device=None,
             progress: bool = True, cache_dir=None, calib=None, log_path=None, accelerator=None, save_dtype: str = "auto") -> RunSummary:
    """Run one stage or a list of stages on ``model`` — a model folder (float or packed; read block by block when the
    recipe streams) or a model in memory (changed in place) — and return the summary. With ``out`` the packed
    checkpoint is written there with every guarantee of the command line (``qatlm.pipeline``). ``calib``: optional
    pre-tokenized ``(train_ids, val_ids)`` for a first Block-AP stage."""
    try:
        return run_pipeline(model, config, out, resume=resume, overwrite=overwrite, device=device, tokenizer=tokenizer, calib=calib,
                            save_dtype=save_dtype, progress=progress, cache_dir=cache_dir, accelerator=accelerator,
                            log_path=log_path)
    except QatlmError:
        raise
    except Exception as e:  # nobody foresaw it: a QatlmError naming it, the whole traceback in a file (and chained)
        raise QatlmError(crash_report("quantize", "qatlm.quantize")) from e
