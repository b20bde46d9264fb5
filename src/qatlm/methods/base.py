"""What every method shares: the run context, and configs that hold a grid.

The method protocol: each module of ``methods/`` has ``run(model, config, data, context) -> summary``.
``config`` is that method's dataclass (its fields carry their help text; the CLI is generated from them),
``data`` optional pre-tokenized samples (None: the method reads the source its config names), ``context``
where and how to run (device, work folder for resumable state, resume, progress, tokenizer, asset cache).
Recipes (``qatlm.recipes``) are lists of such configs, run one after the other on the same model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatlm.quant.grid import QuantSpec


@dataclass
class Context:
    """Where and how a method runs; never part of what it computes (a resumed run may change it)."""

    tokenizer: Any = None
    device: Any = None  # None: where the model is
    work_dir: Path | None = None  # resumable state; None: nothing written
    resume: bool = False
    progress: bool = True
    cache_dir: str | None = None  # built-in assets
    log_path: Path | None = None  # Block-AP's step log when there is no work folder
    accelerator: Any = None  # an accelerate.Accelerator for the end-to-end loop (tests, distributed runs)

    def sub(self, name: str) -> "Context":
        """The same context for a later stage, with its own work subfolder."""
        return dataclasses.replace(self, work_dir=Path(self.work_dir) / name if self.work_dir else None)


GRID_KEYS = ("bits", "group_size", "sym", "v1_zeros")


def with_grid(cls):
    """A config whose ``grid`` field is a ``QuantSpec``, also built from the grid's own keywords or leading
    positional integers, as in ``RTNConfig(4, 128)`` = ``RTNConfig(bits=4, group_size=128)`` =
    ``RTNConfig(grid=QuantSpec(4, 128))``; ``v1_zeros=True`` is ``zero_min=1``. ``.spec``, ``.bits``,
    ``.group_size``, ``.sym`` read the grid."""
    init = cls.__init__

    def __init__(self, *args, **kw):
        args = list(args)
        given = {}
        for key in GRID_KEYS:
            if args and not isinstance(args[0], QuantSpec) and key != "v1_zeros":
                given[key] = args.pop(0)
            elif key in kw:
                given[key] = kw.pop(key)
        if given:
            if "v1_zeros" in given:
                given["zero_min"] = int(bool(given.pop("v1_zeros")))
            base = kw.pop("grid", None) or (args.pop(0) if args else QuantSpec())
            kw["grid"] = dataclasses.replace(base, **given)
        init(self, *args, **kw)

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    cls.spec = property(lambda self: self.grid, doc="the grid (QuantSpec)")
    for key in ("bits", "group_size", "sym"):
        setattr(cls, key, property(lambda self, key=key: getattr(self.grid, key)))
    cls.v1_zeros = property(lambda self: self.grid.zero_min == 1)
    return cls
