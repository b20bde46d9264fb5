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

from qatlm.errors import QatlmError
from qatlm.fields import field_default, flag_name, nested_type


def _base_type(annotation):
    """int / float / str / bool (or a dataclass) of an annotation such as ``float | None`` (given as a
    string under ``from __future__ import annotations``)."""
    t = eval(annotation, vars(typing), {}) if isinstance(annotation, str) else annotation
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        t = args[0] if len(args) == 1 else str
    return t


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
        t = nested_type(cls, f)
        if t is not None:
            out += [Flag(x.flag, (f.name, *x.path), x.field) for x in config_flags(t, prefix="")]
            continue
        out.append(Flag(flag_name(f, prefix), (f.name,), f))
    return out


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


def refuse_extra(given: dict[str, object], used: set[str], what: str) -> None:
    extra = sorted(set(given) - used)
    if extra:
        raise QatlmError(f"{flag_of_dest(extra[0])} does not apply to {what}")


# --- recipes on the command line -------------------------------------------------------------------------------


def stage_prefix(cls, command: str) -> str:
    """In ``quantize`` (and the demo) the end-to-end stage's fields are ``--e2e-*``; in ``train`` it is the only stage
    and its flags carry no prefix."""
    from qatlm.recipes import is_quantizer_cls

    return "" if command == "train" or is_quantizer_cls(cls) else "e2e-"


def _group_title(cls, command: str, shared: bool) -> str:
    from qatlm.recipes import STAGES

    if shared:
        return ("end-to-end training (e2e-qp and dl-qat)" if command == "train" else
                "the end-to-end stage of efficientqat, dl-qat and efficientqat+dl-qat (--e2e-*)")
    name = STAGES[cls][0]
    return f"{name} only" if name in ("e2e-qp", "dl-qat") else name


def add_recipe_flags(parser, command: str, defaults: dict | None = None) -> None:
    """Every flag of every stage config a recipe of ``command`` may use, generated from the dataclass fields: the
    grid's, then each stage's; the end-to-end loop's shared fields in one group."""
    from qatlm.methods.end_to_end import EndToEndConfig
    from qatlm.recipes import RECIPES, TRAINERS

    classes = list(TRAINERS.values()) if command == "train" else list(dict.fromkeys(c for cs in RECIPES.values() for c in cs))
    shared = {f.name for f in dataclasses.fields(EndToEndConfig)}
    seen: set = set()
    for cls in classes:
        flags = config_flags(cls, stage_prefix(cls, command))
        grid = [f for f in flags if f.path[0] == "grid"]
        if grid:
            add_flags(parser, grid, "grid", defaults, seen)
        own = [f for f in flags if f.path[0] != "grid"]
        common = issubclass(cls, EndToEndConfig)
        if common:
            add_flags(parser, [f for f in own if f.path[0] in shared], _group_title(cls, command, True), defaults, seen)
        add_flags(parser, [f for f in own if not (common and f.path[0] in shared)], _group_title(cls, command, False), defaults, seen)


# a recipe with no calibrated stage (dl-qat: RTN, then DL-QAT) reads the calibration flags as its training stage's
TRAIN_STAGE_SPELLINGS = {"calib": "data", "calib_samples": "samples", "calib_seqlen": "seqlen", "val_samples": "val_samples",
                         "seed": "seed", "epochs": "epochs", "batch_size": "batch_size"}


def recipe_from_args(ns: argparse.Namespace, command: str, preset: dict | None = None) -> list:
    """The stage configs of ``ns.method`` from the flags the user typed; a typed flag that no stage of the recipe
    takes is refused in one line (never silently dropped). ``preset``: values by flag dest applied when not typed."""
    from qatlm.recipes import RECIPES, TRAINERS, build_recipe, is_quantizer_cls

    given = typed(ns)
    all_given = {**(preset or {}), **given}
    table = TRAINERS if command == "train" else RECIPES
    if ns.method not in table:
        what = "training method" if command == "train" else "method"
        raise QatlmError(f"unknown {what} '{ns.method}'; choose {' or '.join(table) if command == 'train' else 'one of ' + ', '.join(table)}")
    classes = [table[ns.method]] if command == "train" else table[ns.method]
    values, given_sets, used = [], [], set()
    for cls in classes:
        flags = config_flags(cls, stage_prefix(cls, command))
        values.append(values_for(flags, all_given))
        given_sets.append(set(values[-1]))  # a preset (the demo's budget) counts as chosen
        used |= {f.dest for f in flags}
    if command != "train" and len(classes) > 1 and not any(hasattr(c, "calib") for c in classes if is_quantizer_cls(c)):
        for old, name in TRAIN_STAGE_SPELLINGS.items():
            dest = f"{old}@"
            if dest in all_given and dest not in used:
                values[-1].setdefault(name, all_given[dest])
                if dest in given:
                    given_sets[-1].add(name)
                used.add(dest)
    refuse_extra(given, used, f"--method {ns.method}")
    try:
        if command == "train":
            from qatlm.fields import build

            return [build(classes[0], values[0])]
        return build_recipe(ns.method, values, given_sets)
    except QatlmError as e:  # a config names its field's plain flag; on this command line it may carry the stage's prefix
        raise QatlmError(_as_typed(str(e), classes, command)) from None


def _as_typed(message: str, classes, command: str) -> str:
    """``--lr must be > 0`` said of the end-to-end stage of ``quantize`` is ``--e2e-lr must be > 0``."""
    for cls in classes:
        prefix = stage_prefix(cls, command)
        for f in dataclasses.fields(cls) if prefix else ():
            plain, typed_flag = flag_name(f), flag_name(f, prefix)
            if plain != typed_flag and message.startswith(plain + " "):
                return typed_flag + message[len(plain):]
    return message
