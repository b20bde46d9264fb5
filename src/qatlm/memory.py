"""How much memory this process may still take: the host's available memory, bounded by the cgroup the
process runs in (a container's or a job's limit, v1 or v2), or the free memory of a CUDA device."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's memory cgroup (None when unlimited or unknown)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit_f, usage_f = base / "memory.max", base / "memory.current"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_f, usage_f = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        else:
            continue
        try:
            limit = limit_f.read_text().strip()
            usage = int(usage_f.read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def available_bytes(device="cpu") -> int:
    """Bytes this process can still allocate on ``device`` without swapping or being killed (best effort)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    room = [r for r in (_meminfo_available(), _cgroup_room()) if r is not None]
    return min(room) if room else 0


def return_freed_memory_promptly(threshold: int = 1 << 20) -> bool:
    """Make glibc serve blocks of ``threshold`` bytes or more with their own mappings, unmapped when freed.

    By default glibc raises that threshold as large blocks are freed, after which tensors come from the
    heap and freed ones stay in the process: training's per-layer temporaries pile up (one E2E-QP step
    of SmolLM2 at 4x512 tokens: 3.1 GB peak RSS by default, 1.9 GB with this). The price is a page fault
    for every fresh block: that step is ~1.6x slower on CPU. Process-wide. Returns whether it applied
    (glibc only)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


TIGHT_FACTOR = 8  # "tight": less free memory than this many times the model's tensors


def _note(msg: str):
    import sys

    print(f"qatlm: note: {msg}", file=sys.stderr)


def adapt_to_free_memory(model_bytes: int, device="cpu", say=_note) -> bool:
    """Before loading a model of ``model_bytes`` (its checkpoint's tensors) on ``device``: on CPU, when the
    free memory is under ``TIGHT_FACTOR`` times that, trade speed for memory
    (:func:`return_freed_memory_promptly`) and say so. Returns whether it did."""
    import torch

    if torch.device(device).type != "cpu":
        return False
    free = available_bytes("cpu")
    if free >= TIGHT_FACTOR * model_bytes or not return_freed_memory_promptly():
        return False
    say(f"memory is tight ({free / 2**30:.1f} GiB free for a {model_bytes / 2**30:.2f} GiB checkpoint): freed memory goes back "
        "to the system at once (slower on CPU, smaller peak)")
    return True


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand heap memory that Python/torch already freed back to the OS (glibc ``malloc_trim``).

    Between Block-AP blocks many mid-sized tensors are freed; glibc keeps the pages, so the RSS
    creeps up block after block although nothing is alive. A no-op where glibc is absent."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
