"""Recipes: lists of stages, each a method config run by its method's ``run(model, config, data, context)``.

    efficientqat         = [BlockAPConfig, E2EQPConfig]
    efficientqat+dl-qat  = [BlockAPConfig, DLQATConfig]
    dl-qat               = [RTNConfig (grid left on the float weights), DLQATConfig]

Every stage has its own full config; nothing is copied between stages by hand. The one rule that joins
them is declared here (``INHERIT``): an end-to-end stage that follows a calibrated stage reads the same
text, sample count, window length, validation count and seed, unless its own value is given.
"""

from __future__ import annotations

import dataclasses

from qatlm.errors import QatlmError
from qatlm.fields import build
from qatlm.methods import block_ap, dl_qat, e2e_qp, rtn
from qatlm.methods.base import Context
from qatlm.methods.block_ap import BlockAPConfig
from qatlm.methods.dl_qat import DLQATConfig
from qatlm.methods.e2e_qp import E2EQPConfig
from qatlm.methods.rtn import RTNConfig
from qatlm.quant.grid import QuantSpec
from qatlm.summary import RunSummary

# config class -> (method name, run function)
STAGES = {
    RTNConfig: ("rtn", rtn.run),
    BlockAPConfig: ("block-ap", block_ap.run),
    E2EQPConfig: ("e2e-qp", e2e_qp.run),
    DLQATConfig: ("dl-qat", dl_qat.run),
}

# recipe name -> its stage classes (what ``qatlm quantize --method NAME`` runs on a float model)
RECIPES: dict[str, list[type]] = {
    "rtn": [RTNConfig],
    "block-ap": [BlockAPConfig],
    "efficientqat": [BlockAPConfig, E2EQPConfig],
    "dl-qat": [RTNConfig, DLQATConfig],
    "efficientqat+dl-qat": [BlockAPConfig, DLQATConfig],
}
# training a packed checkpoint (``qatlm train --method NAME``)
TRAINERS: dict[str, type] = {"e2e-qp": E2EQPConfig, "dl-qat": DLQATConfig}

# end-to-end field <- the field of the calibrated stage before it that it follows unless given
INHERIT = {"data": "calib", "samples": "calib_samples", "seqlen": "calib_seqlen", "val_samples": "val_samples", "seed": "seed"}


def method_name(config) -> str:
    if type(config) in STAGES:
        return STAGES[type(config)][0]
    raise QatlmError(f"unknown method config {type(config).__name__}; known: {', '.join(c.__name__ for c in STAGES)}")


def is_quantizer(config) -> bool:
    """A stage that puts a float model on the grid (RTN, Block-AP), as opposed to one that trains a quantized one."""
    return is_quantizer_cls(type(config))


def recipe_name(stages: list) -> str:
    """The recipe a list of stages is (``efficientqat`` ...), else the stage names joined by '+'."""
    classes = [type(s) for s in stages]
    for name, cls in RECIPES.items():
        if cls == classes:
            return name
    return "+".join(method_name(s) for s in stages)


def build_recipe(name: str, values: list[dict] | None = None, given: list[set] | None = None) -> list:
    """The stage configs of recipe ``name``. ``values[i]``: keyword arguments of stage i (nested grid values as a
    dict); ``given[i]``: which of them the user set (for ``INHERIT``; default: all of them)."""
    if name not in RECIPES:
        raise QatlmError(f"unknown method '{name}'; choose one of {', '.join(RECIPES)}")
    classes = RECIPES[name]
    values = values or [{} for _ in classes]
    given = given if given is not None else [set(v) for v in values]
    stages = []
    for i, cls in enumerate(classes):
        kw = dict(values[i])
        if i and not is_quantizer_cls(cls):
            prev = stages[-1]
            for mine, theirs in INHERIT.items():
                if mine not in given[i] and hasattr(prev, theirs) and theirs in given[i - 1]:
                    kw[mine] = getattr(prev, theirs)
        if i and classes[i - 1] is RTNConfig and getattr(cls, "takes_float_base", False):
            stages[-1] = dataclasses.replace(stages[-1], pack=False)  # the next stage trains from the float weights
        stages.append(build(cls, kw))
    check_grid_stages(stages)
    return stages


def check_grid_stages(stages: list) -> None:
    """Stages that cannot work on the recipe's grid are refused before anything is loaded."""
    grid = grid_of(stages)
    if grid is not None and grid.kformat is not None:
        for s in stages:
            if not is_quantizer(s):
                raise QatlmError(f"{method_name(s)} trains uniform grids only, not --grid {'k' if grid.mixed else grid.format}: "
                                 "use --method block-ap or rtn")


def is_quantizer_cls(cls) -> bool:
    return any(f.name == "grid" for f in dataclasses.fields(cls))


def grid_of(stages: list) -> QuantSpec | None:
    return next((s.grid for s in stages if is_quantizer(s)), None)


def check_stages(stages: list, model_is_quantized: bool) -> None:
    """A quantizer needs a float model; a trainer needs one on the grid (packed, or a quantizer before it)."""
    if not stages:
        raise QatlmError("a recipe needs at least one stage")
    quantized = model_is_quantized
    for s in stages:
        method_name(s)  # refuses an unknown config
        if is_quantizer(s) and quantized:
            raise QatlmError(f"{method_name(s)} quantizes a float model, but the model is already quantized")
        if not is_quantizer(s) and not quantized:
            raise QatlmError(f"{method_name(s)} trains a quantized model: start from a packed checkpoint or put rtn / block-ap before it")
        quantized = True
    check_grid_stages(stages)


def run_recipe(model, stages: list, data=None, context: Context | None = None) -> RunSummary:
    """Run the stages in order on ``model`` (in place). ``data``: pre-tokenized samples for the first stage.
    Each stage after the first works in its own subfolder of the work folder (``stage-1-e2e-qp``...), so an
    interrupted recipe resumes inside the stage it was in. Returns every stage's summary under its method name,
    ``method`` = the recipe and ``stages`` = the stage names in order."""
    from qatlm.model.arch import defuse_experts

    context = context or Context()
    defuse_experts(model)  # an in-memory MoE model: one linear layer per expert (the loaders do this already)
    summary = RunSummary(method=recipe_name(stages), stages=[])
    grid = grid_of(stages)
    if grid is not None and grid.target_bpw is not None and not grid.layers:  # mixed precision: each layer's grid first
        from qatlm.methods.mixed import plan, sensitivity_ids

        ids = sensitivity_ids(stages[0], data, context.tokenizer, context.cache_dir)
        resolved, summary.mixed = plan(model, grid, ids, context.device, context.work_dir, context.resume, context.progress)
        stages = [dataclasses.replace(s, grid=resolved) if is_quantizer(s) else s for s in stages]
    for i, stage in enumerate(stages):
        name, fn = STAGES[type(stage)]
        ctx = context if i == 0 else context.sub(f"stage-{i}-{name}")
        setattr(summary, name.replace("-", "_"), fn(model, stage, data if i == 0 else None, ctx))
        summary.stages.append(name)
    return summary
