"""Text sources and calibration samples.

A source is a built-in name (``wikipedia``, ``shakespeare``), a ``.txt`` file, a ``.jsonl`` file (a
``text`` field), a ``.parquet`` file (a ``text`` column) or a folder saved by HF ``datasets``
(``save_to_disk``; its ``.arrow`` files are read with pyarrow). Token ids of a whole source are
cached per (tokenizer, source content) as ``.npy`` files (never pickled).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from qatlm.errors import QatlmError


def _text_column(table, where: str) -> list[str]:
    names = table.column_names
    col = "text" if "text" in names else next((n for n in names if str(table.schema.field(n).type) in ("string", "large_string")), None)
    if col is None:
        raise QatlmError(f"{where} has no text column (columns: {', '.join(names)})")
    return [t for t in table.column(col).to_pylist() if t]


def resolve_source(source, cache_dir=None) -> Path:
    from qatlm.data.assets import BUILTIN_TEXT

    if str(source) in BUILTIN_TEXT:
        return BUILTIN_TEXT[str(source)](cache_dir)
    p = Path(source).expanduser()
    if not p.exists():
        raise QatlmError(f"text source {source} does not exist (built-in sources: {', '.join(BUILTIN_TEXT)})")
    return p


def read_utf8(p: Path) -> str:
    """A text file's content; a binary or non-UTF-8 file is refused (never decoded into replacement characters)."""
    if p.is_dir():
        raise QatlmError(f"{p} is a folder, not a text file")
    data = p.read_bytes()
    if b"\x00" in data[:65536]:
        raise QatlmError(f"{p} looks binary (NUL bytes), not UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QatlmError(f"{p} is not UTF-8 text (invalid byte at offset {e.start})") from None


def read_text(source, cache_dir=None) -> str:
    """The whole text of a source, documents separated by blank lines."""
    p = resolve_source(source, cache_dir)
    if p.is_dir():
        import pyarrow.ipc as ipc

        files = sorted(p.rglob("*.arrow"))
        if not files:
            raise QatlmError(f"{p} is not a saved HF dataset folder (no .arrow files)")
        docs = []
        for f in files:
            with open(f, "rb") as fh:
                docs += _text_column(ipc.open_stream(fh).read_all(), str(f))
        text = "\n\n".join(docs)
    elif p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(read_utf8(p).splitlines()):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise QatlmError(f"{p}:{i + 1}: not a JSON record ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise QatlmError(f"{p}:{i + 1}: every jsonl record needs a 'text' string field "
                                     "(or, for instruction tuning, 'instruction' and 'output' fields, or 'messages')")
                docs.append(rec["text"])
        text = "\n\n".join(docs)
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise QatlmError(f"{p}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        text = "\n\n".join(_text_column(table, str(p)))
    else:
        text = read_utf8(p)
    if not text.strip():
        raise QatlmError(f"text source {source} is empty")
    return text


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def token_ids(tokenizer, source, cache_dir=None) -> torch.Tensor:
    """All token ids of ``source`` (tokenized once as one document, as in the GPTQ protocol), cached."""
    from qatlm.data.assets import cache_root

    text = read_text(source, cache_dir)
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16] + "-" + tokenizer_fingerprint(tokenizer)
    path = cache_root(cache_dir) / "tokens" / f"{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
    ids = tokenizer(text, return_attention_mask=False, add_special_tokens=False)["input_ids"]
    if not ids:
        raise QatlmError(f"text source {source} gave no tokens")
    arr = np.asarray(ids, dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".partial-{os.getpid()}.npy")
    np.save(tmp, arr, allow_pickle=False)
    os.replace(tmp, path)
    return torch.from_numpy(arr.astype(np.int64))


def bos_token(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of every text it encodes (so the model was trained
    with it, e.g. Llama-2/3, Gemma), else None (e.g. SmolLM2, Qwen). Read from the tokenizer's own behaviour."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def cut_windows(ids: torch.Tensor, seqlen: int, bos: int | None = None, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` of a token stream. With ``bos`` every window starts with it
    (as lm-eval feeds such models) followed by ``seqlen − 1`` stream tokens; either way a window predicts
    ``seqlen − 1`` tokens of the text."""
    ids = ids.flatten()
    step = seqlen - (bos is not None)
    n = ids.numel() // step if step > 0 else 0
    if max_windows:
        n = min(n, max_windows)
    chunks = ids[: n * step].view(n, step)
    if bos is not None:
        chunks = torch.cat([torch.full((n, 1), bos, dtype=chunks.dtype), chunks], dim=1)
    return chunks


def calibration_samples(tokenizer, source="wikipedia", n: int = 128, seqlen: int = 512, seed: int = 0, n_val: int = 0, cache_dir=None):
    """``n`` training and ``n_val`` validation samples of ``seqlen`` tokens, reproducible by ``seed``.

    The token stream is cut into non-overlapping windows (each led by BOS where the tokenizer adds one);
    a seeded permutation picks the training windows first and the validation windows after them, so the
    two never share a token.
    """
    if n < 1 or seqlen < 2:
        raise QatlmError(f"need at least one calibration sample of 2+ tokens (got n={n}, seqlen={seqlen})")
    ids = token_ids(tokenizer, source, cache_dir)
    chunks = cut_windows(ids, seqlen, bos_token(tokenizer))
    windows = len(chunks)
    if windows < n + n_val:
        raise QatlmError(f"text source {source} has {ids.numel():,} tokens: only {windows} windows of {seqlen}, asked for {n} + {n_val}")
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))
    return chunks[order[:n]].clone(), chunks[order[n : n + n_val]].clone()
