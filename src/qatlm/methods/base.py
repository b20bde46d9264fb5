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

from qatlm.errors import QatlmError
from qatlm.fields import check_choices, field_default
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


class GridConfig:
    """Base of the configs that put a float model on a grid (RTN, Block-AP): a dataclass declared with
    ``@dataclass(init=False)`` whose ``grid`` field is a ``QuantSpec``. Its constructor also takes the grid's own
    keywords or leading positional integers: ``RTNConfig(4, 128)`` = ``RTNConfig(bits=4, group_size=128)`` =
    ``RTNConfig(grid=QuantSpec(4, 128))``; ``v1_zeros=True`` is ``zero_min=1``. ``.spec``, ``.bits``,
    ``.group_size``, ``.sym`` read the grid."""

    shortcut_fields = GRID_KEYS  # taken by the constructor besides the dataclass fields

    def __init__(self, *args, **kw):
        args = list(args)
        given = {}
        for key in GRID_KEYS:
            if args and not isinstance(args[0], QuantSpec) and key != "v1_zeros":
                given[key] = args.pop(0)
            elif key in kw:
                given[key] = kw.pop(key)
        if "v1_zeros" in given:
            given["zero_min"] = int(bool(given.pop("v1_zeros")))
        base = kw.pop("grid", None) or (args.pop(0) if args else None) or QuantSpec()
        kw["grid"] = dataclasses.replace(base, **given) if given else base
        fields = [f for f in dataclasses.fields(self) if f.init]
        if len(args) > len(fields) - 1:
            raise QatlmError(f"{type(self).__name__} takes at most {len(fields) - 1} positional values after the grid")
        kw.update(zip([f.name for f in fields if f.name != "grid"], args))
        unknown = set(kw) - {f.name for f in fields}
        if unknown:
            raise QatlmError(f"{type(self).__name__} has no field '{sorted(unknown)[0]}'; its fields: "
                             f"{', '.join(f.name for f in fields)}")
        for f in fields:
            setattr(self, f.name, kw[f.name] if f.name in kw else field_default(f))
        self.__post_init__()

    def __post_init__(self):
        check_choices(self)

    @property
    def spec(self) -> QuantSpec:
        """The grid (QuantSpec)."""
        return self.grid

    @property
    def bits(self) -> int:
        return self.grid.bits

    @property
    def group_size(self) -> int:
        return self.grid.group_size

    @property
    def sym(self) -> bool:
        return self.grid.sym

    @property
    def v1_zeros(self) -> bool:
        return self.grid.zero_min == 1
