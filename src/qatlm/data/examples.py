"""Examples for end-to-end training: ``(ids, labels)`` pairs from text windows (continual pre-training,
every token is a label) or from instruction records (loss on the response tokens only)."""

from __future__ import annotations

import torch

from qatlm.errors import QatlmError


def build_examples(config, tokenizer, max_len: int | None, cache_dir=None):
    """(train, val, mode) from an ``E2EQPConfig``'s data fields: lists of (ids, labels), instruction records or text windows."""
    from qatlm.data.instruct import instruction_examples, is_instruction_data, resolve_instruction_source
    from qatlm.data.text import calibration_samples

    if max_len and config.seqlen > max_len:
        raise QatlmError(f"sequence length {config.seqlen} is above the model's limit of {max_len} positions")
    source = resolve_instruction_source(config.data, cache_dir)
    if is_instruction_data(source):
        ex = instruction_examples(source, tokenizer, config.seqlen)
        g = torch.Generator().manual_seed(config.seed)
        order = torch.randperm(len(ex), generator=g).tolist()
        need = config.samples + config.val_samples
        if len(ex) < need:
            raise QatlmError(f"{config.data} has {len(ex)} usable records; asked for {config.samples} + {config.val_samples}")
        ex = [ex[i] for i in order[:need]]
        return ex[: config.samples], ex[config.samples :], "instruct"
    tr, va = calibration_samples(tokenizer, config.data, config.samples, config.seqlen, config.seed + 1, config.val_samples, cache_dir)
    return [(r.tolist(), r.tolist()) for r in tr], [(r.tolist(), r.tolist()) for r in va], "pretrain"
