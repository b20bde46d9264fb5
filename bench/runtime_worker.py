"""Run one exported model in one serving runtime and print what it computed, as JSON: the worker that
``bench/runtimes.py`` and ``tests/test_runtimes.py`` start with that runtime's own Python (vLLM lives in a virtualenv
of its own, with its own transformers), so it imports nothing from qatlm.

    python bench/runtime_worker.py JOB.json  ->  one JSON line on stdout

JOB: {"runtime": "vllm" | "llama.cpp" | "transformers", "model": folder (GGUF: the .gguf file), "prompt": [ids],
      "new_tokens": 32, "windows": [[ids], ...], "threads": 2, "dtype": null (the runtime's default) or a name,
      "speed_tokens": 0 (generate this many tokens once more, timed), "logprobs": false}
transformers: ``from_pretrained``, except a GPTQ folder with per-module grids (a mixed-precision export), which goes
through ``GPTQModel.load`` as the export's route says (``from_pretrained`` would give every layer the base grid).
Result: {"load_s", "greedy": [ids], "window_nll": [sum of -log p over each window's tokens after the first],
         "token_logprobs": [[log p of each window's next tokens]] (when asked),
         "prompt_tok_s", "gen_tok_s"} or {"error": "the runtime's own message"}.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time


def _nll(out: dict, lps: list, job: dict) -> None:
    """Per window, the summed negative log-likelihood; the log-probabilities themselves when the job asks."""
    out["window_nll"] = [-sum(w) for w in lps]
    if job.get("logprobs"):
        out["token_logprobs"] = lps


def _vllm(job):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max([len(job["prompt"]) + job["new_tokens"] + job.get("speed_tokens", 0)] + [len(w) for w in job["windows"]])
    kw = {} if job.get("dtype") is None else {"dtype": job["dtype"]}
    t0 = time.time()
    llm = LLM(model=job["model"], max_model_len=longest + 8, enforce_eager=True, seed=0, **kw)
    out = {"load_s": time.time() - t0, "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch.")}
    res = llm.generate([TokensPrompt(prompt_token_ids=job["prompt"])], SamplingParams(temperature=0.0, max_tokens=job["new_tokens"]),
                       use_tqdm=False)
    out["greedy"] = list(res[0].outputs[0].token_ids)
    lps = []
    for w in job["windows"]:
        r = llm.generate([TokensPrompt(prompt_token_ids=w)], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        lps.append([lp[t].logprob for t, lp in zip(w[1:], r.prompt_logprobs[1:])])
    _nll(out, lps, job)
    if job.get("speed_tokens"):
        n = job["speed_tokens"]
        t = time.time()
        llm.generate([TokensPrompt(prompt_token_ids=job["windows"][0])], SamplingParams(max_tokens=1), use_tqdm=False)
        out["prompt_tok_s"] = len(job["windows"][0]) / (time.time() - t)
        t = time.time()
        g = llm.generate([TokensPrompt(prompt_token_ids=job["prompt"])], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                         use_tqdm=False)
        out["gen_tok_s"] = len(g[0].outputs[0].token_ids) / (time.time() - t)
    return out


def _llama_cpp(job):
    import llama_cpp
    import llama_cpp.llama as high
    import numpy as np

    default = llama_cpp.llama_model_default_params

    def params():  # the CPU's repacked / AMX buffer types crash this build on Q4_0 tensors; the plain kernels compute the same
        p = default()
        p.use_extra_bufts = False
        return p

    high.llama_cpp.llama_model_default_params = params
    n_ctx = max([len(job["prompt"]) + job["new_tokens"] + job.get("speed_tokens", 0)] + [len(w) for w in job["windows"]]) + 8
    t0 = time.time()
    llm = llama_cpp.Llama(model_path=job["model"], n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                          n_threads=job.get("threads", 2), seed=0)
    out = {"load_s": time.time() - t0}

    def greedy(ids, n):
        llm.reset()
        got = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got.append(int(tok))
            if len(got) == n:
                break
        return got

    out["greedy"] = greedy(job["prompt"], job["new_tokens"])
    lps = []
    for w in job["windows"]:
        llm.reset()
        llm.eval(w)
        logits = np.array(llm.scores[: len(w)], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        lps.append([float(logits[i, w[i + 1]] - lse[i]) for i in range(len(w) - 1)])
    _nll(out, lps, job)
    if job.get("speed_tokens"):
        llm.reset()
        t = time.time()
        llm.eval(job["windows"][0])
        out["prompt_tok_s"] = len(job["windows"][0]) / (time.time() - t)
        t = time.time()
        n = len(greedy(job["prompt"], job["speed_tokens"]))
        out["gen_tok_s"] = n / (time.time() - t)
    llm.close()
    return out


def _per_module_gptq(path: str) -> bool:
    """A GPTQ folder whose config gives some modules their own grid (GPTQModel's ``dynamic`` overrides)."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg) as f:
        q = json.load(f).get("quantization_config") or {}
    return q.get("quant_method") == "gptq" and bool(q.get("dynamic"))


def _transformers(job):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job.get("threads", 2))
    path, kw = job["model"], {}
    if path.endswith(".gguf"):
        path, kw = os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    if job.get("dtype") is not None:
        kw["dtype"] = getattr(torch, job["dtype"])
    t0 = time.time()
    if _per_module_gptq(path):  # per-layer grids: the loader the route names (from_pretrained gives every layer one grid)
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        from gptqmodel import GPTQModel

        model, loader = GPTQModel.load(path, device="cpu").model.eval(), "GPTQModel.load"
    else:
        model, loader = AutoModelForCausalLM.from_pretrained(path, **kw).eval(), "from_pretrained"
    out = {"load_s": time.time() - t0, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "loader": loader}
    with torch.no_grad():
        ids = torch.tensor([job["prompt"]])
        g = model.generate(ids, max_new_tokens=job["new_tokens"], do_sample=False, min_new_tokens=job["new_tokens"],
                           pad_token_id=0)
        out["greedy"] = g[0, ids.shape[1]:].tolist()
        lps = []
        for w in job["windows"]:
            x = torch.tensor([w])
            logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
            lps.append(logp[:-1].gather(1, x[0, 1:, None])[:, 0].tolist())
        _nll(out, lps, job)
        if job.get("speed_tokens"):
            t = time.time()
            model(input_ids=torch.tensor([job["windows"][0]]))
            out["prompt_tok_s"] = len(job["windows"][0]) / (time.time() - t)
            t = time.time()
            g = model.generate(ids, max_new_tokens=job["speed_tokens"], min_new_tokens=job["speed_tokens"], do_sample=False, pad_token_id=0)
            out["gen_tok_s"] = (g.shape[1] - ids.shape[1]) / (time.time() - t)
    return out


RUNNERS = {"vllm": _vllm, "llama.cpp": _llama_cpp, "transformers": _transformers}


def main(path: str) -> int:
    job = json.loads(open(path).read())
    try:
        out = RUNNERS[job["runtime"]](job)
    except Exception as e:  # noqa: BLE001 - the runtime's refusal is a result of the matrix, reported as it said it
        msg = " ".join(str(e).split())
        out = {"error": f"{type(e).__name__}: {msg[:400]}"}
    if "window_nll" in out:
        tokens = sum(len(w) - 1 for w in job["windows"])
        out["ppl"] = math.exp(sum(out["window_nll"]) / tokens) if tokens else None
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":  # vLLM starts its workers by spawn: nothing may run at import
    sys.exit(main(sys.argv[1]))
