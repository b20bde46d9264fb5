"""Perplexity with the GPTQ / EfficientQAT protocol.

The whole text is tokenized once; the token stream is cut into non-overlapping windows of the
context length; each window is scored independently (its first token has no prediction);
``ppl = exp(total NLL / number of predicted tokens)``. For a model whose tokenizer adds BOS, every
window starts with BOS followed by ``seqlen − 1`` text tokens, all of them predicted (as lm-eval does):
without it such a model is scored far off the distribution it was trained on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qatlm.data.text import cut_windows
from qatlm.errors import QatlmError


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 512, max_windows: int | None = None, batch_size: int = 1,
               progress: bool = False, bos: int | None = None) -> float:
    chunks = cut_windows(ids, seqlen, bos, max_windows)
    windows = len(chunks)
    if windows < 1:
        raise QatlmError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, windows, batch_size), desc="perplexity", unit="batch", disable=not progress):
        x = chunks[i : i + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    if not math.isfinite(nll):
        raise QatlmError("perplexity is not finite: the model produced NaN/inf logits")
    return math.exp(nll / count)
