"""The shared training loop: step timing excludes validation; freed heap memory goes back to the OS."""

import time
from pathlib import Path

import pytest
import torch

from qatlm.train.loop import train_epochs


def _problem():
    w = torch.nn.Parameter(torch.zeros(4))
    target = torch.arange(4.0)
    return w, (lambda batch: ((w - target) ** 2).sum())


def test_step_seconds_exclude_validation_and_the_loop_still_trains():
    w, loss_fn = _problem()

    def slow_val():
        time.sleep(0.2)
        return float(loss_fn(None))

    res = train_epochs([{"params": [w], "lr": 0.1}], loss_fn, lambda e: range(5), epochs=3, steps_per_epoch=5, val_fn=slow_val)
    assert res.steps == 15 and len(res.val_losses) == 3
    assert res.val_losses[-1] < res.val_losses[0] < float(((torch.arange(4.0)) ** 2).sum())
    assert 0 < res.step_seconds and res.seconds - res.step_seconds >= 0.6  # three validations of 0.2 s are not step time


_HEAP_PROBE = """
import os, sys, torch
from pathlib import Path
from qatlm.memory import release_freed_memory

def rss_mib():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

big, keep = [], []
for _ in range(3000):  # 190 MiB of 64 KiB tensors, each pinned in the heap by a small live neighbour
    big.append(torch.ones(16 * 1024))
    keep.append(torch.ones(16))
del big
before = rss_mib()  # freed, but glibc keeps the pages
release_freed_memory()
print(before - rss_mib(), sum(float(k.sum()) for k in keep))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_release_freed_memory_returns_freed_heap_pages_to_the_os():
    # in a fresh process: how much a heap keeps depends on everything the process allocated before
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, check=True).stdout.split()
    returned, alive = float(out[0]), float(out[1])
    assert returned > 100
    assert alive == 16 * 3000  # what is alive is untouched
