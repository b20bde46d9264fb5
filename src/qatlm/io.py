"""qatlm's io: every file and folder it writes, and how it never destroys or mixes a user's data.

- ``check_output``: an output that is, contains or lies inside an input is refused before any work, and so
  is an output whose place cannot be written.
- ``atomic_dir``: a folder appears only complete. It is built in ``.<name>.partial-<pid>`` beside the final
  place; an existing folder is renamed aside (``.<name>.old-<pid>``), the new one renamed in, and only then
  the old one deleted. A run killed in between leaves the old folder aside, and the next run that touches
  the same output puts it back (or, if the new one made it in, deletes it) and removes partial folders of
  dead processes: the output is always the complete old one or the complete new one.
- ``atomic_file`` / ``atomic_write_text`` / ``atomic_write_json``: a file appears only complete (written beside,
  renamed in).
- ``write_shards``: the HF folder's weights, safetensors shards of a bounded size (+ index), streamed one shard
  at a time.
- ``output_lock``: one run at a time per output (a lock file holding the owner's pid; a dead owner's lock is
  taken over).
- ``source_fingerprint`` / ``claim_work_dir``: a resumed run must continue from the same source model.
- ``resume_point``: the one resume rule of every training method (Block-AP's finished blocks, the end-to-end
  loop's checkpoints): an unfinished run is continued only with ``resume``, and only with the same settings; a
  damaged state file is named (``DamagedWorkFolder``) and its folder kept, never deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable

from qatlm.errors import QatlmError


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def tidy_output(final: Path) -> None:
    """Finish or undo what a killed run left beside ``final``: stale partial folders go, a folder renamed
    aside comes back if nothing replaced it (else it goes)."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for p in final.parent.glob(f".{final.name}.partial-*"):
        if not _pid_alive(_owner(p)):
            shutil.rmtree(p, ignore_errors=True)
    for p in final.parent.glob(f".{final.name}.old-*"):
        if _pid_alive(_owner(p)):
            continue
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.replace(p, final)


def atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in ``.<name>.partial-<pid>`` beside ``final``; replace ``final`` only on success,
    never leaving a moment where a kill loses both the old and the new folder."""
    final = Path(final)
    tidy_output(final)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_file_mode(path: Path) -> None:
    """Give a file the permissions an ordinary new file gets (0666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary name beside ``path`` to write; on success it replaces ``path`` in one rename (readers see
    the old or the new file, never a part), on failure it is removed. Every file qatlm writes goes through here
    (folders: ``atomic_dir``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def resume_point(state_file: Path, fingerprint: str, resume: bool, where: str) -> dict | None:
    """The saved state of an unfinished run (``state_file``: JSON holding at least ``fingerprint``), or None when
    there is none. Without ``resume`` an unfinished run is refused (it would be overwritten silently); with
    it, a state saved under other settings (another fingerprint) is refused. ``where`` names the progress."""
    state_file = Path(state_file)
    if not state_file.is_file():
        return None
    work = state_file.parent if state_file.name == "progress.json" else state_file.parent.parent
    state = read_state(state_file)
    if state is None:
        raise DamagedWorkFolder(f"{work} is damaged: {state_file.name} is empty or unreadable. It is kept as it is: "
                                "pass --resume to recover what verifies, or --overwrite to start over")
    if not resume:
        raise QatlmError(f"{work} holds an unfinished run ({where(state) if callable(where) else where}): pass --resume to "
                         "continue it, or --overwrite to start over")
    if state.get("fingerprint") != fingerprint:
        raise QatlmError(f"cannot resume from {work}: it was started with other settings or data")
    return state


class DamagedWorkFolder(QatlmError):
    """A work folder whose state file cannot be read: never deleted, and recovered where the method can verify."""


def read_state(f: Path) -> dict | None:
    """A JSON state file as a dict; None when it is empty, cut or not a JSON object (a damaged file)."""
    try:
        state = json.loads(Path(f).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def write_shards(items, folder: Path, shard_bytes: int):
    """Write ``(name, tensor)`` pairs as safetensors shards of at most ``shard_bytes`` (one ``model.safetensors``
    when they fit, else ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``), holding one
    shard in memory at a time (``items`` may be a generator reading tensors from disk)."""
    from safetensors.torch import save_file

    parts, cur, size, total, weight_map = [], {}, 0, 0, {}

    def flush():
        name = folder / f".shard-{len(parts):05d}.safetensors"
        save_file(cur, name, metadata={"format": "pt"})
        default_file_mode(name)  # safetensors writes 0600; the other files of the folder follow the umask
        parts.append((name, list(cur)))

    for k, v in items:
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > shard_bytes:
            flush()
            cur, size = {}, 0
        cur[k] = v
        size += nbytes
        total += nbytes
    flush()
    if len(parts) == 1:
        parts[0][0].rename(folder / "model.safetensors")
        return
    for i, (tmp, keys) in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        tmp.rename(folder / name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def check_output(out, inputs=(), overwrite: bool = False, what: str = "output folder") -> Path:
    """Refuse, in one line and before any work, an output that would destroy an input or cannot be written."""
    if not str(out).strip():  # Path("") is the current folder: never an output by accident
        raise QatlmError(f"the {what} name is empty (--out '')")
    out = Path(out).expanduser()
    ro = out.resolve()
    for src in inputs:
        if src is None:
            continue
        rs = Path(src).expanduser().resolve()
        if ro == rs:
            raise QatlmError(f"{what} {out} is the input {src}: writing it would destroy the input; choose another --out")
        if rs.is_relative_to(ro):
            raise QatlmError(f"{what} {out} contains the input {src}: replacing it would destroy the input; choose another --out")
        if ro.is_relative_to(rs):
            raise QatlmError(f"{what} {out} lies inside the input {src}: choose an --out outside it")
    tidy_output(out)
    if out.exists() and not out.is_dir():
        raise QatlmError(f"{what} {out} is a file, not a folder")
    if out.exists() and not overwrite:
        raise QatlmError(f"{what} {out} already exists (pass --overwrite to replace it)")
    parent = ro.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise QatlmError(f"cannot create {what} {out}: {parent} is not a folder")
    try:  # a real probe: permission bits say yes to root, and some file systems (/proc) refuse whatever they say
        os.rmdir(tempfile.mkdtemp(prefix=".qatlm-probe-", dir=parent))
    except OSError as e:
        raise QatlmError(f"cannot create {what} {out}: {parent} is not writable ({e.strerror})") from None
    return out


@contextlib.contextmanager
def output_lock(out):
    """Hold ``.<name>.lock`` beside ``out`` for the whole run: a second run on the same output is refused
    while the owner lives; a dead owner's lock is taken over."""
    if not str(out).strip():
        raise QatlmError("the output folder name is empty (--out '')")
    out = Path(out).expanduser()
    lock = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QatlmError(f"cannot create {out}: its folder cannot be made ({e.strerror})") from None
    me = str(os.getpid())
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or -1)
            except (OSError, ValueError):
                pid = -1
            if pid != os.getpid() and _pid_alive(pid):
                raise QatlmError(f"another qatlm run (pid {pid}) is writing {out}; wait for it to finish or stop it") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # its owner is dead: take it over
            continue
        except OSError as e:
            raise QatlmError(f"cannot create {out}: {out.parent} is not writable ({e.strerror})") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        break
    else:
        raise QatlmError(f"could not take the lock {lock}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == me:
                lock.unlink()


_IDENTITY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def source_fingerprint(folder) -> str:
    """What identifies a model folder without reading all its weights: every safetensors file's name, size,
    header (names, shapes, dtypes, offsets) and 64 samples of 4 KiB spread over its tensor bytes, and the
    config and tokenizer files' contents."""
    folder = Path(folder)
    h = hashlib.sha256()
    if folder.is_file():
        st = folder.stat()
        h.update(f"{folder.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) == 8:
                n = min(struct.unpack("<Q", head)[0], 1 << 26)
                h.update(fh.read(n))
                # two models of one architecture share the header: add 64 samples of the tensor bytes
                start = 8 + n
                for k in range(64):
                    fh.seek(start + (size - start) * k // 64)
                    h.update(fh.read(4096))
    for name in _IDENTITY_FILES:
        if (folder / name).is_file():
            h.update(name.encode() + (folder / name).read_bytes())
    return h.hexdigest()[:16]


def claim_work_dir(work: Path, source: str, resume: bool) -> None:
    """Record which source a work folder belongs to; refuse to resume it from another one."""
    work = Path(work)
    tag = work / "source.json"
    if tag.is_file():
        old = json.loads(tag.read_text()).get("source")
        if old == source:
            return
        if resume:
            raise QatlmError(f"cannot resume from {work}: it was started from another source model or checkpoint, or "
                             "with another method or grid (pass --overwrite to start over)")
        if any(p.name != "source.json" for p in work.iterdir()):
            return  # another source's unfinished run: the method refuses it without --resume / --overwrite
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(tag, json.dumps({"source": source}))


def resumable(work: Path) -> bool:
    """Whether a work folder holds progress a ``--resume`` would continue from: a finished Block-AP block
    (``progress.json`` with done > 0) or an end-to-end checkpoint."""
    work = Path(work)
    if not work.is_dir():
        return False
    for f in work.rglob("progress.json"):
        state = read_state(f)
        if state is None or state.get("done", 0) > 0:  # (a damaged state is kept: what it guarded may be recovered)
            return True
    return any(p.is_dir() for p in work.rglob("checkpoint"))


@contextlib.contextmanager
def work_dir_guard(work: Path):
    """On failure, remove a work folder that holds nothing resumable: a refused input leaves no folder
    behind, an interrupted training keeps what it can resume from."""
    try:
        yield
    except BaseException:
        if not resumable(work):
            shutil.rmtree(work, ignore_errors=True)
        raise
