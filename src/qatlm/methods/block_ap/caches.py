"""Where Block-AP's activations live and how they move: ``ActivationCache`` (RAM up to a budget, memory-mapped
beyond) and ``ActivationChain`` (the fp and quantized chains, advanced block by block, saved for resume)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from qatlm.model.arch import first_layer_input, run_layer


class ActivationCache:
    """``[n, seqlen, hidden]`` activations in RAM while they fit the budget, else in a memory-mapped file."""

    def __init__(self, shape, dtype, budget: dict, folder: Path | None, name: str):
        nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        if nbytes <= budget["left"] or folder is None:
            self.t = torch.empty(shape, dtype=dtype)
            budget["left"] -= nbytes
            self.file = None
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self.file = folder / f"{name}.mmap"
            np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}[dtype]
            self.t = torch.from_numpy(np.memmap(self.file, dtype=np_dtype, mode="w+", shape=tuple(shape))).view(dtype)
        self.nbytes = nbytes

    def __getitem__(self, idx):
        return self.t[idx]

    def __setitem__(self, idx, v):
        self.t[idx] = v.to(self.t.dtype)



_CHAIN_ROWS = 64  # samples copied at a time between a cache and its snapshot file (bounded memory)


@torch.no_grad()
def _run_chain(block, kwargs, src: ActivationCache, dst: ActivationCache, n: int, bs: int, device, dtype) -> torch.Tensor:
    """``dst = block(src)`` batch by batch; returns each sample's ``‖dst − src‖²`` (the block's own contribution)."""
    energy = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, bs):
        x = src[i : i + bs].to(device, dtype)
        y = run_layer(block, x, kwargs)
        energy[i : i + len(x)] = (y.float() - x.float()).pow(2).sum((1, 2)).double().cpu()
        dst[i : i + bs] = y.float().cpu()
    return energy


class ActivationChain:
    """The activations Block-AP moves from block to block, for this process's samples: two caches, as the
    reference. With quantized-chain inputs (``input_mode="quant"``): ``fp`` (the full-precision chain,
    advanced in place: it holds block i's input, then its fp output = the training target) and ``q`` (the
    outputs of the already-quantized blocks = block i's training input). With ``input_mode="fp"`` two fp
    caches alternate. Each cache is in RAM while the budget lasts, else a memory-mapped file in ``folder``."""

    def __init__(self, n: int, seqlen: int, hidden: int, dtype: torch.dtype, input_mode: str, budget_bytes: int,
                 folder: Path | None, chain_batch: int):
        budget = {"left": int(budget_bytes)}
        shape = (n, seqlen, hidden)
        self.n, self.bs = n, chain_batch
        self.fp_in = ActivationCache(shape, dtype, budget, folder, "fp")
        self.fp_out = ActivationCache(shape, dtype, budget, folder, "fp_out") if input_mode == "fp" else self.fp_in
        self.q = ActivationCache(shape, dtype, budget, folder, "q") if input_mode == "quant" else None

    @property
    def inputs(self) -> ActivationCache:
        """Block i's training inputs."""
        return self.q if self.q is not None else self.fp_in

    @property
    def targets(self) -> ActivationCache:
        """Block i's training targets (valid after ``compute_targets``)."""
        return self.fp_out

    def caches(self) -> dict:
        return {"fp": self.fp_in} if self.q is None else {"fp": self.fp_in, "q": self.q}

    @torch.no_grad()
    def fill(self, model, ids: torch.Tensor, parts, device):
        """Layer-0 inputs of the samples ``ids``, through the model's own embedding path."""
        for i in range(0, len(ids), self.bs):
            h = first_layer_input(model, ids[i : i + self.bs].to(device), parts).float().cpu()
            for c in self.caches().values():
                c[i : i + len(h)] = h

    def compute_targets(self, block, kw, device, dtype) -> torch.Tensor:
        """Run the (still full-precision) block on the fp chain; returns each sample's energy ``‖out − in‖²``."""
        return _run_chain(block, kw, self.fp_in, self.fp_out, self.n, self.bs, device, dtype)

    def advance(self, block, kw, device, dtype):
        """After block i is packed: the quantized chain moves through it; the fp chain's output becomes the input."""
        if self.q is not None:
            _run_chain(block, kw, self.q, self.q, self.n, self.bs, device, dtype)
        self.fp_in, self.fp_out = self.fp_out, self.fp_in

    def save(self, folder: Path, suffix: str = ""):
        """Copy the caches (block i's inputs) into ``folder`` as ``.npy`` files, a few samples at a time."""
        for name, cache in self.caches().items():
            t = cache.t
            raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bf16: its bits as int16
            out = np.lib.format.open_memmap(folder / f"{name}{suffix}.npy", mode="w+", dtype=raw.numpy().dtype, shape=tuple(t.shape))
            for i in range(0, t.shape[0], _CHAIN_ROWS):
                out[i : i + _CHAIN_ROWS] = raw[i : i + _CHAIN_ROWS].numpy()
            out.flush()
            del out

    def load(self, folder: Path, suffix: str = "") -> bool:
        """Fill the caches from ``save``'s files; False (caches untouched) if any is missing or of another shape."""
        arrays = {}
        for name, cache in self.caches().items():
            f = folder / f"{name}{suffix}.npy"
            if not f.exists():
                return False
            a = np.load(f, mmap_mode="r", allow_pickle=False)
            if tuple(a.shape) != tuple(cache.t.shape):
                return False
            arrays[name] = a
        for name, cache in self.caches().items():
            dst = cache.t.view(torch.int16) if cache.t.dtype == torch.bfloat16 else cache.t
            for i in range(0, dst.shape[0], _CHAIN_ROWS):
                dst[i : i + _CHAIN_ROWS] = torch.from_numpy(np.array(arrays[name][i : i + _CHAIN_ROWS]))
        return True


