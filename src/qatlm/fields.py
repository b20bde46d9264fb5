"""Config fields that carry their own help text, and the checks every config shares.

A method's config is a dataclass whose fields are declared with ``opt(default, "help", ...)``. The metadata
is what the command line is generated from (``qatlm/options.py``) and what ``check_choices`` validates: a
field with ``choices`` refuses any other value in one line, once, for every config. This module depends on
nothing else of qatlm but its error type, so the quantization math (``quant/``) can declare its grid with it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, field

from qatlm.errors import QatlmError


def opt(default, help: str, **meta):
    """A config field with its help text and optional metadata: ``flag`` (the exact command-line spelling),
    ``choices`` (with ``what``, the words that name the field in an error), ``as_bool`` (an int 0/1 field set by an on/off flag), ``default_help``, ``cli=False``."""
    if isinstance(default, type):  # a nested config: a fresh default instance each time
        return field(default_factory=default, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def field_default(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def flag_name(f: dataclasses.Field, prefix: str = "") -> str:
    """How the command line spells a field (``--block-loss``, ``--e2e-samples``)."""
    return "--" + (f.metadata["flag"] if "flag" in f.metadata else prefix + f.name.replace("_", "-"))


def check_choices(config) -> None:
    """Every field of ``config`` that declares ``choices`` holds one of them (one line naming the flag otherwise)."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices is not None and value not in choices:
            what = f.metadata.get("what", f.name.replace("_", " "))
            raise QatlmError(f"unknown {what} '{value}': {what} must be one of {', '.join(map(str, choices))} ({flag_name(f)})")


def nested_type(cls, f: dataclasses.Field):
    """The dataclass a field of ``cls`` holds (``grid: QuantSpec``), or None: read from the class's resolved type
    hints, so any nested config works, whatever its name."""
    t = typing.get_type_hints(cls).get(f.name)
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def build(cls, values: dict, base=None):
    """``cls(**values)``, nested configs built from their sub-dicts (over ``base``'s values where given)."""
    known = {f.name for f in dataclasses.fields(cls) if f.init} | set(getattr(cls, "shortcut_fields", ()))
    unknown = sorted(set(values) - known)
    if unknown:
        raise QatlmError(f"{cls.__name__} has no field '{unknown[0]}'; its fields: {', '.join(sorted(known))}")
    kw = {}
    for f in dataclasses.fields(cls):
        t = nested_type(cls, f)
        if f.name in values and t is not None and isinstance(values[f.name], dict):
            start = getattr(base, f.name) if base is not None else field_default(f)
            kw[f.name] = dataclasses.replace(start, **values[f.name])
        elif f.name in values:
            kw[f.name] = values[f.name]
        elif base is not None:
            kw[f.name] = getattr(base, f.name)
    return cls(**kw)
