"""A Block-AP run's work folder: what is finished, and what a resumed run continues from."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from qatlm.io import DamagedWorkFolder, atomic_write_json, read_state, resume_point
from qatlm.methods.block_ap.caches import ActivationChain
from qatlm.methods.block_ap.sharding import Shard
from qatlm.model.lazy import block_file
from qatlm.summary import BlockRecord

CHAIN_OVERHEAD = 0.1  # at most this share of the run's time goes into writing chain snapshots


class RunState:
    """A Block-AP run's work folder: ``progress.json`` (settings fingerprint, finished blocks), ``summary.json``,
    ``blocks/`` (each finished block's packed tensors) and ``chain-K/`` (the activations block K starts from,
    named by ``chain.json``). Only the first process writes, except each process's own chain files.
    Without a folder nothing is kept (and nothing can be resumed)."""

    def __init__(self, work: Path | None, fingerprint: str, n_blocks: int, resume: bool, shard: Shard):
        self.work, self.fingerprint, self.n_blocks, self.shard = work, fingerprint, n_blocks, shard
        self.done = self.recovered = 0
        self.suffix = "" if shard.world == 1 else f"-rank{shard.rank}"
        self._snap = {"at": time.time(), "cost": 0.0}
        if work is None:
            return
        try:
            state = resume_point(work / "progress.json", fingerprint, resume, lambda st: f"block {st['done']}/{n_blocks}")
        except DamagedWorkFolder:
            if not resume:
                raise
            state = {"done": self._recover()}
        if state is not None:
            self.done = state["done"]
        shard.barrier()  # every process has read the state before the first one rewrites it
        if shard.main:
            (work / "blocks").mkdir(parents=True, exist_ok=True)
            self._progress(self.done)

    def _recover(self) -> int:
        """A damaged ``progress.json``: the finished blocks are those, from block 0 on, whose files open and carry this
        run's fingerprint (written into each block file's header) and whose records ``summary.json`` still holds."""
        summary = read_state(self.work / "summary.json") or {}
        records = summary.get("blocks") if isinstance(summary.get("blocks"), list) else []
        done = 0
        while done < min(self.n_blocks, len(records)):
            try:
                with safe_open(block_file(self.work, done), framework="pt") as fh:
                    ok = (fh.metadata() or {}).get("fingerprint") == self.fingerprint
            except (OSError, ValueError, SafetensorError):
                ok = False
            if not ok:
                break
            done += 1
        self.recovered = done
        return done

    def _progress(self, done: int):
        atomic_write_json(self.work / "progress.json", {"fingerprint": self.fingerprint, "done": done, "blocks": self.n_blocks})

    def cache_folder(self) -> Path | None:
        return None if self.work is None else self.work / f"activations{self.suffix}"

    def previous_blocks(self) -> list[BlockRecord]:
        f = self.work / "summary.json" if self.work else None
        if not (f and f.exists() and self.done):
            return []
        return [BlockRecord(**b) for b in json.loads(f.read_text())["blocks"][: self.done]]

    def packed(self, bi: int) -> dict:
        return load_file(block_file(self.work, bi))

    def restore_chain(self, chain: ActivationChain) -> int:
        """Fill ``chain`` from the latest snapshot if usable (at most ``done``, same caches, dtype and processes);
        returns the block it belongs to (0: none, start from the embeddings)."""
        meta_file = self.work / "chain.json" if (self.work and self.done) else None
        if meta_file is None or not meta_file.exists():
            return 0
        meta = json.loads(meta_file.read_text())
        caches = chain.caches()
        if (meta["block"] > self.done or meta["caches"] != sorted(caches) or meta.get("world", 1) != self.shard.world
                or meta["dtype"] != str(next(iter(caches.values())).t.dtype)):
            return 0
        ok = chain.load(self.work / meta["dir"], self.suffix)
        return meta["block"] if not self.shard.any(not ok) else 0

    def finish_block(self, bi: int, block, summary, chain: ActivationChain, save_block):
        """Block ``bi`` is packed: write it, the summary and the progress; then snapshot the chains for block
        ``bi + 1`` while that costs at most ``CHAIN_OVERHEAD`` of the time since the last snapshot (after the
        progress: a snapshot never runs ahead of the finished blocks)."""
        if self.work is None:
            return
        if self.shard.main:
            save_block(bi, block, {"fingerprint": self.fingerprint})
            atomic_write_json(self.work / "summary.json", asdict(summary))
            self._progress(bi + 1)
        due = bi + 1 < self.n_blocks and self._snap["cost"] <= CHAIN_OVERHEAD * (time.time() - self._snap["at"])
        if self.shard.any(due):
            t = time.time()
            self._save_chain(bi + 1, chain)
            self._snap.update(at=time.time(), cost=time.time() - t)

    def _save_chain(self, block: int, chain: ActivationChain):
        folder = self.work / f"chain-{block}"
        if self.shard.main:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        self.shard.barrier()
        chain.save(folder, self.suffix)
        self.shard.barrier()  # every process's files are complete before chain.json names the folder
        if self.shard.main:
            meta_file = self.work / "chain.json"
            previous = json.loads(meta_file.read_text()).get("dir") if meta_file.exists() else None
            caches = chain.caches()
            atomic_write_json(meta_file, {"block": block, "dir": folder.name, "caches": sorted(caches), "world": self.shard.world,
                                     "dtype": str(next(iter(caches.values())).t.dtype)})
            if previous and previous != folder.name:
                shutil.rmtree(self.work / previous, ignore_errors=True)


