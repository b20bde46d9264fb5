"""Build SmolLM2 variants that compute the same function with other weight and activation scales.

    python bench/rescaled_model.py            # -> bench/work/SmolLM2-135M-Instruct-rescaled

Defaults must not depend on one model's scale (SmolLM2's weights are ~10x larger than a typical 7B's).
This writes a model whose logits equal SmolLM2's (up to RMSNorm's epsilon) but whose numbers look like
another model's: the residual stream (embeddings and every write into it: o_proj, down_proj) is
multiplied by --residual (0.1), q_proj by --qk (0.1) and k_proj by its inverse (attention scores are
unchanged), v_proj by --vo (0.1) and o_proj by its inverse. The LM head is untied and kept, so the
logits do not move; RMSNorm's epsilon is scaled by residual² with the stream it normalises. Perplexity and RTN are unchanged by construction; a method whose result changes on
this model depends on the scale of the model it was tuned on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    import torch

    from qatlm.data.assets import MODEL_NAME, default_model_dir
    from qatlm.model.checkpoint import load_fp_model, load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--residual", type=float, default=0.1)
    ap.add_argument("--qk", type=float, default=0.1)
    ap.add_argument("--vo", type=float, default=0.1)
    ap.add_argument("--out", default=str(HERE / "work" / f"{MODEL_NAME}-rescaled"))
    a = ap.parse_args()
    src = default_model_dir()
    model, tok = load_fp_model(src), load_tokenizer(src)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
        head = model.lm_head.weight.detach().clone()
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(head)  # untied: the head keeps the original embedding
        model.model.embed_tokens.weight.mul_(a.residual)
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            att.q_proj.weight.mul_(a.qk)
            att.k_proj.weight.div_(a.qk)
            att.v_proj.weight.mul_(a.vo)
            att.o_proj.weight.mul_(a.residual / a.vo)
            mlp.down_proj.weight.mul_(a.residual)
        # every norm reads the residual stream: its epsilon scales with the stream's square
        model.config.rms_norm_eps *= a.residual**2
        for m in model.modules():
            if hasattr(m, "variance_epsilon"):
                m.variance_epsilon *= a.residual**2
        after = model(ids).logits
    err = (after - before).abs().max().item()
    print(f"max |logit difference| = {err:.3g} (logits up to {before.abs().max().item():.3g})")
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
