"""A model larger than the memory it is quantized in: RTN and Block-AP streaming under a cgroup memory cap.

    python bench/big_model.py                       # 96 layers (~1.2 B parameters, 4.7 GB in fp32) and 16 layers
    python bench/big_model.py --layers 96 --cap-gib 2

Builds a random-weight Llama-shaped model (hidden 1024, 16 heads, intermediate 2560, SmolLM2's tokenizer
and vocabulary) shard by shard, never holding it whole, then runs ``qatlm quantize`` on it inside a cgroup
v1 memory limit (``/sys/fs/cgroup/memory``; the page cache counts against it). Reports, per run: exit
code, wall time, the cgroup's peak (``memory.max_usage_in_bytes``, page cache included) and the process's
peak RSS, and whether the result reloads. Figures go to ``bench/results/big_model.{json,md}``.
Needs root (to create the cgroup) and the built-in assets (``qatlm assets``) for the tokenizer and text.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CG = Path("/sys/fs/cgroup/memory")


def build(folder: Path, layers: int, hidden: int = 1024, inter: int = 2560, heads: int = 16, seed: int = 0):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from qatlm.data.assets import default_model_dir

    if (folder / "config.json").exists():
        return
    tmp = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    vocab = len(tok)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "float32"
    g = torch.Generator().manual_seed(seed)
    std = 0.02

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * std

    weight_map, total, shard = {}, 0, 0
    pending = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        pending.update({
            p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": rnd(hidden, hidden), p + "self_attn.k_proj.weight": rnd(hidden, hidden),
            p + "self_attn.v_proj.weight": rnd(hidden, hidden), p + "self_attn.o_proj.weight": rnd(hidden, hidden) / layers**0.5,
            p + "mlp.gate_proj.weight": rnd(inter, hidden), p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter) / layers**0.5,
        })
        if sum(t.numel() for t in pending.values()) * 4 > 400e6 or i == layers - 1:
            shard += 1
            name = f"model-{shard:05d}.safetensors"
            save_file(pending, tmp / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in pending})
            total += sum(t.numel() * 4 for t in pending.values())
            pending = {}
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)


def run_capped(cmd: list[str], cap_bytes: int, name: str) -> dict:
    """Run ``cmd`` in a fresh cgroup v1 memory group limited to ``cap_bytes``; its peak comes from the group."""
    group = CG / f"qatlm-bench-{name}-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
        (group / "memory.memsw.limit_in_bytes").exists() and (group / "memory.memsw.limit_in_bytes").write_text(str(cap_bytes))
        t0 = time.time()
        rusage = ("import resource, subprocess, sys\nr = subprocess.run(sys.argv[1:])\n"
                  "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\nsys.exit(r.returncode)")
        wrapper = ["/bin/sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", sys.executable, "-c", rusage, *cmd]
        r = subprocess.run(wrapper, capture_output=True, text=True)
        wall = time.time() - t0
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        failcnt = int((group / "memory.failcnt").read_text())
        oom = "oom_kill 1" in (group / "memory.oom_control").read_text()
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    rss = [int(x.split()[1]) for x in r.stderr.splitlines() if x.startswith("MAXRSS_KB")]
    tail = [x for x in r.stderr.splitlines() if x.startswith(("qatlm: error", "saved", "Killed", "RESULT"))]
    return {"exit": r.returncode, "wall_s": round(wall, 1), "cgroup_peak_mib": round(peak / 2**20), "peak_rss_mib": round(rss[0] / 1024) if rss else None,
            "cap_mib": cap_bytes // 2**20, "limit_hits": failcnt, "oom_killed": oom, "stderr_tail": tail[-3:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="96,16", help="comma-separated layer counts (default 96,16)")
    ap.add_argument("--cap-gib", type=float, default=2.0)
    ap.add_argument("--methods", default="rtn,block-ap")
    ap.add_argument("--keep", action="store_true", help="keep the generated models and outputs in bench/work")
    ap.add_argument("--name", default="big_model", help="results file stem in bench/results (default big_model)")
    a = ap.parse_args()
    work = HERE / "work" / "big"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(x) for x in a.layers.split(",")]:
        model = work / f"llama-h1024-l{n}"
        t0 = time.time()
        build(model, n)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        print(f"model {model.name}: {size / 2**30:.2f} GiB of fp32 safetensors (built in {time.time() - t0:.0f}s)", file=sys.stderr)
        for method in a.methods.split(","):
            out = work / f"{model.name}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "qatlm.cli", "quantize", "--model", str(model), "--method", method, "--bits", "2",
                   "--group-size", "64", "--out", str(out)]
            if method == "block-ap":
                cmd += ["--calib-samples", "4", "--calib-seqlen", "256", "--val-samples", "1", "--epochs", "1"]
            r = run_capped(cmd, int(a.cap_gib * 2**30), f"{method}-{n}")
            reload_ok = None
            if r["exit"] == 0:
                chk = subprocess.run([sys.executable, "-c", "import sys, torch\nfrom qatlm import load_quantized\n"
                                      "m = load_quantized(sys.argv[1])\nids = torch.randint(3, 1000, (1, 16))\n"
                                      "print(bool(torch.isfinite(m(ids).logits).all()))", str(out)], capture_output=True, text=True)
                reload_ok = chk.stdout.strip().endswith("True")
            row = {"layers": n, "params_b": round(size / 4 / 1e9, 3), "fp32_gib": round(size / 2**30, 2), "method": method, **r,
                   "reloads": reload_ok}
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
            if not a.keep:
                shutil.rmtree(out, ignore_errors=True)
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    (res / f"{a.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| layers | parameters | fp32 size | method | cap | exit | peak (cgroup, page cache incl.) | peak RSS | wall s | reloads |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['params_b']:.2f} B | {r['fp32_gib']:.2f} GiB | {r['method']} | {r['cap_mib']} MiB | {r['exit']} | "
                     f"{r['cgroup_peak_mib']:,} MiB | {'–' if r['peak_rss_mib'] is None else format(r['peak_rss_mib'], ',')} MiB | "
                     f"{r['wall_s']} | {r['reloads']} |")
    (res / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
