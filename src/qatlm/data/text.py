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
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from qatlm.errors import QatlmError
from qatlm.io import atomic_file


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
    from qatlm.data.hub import dataset_text_file, is_dataset_name

    if is_dataset_name(str(source)):  # a Hugging Face datasets id, or one of the papers' presets
        return dataset_text_file(str(source), cache_dir)
    p = Path(source).expanduser()
    if not p.exists():
        raise QatlmError(f"text source {source} does not exist (built-in sources: {', '.join(BUILTIN_TEXT)}; a dataset: "
                         "NAME:CONFIG:SPLIT, or wikitext2 / c4)")
    if not p.is_dir() and not p.is_file():  # a FIFO or a device would be read forever
        raise QatlmError(f"text source {source} is not a regular file")
    return p


PIECE_BYTES = 1 << 20  # text is read, and large sources tokenized, in pieces of about this size
WHOLE_TEXT_LIMIT = 64 << 20  # sources up to this size are tokenized as one document (GPTQ protocol); larger ones stream


def read_utf8(p: Path) -> str:
    """A text file's content; a binary or non-UTF-8 file is refused (never decoded into replacement characters)."""
    return "".join(_file_pieces(p))


def _file_pieces(p: Path) -> Iterator[str]:
    """The file's text in pieces of about ``PIECE_BYTES``, each ending at a line end (at a blank line where one is
    near), so a piece never splits a UTF-8 character; the pieces joined are the whole file."""
    if p.is_dir():
        raise QatlmError(f"{p} is a folder, not a text file")
    offset, carry = 0, b""
    with open(p, "rb") as f:
        head = f.read(65536)
        if b"\x00" in head:
            raise QatlmError(f"{p} looks binary (NUL bytes), not UTF-8 text")
        f.seek(0)
        while True:
            block = f.read(PIECE_BYTES)
            data = carry + block
            if not data:
                return
            if block:
                cut = data.rfind(b"\n\n", len(data) // 2)
                cut = data.rfind(b"\n") if cut < 0 else cut + 1
                cut = cut + 1 if cut >= 0 else 0
                data, carry = data[:cut], data[cut:]
                if not data:
                    continue
            else:
                carry = b""
            try:
                yield data.decode("utf-8-sig" if offset == 0 else "utf-8")
            except UnicodeDecodeError as e:
                raise QatlmError(f"{p} is not UTF-8 text (invalid byte at offset {offset + e.start})") from None
            offset += len(data)
            if not block:
                return


def _documents(p: Path) -> Iterator[str]:
    """The documents of a .jsonl file, a .parquet file or a saved HF dataset folder, one at a time."""
    if p.is_dir():
        import pyarrow.ipc as ipc

        files = sorted(p.rglob("*.arrow"))
        if not files:
            raise QatlmError(f"{p} is not a saved HF dataset folder (no .arrow files)")
        for f in files:
            with open(f, "rb") as fh:
                for batch in ipc.open_stream(fh):
                    yield from _text_column(batch, str(f))
    elif p.suffix == ".jsonl":
        with open(p, "rb") as fh:
            if b"\x00" in fh.read(65536):
                raise QatlmError(f"{p} looks binary (NUL bytes), not UTF-8 text")
            fh.seek(0)
            for i, raw in enumerate(fh):
                try:
                    line = raw.decode("utf-8-sig" if i == 0 else "utf-8")  # (a byte-order mark some editors write)
                except UnicodeDecodeError:
                    raise QatlmError(f"{p}:{i + 1}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise QatlmError(f"{p}:{i + 1}: not a JSON record ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise QatlmError(f"{p}:{i + 1}: every jsonl record needs a 'text' string field "
                                     "(or, for instruction tuning, 'instruction' and 'output' fields, or 'messages')")
                yield rec["text"]
    else:  # .parquet, read one row group batch at a time
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(p)
            batches = pf.iter_batches(batch_size=4096)
            for batch in batches:
                yield from _text_column(batch, str(p))
        except QatlmError:
            raise
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise QatlmError(f"{p}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def text_pieces(source, cache_dir=None) -> Iterator[str]:
    """A source's text in pieces of about ``PIECE_BYTES`` whose concatenation is ``read_text(source)``: files as
    they are, documents of .jsonl / .parquet / dataset folders separated by blank lines. Nothing is held whole."""
    p = resolve_source(source, cache_dir)
    if not p.is_dir() and p.suffix not in (".jsonl", ".parquet"):
        yield from _file_pieces(p)
        return
    buf, size, first = [], 0, True
    for doc in _documents(p):
        buf.append(doc)
        size += len(doc)
        if size >= PIECE_BYTES:
            yield ("" if first else "\n\n") + "\n\n".join(buf)
            buf, size, first = [], 0, False
    if buf:
        yield ("" if first else "\n\n") + "\n\n".join(buf)


def source_bytes(source, cache_dir=None) -> int:
    p = resolve_source(source, cache_dir)
    files = sorted(p.rglob("*.arrow")) if p.is_dir() else [p]
    return sum(f.stat().st_size for f in files)


def read_text(source, cache_dir=None) -> str:
    """The whole text of a source, documents separated by blank lines."""
    text = "".join(text_pieces(source, cache_dir))
    if not text.strip():
        raise QatlmError(f"text source {source} is empty")
    return text


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def token_stream(tokenizer, source, cache_dir=None) -> np.ndarray:
    """All token ids of ``source`` as int32, cached as ``.npy`` per (source content, tokenizer).

    Up to ``WHOLE_TEXT_LIMIT`` bytes the text is tokenized as one document (the GPTQ protocol). A larger
    source is streamed: read and tokenized piece by piece (``PIECE_BYTES``, cut at blank lines / line
    ends), ids appended to a file, and the result is returned memory-mapped, so neither the text nor
    its ids are ever whole in memory (a 10 GB corpus works; a calibration set reads only its windows).
    """
    from qatlm.data.assets import cache_root

    size = source_bytes(source, cache_dir)
    if size <= WHOLE_TEXT_LIMIT:
        text = read_text(source, cache_dir)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    else:
        h = hashlib.sha256(b"stream")
        p = resolve_source(source, cache_dir)
        for f in sorted(p.rglob("*.arrow")) if p.is_dir() else [p]:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        digest, text = h.hexdigest()[:16], None
    path = cache_root(cache_dir) / "tokens" / f"{digest}-{tokenizer_fingerprint(tokenizer)}.npy"
    if path.is_file():
        return np.load(path, mmap_mode=None if text is not None else "r", allow_pickle=False)
    if text is not None:
        arr = np.asarray(tokenizer(text, return_attention_mask=False, add_special_tokens=False)["input_ids"], dtype=np.int32)
        if not arr.size:
            raise QatlmError(f"text source {source} gave no tokens")
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        return arr
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.parent / f".{path.name}.ids-{os.getpid()}"
    count = 0
    try:
        with open(raw, "wb") as out:
            for piece in tqdm(text_pieces(source, cache_dir), desc=f"tokenizing {Path(str(source)).name}", unit="MiB",
                              total=max(1, size // PIECE_BYTES), disable=None, leave=False):
                ids = np.asarray(tokenizer(piece, return_attention_mask=False, add_special_tokens=False)["input_ids"], dtype=np.int32)
                out.write(ids.tobytes())
                count += ids.size
        if not count:
            raise QatlmError(f"text source {source} gave no tokens")
        with atomic_file(path) as tmp, open(tmp, "wb") as out, open(raw, "rb") as src:  # .npy = header + the ids, in blocks
            np.lib.format.write_array_header_1_0(out, {"descr": np.dtype(np.int32).str, "fortran_order": False, "shape": (count,)})
            while chunk := src.read(1 << 24):
                out.write(chunk)
    finally:
        raw.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def token_ids(tokenizer, source, cache_dir=None) -> torch.Tensor:
    """All token ids of ``source`` as an int64 tensor (see ``token_stream``; this one is whole in memory)."""
    return torch.from_numpy(np.asarray(token_stream(tokenizer, source, cache_dir), dtype=np.int64))


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
    ids = token_stream(tokenizer, source, cache_dir)
    bos = bos_token(tokenizer)
    step = seqlen - (bos is not None)
    windows = len(ids) // step
    if windows < n + n_val:
        raise QatlmError(f"text source {source} has {len(ids):,} tokens: only {windows} windows of {seqlen}, asked for {n} + {n_val}")
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))

    def gather(picked):  # only the chosen windows are read (the stream may be a memory-mapped file)
        rows = torch.from_numpy(np.stack([np.asarray(ids[i * step : (i + 1) * step], dtype=np.int64) for i in picked.tolist()])
                                if len(picked) else np.zeros((0, step), dtype=np.int64))
        return torch.cat([torch.full((len(rows), 1), bos, dtype=rows.dtype), rows], dim=1) if bos is not None else rows

    return gather(order[:n]), gather(order[n : n + n_val])
