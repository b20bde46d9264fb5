"""Folders that appear only when complete: build in a temporary sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in ``.<name>.partial-<pid>`` beside ``final``; replace ``final`` only on success."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
