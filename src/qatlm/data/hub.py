"""Text named by a Hugging Face datasets id: ``NAME[:CONFIG[:SPLIT[:FIELD]]]``, e.g. ``wikitext:wikitext-2-raw-v1:test``
or ``allenai/c4:en:validation``, and the papers' presets (``wikitext2``, ``c4`` for held-out perplexity at their 2048-token
context; ``wikitext2-train``, ``c4-train`` for calibration or training).

The split is streamed (``datasets.load_dataset(..., streaming=True)``: nothing else of the dataset is downloaded) until
``MAX_BYTES`` of text are read, and that text is kept once as a file in the asset cache; from there it is a text source
like any other (tokenized, cached, windowed). The text field is ``FIELD``, else ``text``, else the only string field.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from qatlm.errors import QatlmError

# preset -> (dataset, config, split, field, the context length the papers evaluate it at)
PRESETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text", 2048),
    "wikitext2-train": ("wikitext", "wikitext-2-raw-v1", "train", "text", 2048),
    "c4": ("allenai/c4", "en", "validation", "text", 2048),
    "c4-train": ("allenai/c4", "en", "train", "text", 2048),
}
MAX_BYTES = int(os.environ.get("QATLM_DATASET_MAX_BYTES", 64 << 20))  # text read from a streamed split, at most


def is_dataset_name(source: str) -> bool:
    return source in PRESETS or (":" in source and not Path(source).expanduser().exists())


def parse(source: str) -> tuple[str, str | None, str, str | None]:
    """(dataset, config, split, field) of a preset or of ``NAME[:CONFIG[:SPLIT[:FIELD]]]`` (split default: train)."""
    if source in PRESETS:
        return PRESETS[source][:4]
    parts = source.split(":")
    if len(parts) > 4 or not parts[0]:
        raise QatlmError(f"dataset {source!r}: write it NAME[:CONFIG[:SPLIT[:FIELD]]], e.g. wikitext:wikitext-2-raw-v1:test")
    name, config, split, field = (parts + [""] * 4)[:4]
    return name, config or None, split or "train", field or None


def context_length(source: str) -> int | None:
    """The context length a preset is evaluated at (None for anything else)."""
    return PRESETS[source][4] if source in PRESETS else None


def _text_field(record: dict, field: str | None, source: str) -> str:
    if field is not None:
        if field not in record:
            raise QatlmError(f"dataset {source} has no field '{field}' (its fields: {', '.join(record)})")
        return field
    if isinstance(record.get("text"), str):
        return "text"
    strings = [k for k, v in record.items() if isinstance(v, str)]
    if len(strings) != 1:
        raise QatlmError(f"dataset {source}: which field holds the text? name it as NAME:CONFIG:SPLIT:FIELD "
                         f"(string fields: {', '.join(strings) or 'none'})")
    return strings[0]


def dataset_text_file(source: str, cache_dir=None) -> Path:
    """The text of a dataset split (at most ``MAX_BYTES``), as a file in the asset cache, read once."""
    from qatlm.data.assets import cache_root
    from qatlm.io import atomic_write_text

    name, config, split, field = parse(source)
    key = hashlib.sha256(f"{name}|{config}|{split}|{field}|{MAX_BYTES}".encode()).hexdigest()[:12]
    path = cache_root(cache_dir) / "datasets" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', f'{name}-{config}-{split}')}-{key}.txt"
    if path.is_file():
        return path
    docs, size = [], 0
    for rec in _stream(source, name, config, split):
        field = field or _text_field(rec, None, source)
        text = rec.get(field) if field in rec else _text_field(rec, field, source)
        if isinstance(text, str) and text.strip():
            docs.append(text.strip("\n"))
            size += len(text)
            if size >= MAX_BYTES:
                break
    if not docs:
        raise QatlmError(f"dataset {source} holds no text in its {split} split")
    atomic_write_text(path, "\n\n".join(docs) + "\n")
    return path


def _stream(source: str, name: str, config: str | None, split: str):
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        yield from ds
    except QatlmError:
        raise
    except (ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "split" in msg.lower():
            raise QatlmError(f"dataset {name}{':' + config if config else ''} has no split '{split}' ({msg[:160]})") from None
        raise QatlmError(f"dataset {source} cannot be read ({msg[:200]})") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a missing / unreachable dataset
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        offline = " (offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") or \
            os.environ.get("HF_DATASETS_OFFLINE") else ""
        raise QatlmError(f"dataset {name} could not be loaded{offline}: {type(e).__name__}: {msg[:200]}") from None
