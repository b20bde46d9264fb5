"""Training examples for end-to-end methods: continual pre-training or instruction tuning.

Instruction data is a ``.jsonl`` / ``.parquet`` file or a saved HF dataset folder whose records have
either Alpaca fields (``instruction``, optional ``input``, ``output``) or chat ``messages``
(``[{role, content}, ...]``, formatted with the tokenizer's chat template). Only the response tokens
carry a loss: prompt positions get the label -100. As in the reference, an example starts with BOS where
the tokenizer adds one, and prompt and answer are truncated separately (``prompt_budget``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qatlm.data.text import bos_token, read_utf8
from qatlm.errors import QatlmError

IGNORE = -100
ALPACA_PROMPT = "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"


def read_records(path) -> list[dict]:
    p = Path(path).expanduser()
    if not p.exists():
        raise QatlmError(f"instruction data {p} does not exist")
    if not p.is_dir() and not p.is_file():
        raise QatlmError(f"instruction data {p} is not a regular file")
    if p.suffix == ".jsonl":
        recs = []
        for i, line in enumerate(read_utf8(p).splitlines()):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise QatlmError(f"{p}:{i + 1}: not a JSON record ({e.msg})") from None
    elif p.suffix == ".json":
        try:
            recs = json.loads(read_utf8(p))
        except json.JSONDecodeError as e:
            raise QatlmError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            recs = pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise QatlmError(f"{p}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    elif p.is_dir():
        import pyarrow.ipc as ipc

        recs = []
        for f in sorted(p.rglob("*.arrow")):
            with open(f, "rb") as fh:
                recs += ipc.open_stream(fh).read_all().to_pylist()
    else:
        raise QatlmError(f"{p}: instruction data must be .jsonl, .json, .parquet or a saved dataset folder")
    if not recs:
        raise QatlmError(f"instruction data {p} is empty")
    return recs


def resolve_instruction_source(source, cache_dir=None):
    """A built-in instruction set name (``sciq-instruct``) -> its local file; anything else unchanged."""
    from qatlm.data.assets import BUILTIN_INSTRUCT

    if str(source) in BUILTIN_INSTRUCT:
        return BUILTIN_INSTRUCT[str(source)](cache_dir)
    return source


def is_instruction_data(source) -> bool:
    p = Path(str(source))
    if p.suffix not in (".jsonl", ".json", ".parquet") and not (p.is_dir() and list(p.rglob("*.arrow"))):
        return False
    first = read_records(p)[0]
    return isinstance(first, dict) and ("messages" in first or "instruction" in first)


def encode_record(rec: dict, tokenizer, seqlen: int, where: str = "record") -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record; labels are -100 on the prompt."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise QatlmError(f"{where}: 'messages' must end with an assistant turn")
        if not getattr(tokenizer, "chat_template", None):
            raise QatlmError("chat 'messages' need a tokenizer with a chat template")
        prompt = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt):
            raise QatlmError(f"{where}: the chat template does not extend the prompt with the answer")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    elif "instruction" in rec and "output" in rec:
        inp = rec.get("input") or ""
        prompt = ALPACA_PROMPT.format(ctx=", paired with an input that provides further context" if inp else "",
                                      instruction=rec["instruction"], input=f"### Input:\n{inp}\n\n" if inp else "")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(str(rec["output"]), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            r_ids = r_ids + [tokenizer.eos_token_id]
    else:
        raise QatlmError(f"{where}: needs 'instruction' and 'output' fields (Alpaca) or 'messages' (chat); has {', '.join(rec)}")
    # as the reference: BOS first where the tokenizer adds one, then the prompt and the answer truncated
    # separately (prompt to 3/4 of the window, 384 of 512; the answer fills the rest), so no record is lost
    # because its prompt alone fills the window
    bos = bos_token(tokenizer)
    if bos is not None and (not p_ids or p_ids[0] != bos):
        p_ids = [bos] + p_ids
    p_ids = p_ids[: prompt_budget(seqlen)]
    r_ids = r_ids[: seqlen - len(p_ids)]
    return p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids


def prompt_budget(seqlen: int) -> int:
    """Most prompt tokens one example keeps: 3/4 of the window (the reference's 384 source + 128 target)."""
    return max(1, seqlen * 3 // 4)


def instruction_examples(source, tokenizer, seqlen: int, n: int | None = None) -> list[tuple[list[int], list[int]]]:
    recs = read_records(source)
    out = []
    for i, r in enumerate(recs[: n or None]):
        ids, labels = encode_record(r, tokenizer, seqlen, where=f"{source} record {i + 1}")
        if any(x != IGNORE for x in labels[1:]):
            out.append((ids, labels))
    if not out:
        raise QatlmError(f"{source}: no example keeps a response within {seqlen} tokens")
    return out


def collate(examples, pad_id: int) -> dict:
    """Right-pad a list of (ids, labels) into tensors with an attention mask."""
    L = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    for i, (a, b) in enumerate(examples):
        ids[i, : len(a)] = torch.tensor(a)
        labels[i, : len(b)] = torch.tensor(b)
        mask[i, : len(a)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
