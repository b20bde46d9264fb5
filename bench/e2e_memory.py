"""Peak memory of end-to-end training, controlled: the same loop, data, batch and steps on

  * ``fp-activations``: the fp32 model with every weight frozen but the first block's input norm, so
    that the backward pass runs through every block — i.e. the fp32 model's size plus the activations
    backpropagation keeps (the reference of the E2E-QP issue);
  * ``e2e-qp``: E2E-QP on a packed checkpoint (step sizes trained, weights packed integers);
  * ``dl-qat``: DL-QAT on the same packed checkpoint.

    python bench/e2e_memory.py --from bench/work/block-ap-w2g64 [--steps 4] [--grad-checkpointing]

Each runs in its own process; peak RSS (ru_maxrss) is written to bench/results/e2e_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("QATLM_BENCH_RESULTS", HERE / "results"))


def one(kind: str, src: str, steps: int, ckpt: bool) -> dict:
    import torch

    from qatlm.data.assets import default_model_dir
    from qatlm.methods.dl_qat import DLQATConfig, dlqat_trainable
    from qatlm.methods.e2e_qp import E2EQPConfig, scale_trainable
    from qatlm.train.end_to_end import Trainable, train_end_to_end
    from qatlm.model.checkpoint import load_fp_model, load_quantized, load_tokenizer

    batch = 4
    kw = {"samples": steps * batch, "val_samples": 4, "seqlen": 512, "batch_size": batch, "epochs": 1, "grad_checkpointing": ckpt}
    tok = load_tokenizer(src)
    if kind == "fp-activations":
        model = load_fp_model(default_model_dir())

        def norm_only(m, config, total):
            from qatlm.model.arch import find_parts

            p = next(t for t in find_parts(m).layers[0].parameters() if t.dim() == 1)  # the first norm
            p.requires_grad_(True)
            return Trainable([{"params": [p], "lr": 1e-5}], lambda: 0, {"layers": 0})

        s = train_end_to_end(model, E2EQPConfig(**kw), tok, norm_only, "fp", progress=False)
    elif kind == "e2e-qp":
        model = load_quantized(src)
        s = train_end_to_end(model, E2EQPConfig(**kw), tok, scale_trainable, "e2e-qp", progress=False)
    else:
        model = load_quantized(src)
        s = train_end_to_end(model, DLQATConfig(**kw), tok, dlqat_trainable, "dl-qat", progress=False)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20
    return {"kind": kind, "steps": s.steps, "grad_checkpointing": ckpt, "model_tensors_mib": weights,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", default=str(HERE / "work" / "block-ap-w2g64"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("ROW " + json.dumps(one(a.one, a.src, a.steps, a.grad_checkpointing)), flush=True)
        return
    rows = []
    for ckpt in ([False, True] if a.grad_checkpointing else [False]):
        for kind in ("fp-activations", "e2e-qp", "dl-qat"):
            cmd = [sys.executable, __file__, "--one", kind, "--from", a.src, f"--steps={a.steps}"] + (["--grad-checkpointing"] if ckpt else [])
            res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
            got = [json.loads(x[4:]) for x in res.stdout.splitlines() if x.startswith("ROW ")]
            if got:
                print(f"{kind:15s} ckpt={ckpt}: peak RSS {got[0]['peak_rss_mib']:,.0f} MiB", file=sys.stderr, flush=True)
                rows += got
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "e2e_memory.json").write_text(json.dumps({"source": a.src, "rows": rows}, indent=2) + "\n")
    lines = ["| run | gradient checkpointing | model tensors MiB | peak RSS MiB |", "|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['grad_checkpointing']} | {r['model_tensors_mib']:,.0f} | {r['peak_rss_mib']:,.0f} |" for r in rows]
    (RESULTS / "e2e_memory.md").write_text("\n".join(lines) + f"\n\nSource {Path(a.src).name}; batch 4 x 512 tokens, {a.steps} steps, CPU fp32.\n")


if __name__ == "__main__":
    main()
