"""Config dataclasses -> command-line flags, and back.

Every field of a method's config carries its help text (``opt(default, "help")``); the CLI is generated
from the fields, so a new field is a new flag with no parser code, and a flag is refused for a method
whose configs do not have it. A field's metadata may also give its exact ``flag`` (taken as is, without
the stage's prefix; e.g. ``--block-loss``), ``choices``, ``as_bool`` (an int 0/1 field set by an on/off
flag), or ``cli=False`` to keep it off the command line. A field holding a nested config (the grid,
``QuantSpec``) contributes the flags of its own fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, field

from qatlm.errors import QatlmError


def opt(default, help: str, **meta):
    """A config field with its help text (and optional CLI metadata: flag, choices, as_bool, cli)."""
    if isinstance(default, type):  # a nested config: a fresh default instance each time
        return field(default_factory=default, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def _base_type(annotation):
    """int / float / str / bool (or a dataclass) of an annotation such as ``float | None`` (given as a
    string under ``from __future__ import annotations``)."""
    t = eval(annotation, vars(typing), {}) if isinstance(annotation, str) else annotation
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        t = args[0] if len(args) == 1 else str
    return t


def field_default(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


@dataclasses.dataclass
class Flag:
    """One generated flag: ``path`` is the field it sets (``("grid", "bits")`` for a nested one)."""

    flag: str
    path: tuple[str, ...]
    field: dataclasses.Field

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_") + "@"  # '@': a generated flag, never an argparse default


def config_flags(cls, prefix: str = "") -> list[Flag]:
    """The flags of a config class; nested configs (``grid``) are expanded into their fields' flags."""
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or not f.metadata.get("help"):
            continue
        t = _nested_type(f)
        if t is not None:
            out += [Flag(x.flag, (f.name, *x.path), x.field) for x in config_flags(t, prefix="")]
            continue
        flag = "--" + (f.metadata["flag"] if "flag" in f.metadata else prefix + f.name.replace("_", "-"))
        out.append(Flag(flag, (f.name,), f))
    return out


def _nested_type(f):
    from qatlm.quant.grid import QuantSpec

    t = f.type
    if isinstance(t, str):
        return QuantSpec if t.split("|")[0].strip() == "QuantSpec" else None
    return t if dataclasses.is_dataclass(t) else None


def add_flags(parser, flags: list[Flag], title: str, defaults: dict | None = None, seen: set | None = None) -> None:
    """Add the flags to an argument group; a flag already on the parser (``seen``) is shared, not added
    twice (one ``--bits`` for every stage of a recipe). Defaults are suppressed: only what the user typed
    reaches the namespace. ``defaults``: overrides of the shown default by flag (e.g. the demo's budget)."""
    seen = set() if seen is None else seen
    group = None
    for fl in flags:
        if fl.flag in seen:
            continue
        seen.add(fl.flag)
        group = group or parser.add_argument_group(title)
        f = fl.field
        typ = bool if f.metadata.get("as_bool") else _base_type(f.type)
        default = (defaults or {}).get(fl.flag, field_default(f))
        if f.metadata.get("as_bool"):
            default = bool(default)
        shown = f.metadata.get("default_help") or ("automatic" if default is None else default)
        kw = {"dest": fl.dest, "default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {shown})".replace("%", "%%")}
        if typ is bool:
            group.add_argument(fl.flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        group.add_argument(fl.flag, type=typ, metavar=typ.__name__.upper(), **kw)


def typed(ns: argparse.Namespace) -> dict[str, object]:
    """The generated flags the user typed: {dest: value}."""
    return {k: v for k, v in vars(ns).items() if k.endswith("@")}


def flag_of_dest(dest: str) -> str:
    return "--" + dest.rstrip("@").replace("_", "-")


def values_for(flags: list[Flag], given: dict[str, object]) -> dict:
    """Keyword arguments for the config class of ``flags`` from the typed values (nested ones grouped)."""
    out: dict = {}
    for fl in flags:
        if fl.dest not in given:
            continue
        v = given[fl.dest]
        if fl.field.metadata.get("as_bool"):
            v = int(v)
        d = out
        for key in fl.path[:-1]:
            d = d.setdefault(key, {})
        d[fl.path[-1]] = v
    return out


def build(cls, values: dict, base=None):
    """``cls(**values)``, nested configs built from their sub-dicts (over ``base``'s values where given)."""
    kw = {}
    for f in dataclasses.fields(cls):
        t = _nested_type(f)
        if f.name in values and t is not None and isinstance(values[f.name], dict):
            start = getattr(base, f.name) if base is not None else field_default(f)
            kw[f.name] = dataclasses.replace(start, **values[f.name])
        elif f.name in values:
            kw[f.name] = values[f.name]
        elif base is not None:
            kw[f.name] = getattr(base, f.name)
    return cls(**kw)


def refuse_extra(given: dict[str, object], used: set[str], what: str) -> None:
    extra = sorted(set(given) - used)
    if extra:
        raise QatlmError(f"{flag_of_dest(extra[0])} does not apply to {what}")
