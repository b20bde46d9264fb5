"""GGUF for llama.cpp, written with the ``gguf`` package from a packed qatlm checkpoint.

How qatlm grids map onto GGML block types (blocks of 32 weights along the input dimension, so a
group size that is a multiple of 32, or per-channel with an input width that is, maps block by block):

| qatlm grid            | GGML type | stored per 32 weights          | exact?                                  |
|-----------------------|-----------|--------------------------------|-----------------------------------------|
| 4-bit asymmetric      | Q4_1      | fp16 d = s, fp16 m = -s·z      | codes and d exact; m rounded to fp16     |
| 4-bit symmetric       | Q4_0      | fp16 d = s, code q − z + 8     | bit-exact                               |
| 8-bit symmetric       | Q8_0      | fp16 d = s, int8 q − z         | bit-exact                               |
| 8-bit asymmetric      | Q8_0      | as above, only if q − z fits int8 | refused otherwise, naming the layers |
| 2/3-bit asym / sym    | Q4_1 / Q4_0 | the same codes in a 4-bit block | exact like 4-bit, at ~5 bits per weight |

A 2/3-bit grid is written losslessly in the 4-bit container by default (GGML's own 2/3-bit types,
Q2_K/Q3_K, have 16-weight sub-blocks with 4-bit-quantized scales and cannot hold our step sizes
exactly); the report says so and gives the size. Every written tensor is read back with the ``gguf``
package's own dequantizer and compared with the source weights; the maximum error is reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qatlm.errors import QatlmError
from qatlm.quant.grid import QuantSpec, dequantize, expand_groups

ARCHES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}
QK = 32  # weights per GGML block


def ggml_type_for(spec: QuantSpec) -> str:
    if spec.bits == 8:
        return "Q8_0"
    return "Q4_0" if spec.sym else "Q4_1"


def check_grid(spec: QuantSpec, in_features: int, name: str):
    g = in_features if spec.group_size == -1 else spec.group_size
    if g % QK or in_features % QK:
        raise QatlmError(f"GGUF cannot represent group size {spec.group_size} exactly ({name}: input width {in_features}); "
                         "GGML blocks hold 32 weights, so the group size must be a multiple of 32 (or per-channel with a width that is)")


def _blocks(t: torch.Tensor, in_f: int, spec: QuantSpec) -> torch.Tensor:
    """Per-group tensor ``[out, groups]`` -> per-block ``[out, in/32]``."""
    g = in_f if spec.group_size == -1 else spec.group_size
    return t.repeat_interleave(g // QK, dim=1)[:, : in_f // QK]


def encode_layer(q: torch.Tensor, z: torch.Tensor, s16: torch.Tensor, spec: QuantSpec, name: str) -> tuple[np.ndarray, str]:
    """GGML block bytes ``[out, in/32 * block_bytes]`` for integer codes ``q [out, in]``, zeros ``z`` and
    fp16 step sizes ``s16`` (both ``[out, groups]``)."""
    out_f, in_f = q.shape
    check_grid(spec, in_f, name)
    nb = in_f // QK
    d = _blocks(s16.to(torch.float16), in_f, spec).numpy().view(np.uint8).reshape(out_f, nb, 2)
    zb = _blocks(z.to(torch.int32), in_f, spec)
    codes = q.to(torch.int32).reshape(out_f, nb, QK)
    kind = ggml_type_for(spec)
    if kind == "Q8_0":
        v = codes - zb[..., None]
        if v.min() < -128 or v.max() > 127:
            raise QatlmError(f"{name}: 8-bit asymmetric codes minus zero point leave the int8 range of Q8_0 (found {v.min()}..{v.max()}); "
                             "GGUF cannot store this layer exactly (quantize with --sym for an exact Q8_0 export)")
        qs = v.to(torch.int8).numpy().view(np.uint8)
        return np.concatenate([d, qs], axis=2).reshape(out_f, nb * 34), kind
    if kind == "Q4_0":
        codes = codes - zb[..., None] + 8  # symmetric zero is 2^(b-1); Q4_0 stores q - z + 8
    lo, hi = codes[..., :16], codes[..., 16:]
    qs = (lo | (hi << 4)).to(torch.uint8).numpy()
    if kind == "Q4_0":
        return np.concatenate([d, qs], axis=2).reshape(out_f, nb * 18), kind
    m = (-_blocks(s16.float(), in_f, spec) * zb.float()).to(torch.float16).numpy().view(np.uint8).reshape(out_f, nb, 2)
    return np.concatenate([d, m, qs], axis=2).reshape(out_f, nb * 20), kind


def _llama_permute(n_out: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's llama graph expects for q/k (its rotary pairs adjacent channels)."""
    idx = torch.arange(n_out)
    return idx.reshape(n_head, 2, n_out // n_head // 2).transpose(1, 2).reshape(n_out)


def _tokenizer_meta(writer, src: Path, config, gguf):
    tj = src / "tokenizer.json"
    if not tj.exists():
        raise QatlmError(f"{src} has no tokenizer.json; GGUF export needs the tokenizer (a BPE tokenizer.json)")
    model = json.loads(tj.read_text()).get("model", {})
    if model.get("type") != "BPE" or (src / "tokenizer.model").exists() and "merges" not in model:
        raise QatlmError("GGUF export supports byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama-3, Qwen); this tokenizer is not one")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    vocab = tok.get_vocab()
    n = max(config.vocab_size, max(vocab.values()) + 1)
    rev = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tok.added_tokens_decoder.values()} if hasattr(tok, "added_tokens_decoder") else {}
    tokens, types = [], []
    for i in range(n):
        t = rev.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    mt = config.model_type
    pre = "qwen2" if mt.startswith("qwen") else ("smollm" if config.vocab_size == 49152 else ("llama-bpe" if config.vocab_size >= 128000 else "default"))
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)


def check_config(config, spec: QuantSpec) -> str:
    """Refuse, from the config alone (before any weight is read), what this writer cannot express; returns
    the ``gguf.MODEL_ARCH`` member name."""
    arch_key = ARCHES.get(config.model_type)
    if arch_key is None:
        raise QatlmError(f"GGUF export supports the {', '.join(sorted(set(ARCHES)))} architectures; this model is '{config.model_type}'")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise QatlmError(f"GGUF export does not handle rope scaling '{rope.get('rope_type', rope.get('type'))}' yet")
    if spec.group_size != -1:
        check_grid(spec, spec.group_size, "every layer")
    return arch_key


def write_gguf(model, spec: QuantSpec, src: Path, out_file: Path, float_type: str = "f16") -> dict:
    """Write the loaded packed ``model`` (from ``src``) to ``out_file``; returns a report."""
    import gguf

    from qatlm.quant.linear import PackedLinear

    config = model.config
    arch_key = check_config(config, spec)
    arch = getattr(gguf.MODEL_ARCH, arch_key)
    n_layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(arch, n_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    permute = arch_key == "LLAMA"
    ftype = {"f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16), "f32": (np.float32, gguf.LlamaFileType.ALL_F32)}
    if float_type not in ftype:
        raise QatlmError(f"--float-type must be f16 or f32, not {float_type}")
    fdtype = ftype[float_type][0]

    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(src.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta:
        writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if ggml_type_for(spec) == "Q4_1" else
                         gguf.LlamaFileType.MOSTLY_Q4_0 if ggml_type_for(spec) == "Q4_0" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_meta(writer, src, config, gguf)

    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    report = {"format": "gguf", "arch": gguf.MODEL_ARCH_NAMES[arch], "ggml_type": ggml_type_for(spec), "tensors": 0,
              "max_abs_error": 0.0, "max_error_in_steps": 0.0, "layers": {}}
    expected = {}  # gguf name -> the float weight the file must decode to
    sd = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    done = set()
    for mod_name, layer in packed.items():
        gname = names.get_name(mod_name)
        if gname is None:
            raise QatlmError(f"GGUF export: no llama.cpp tensor for layer {mod_name}")
        q, z, _ = layer.integers()
        s16 = layer.scales.t().contiguous()
        w = dequantize(q, s16.float(), z, spec)
        if permute and mod_name.endswith(("q_proj", "k_proj")):
            perm = _llama_permute(layer.out_features, n_head if mod_name.endswith("q_proj") else n_kv)
            q, z, s16, w = q[perm], z[perm], s16[perm], w[perm]
        data, kind = encode_layer(q.cpu(), z.cpu(), s16.cpu(), spec, mod_name)
        writer.add_tensor(gname + ".weight", data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        expected[gname + ".weight"] = (w, s16)
        done.add(mod_name + ".weight")
        for k in ("qweight", "qzeros", "scales", "g_idx"):
            done.add(f"{mod_name}.{k}")
        if layer.bias is not None:
            b = layer.bias.detach().float().cpu()
            if permute and mod_name.endswith(("q_proj", "k_proj")):
                b = b[perm]
            writer.add_tensor(gname + ".bias", b.numpy().astype(np.float32))
            expected[gname + ".bias"] = (b, None)
            done.add(mod_name + ".bias")
    for key, t in sd.items():
        if key in done or (tied and key == "lm_head.weight"):
            continue
        base, _, suffix = key.rpartition(".")
        gname = names.get_name(base)
        if gname is None:
            if "rotary" in key:
                continue
            raise QatlmError(f"GGUF export: no llama.cpp tensor for {key}")
        a = t.detach().float().cpu()
        if permute and base.endswith(("q_proj", "k_proj")):
            a = a[_llama_permute(a.shape[0], n_head if base.endswith("q_proj") else n_kv)]
        arr = a.numpy().astype(fdtype if a.dim() == 2 else np.float32)
        writer.add_tensor(f"{gname}.{suffix}", arr)
        expected[f"{gname}.{suffix}"] = (torch.from_numpy(arr.astype(np.float32)), None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    # read every tensor back with gguf's own dequantizer and compare with what it must hold
    reader = gguf.GGUFReader(str(out_file))
    for t in reader.tensors:
        want, s16 = expected.pop(t.name)
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(want.shape))
        err = (got - want.float()).abs().max().item()
        if s16 is None:  # float tensors: exact in f32, rounded in f16
            report["float_max_abs_error"] = max(report.get("float_max_abs_error", 0.0), err)
        else:
            report["max_abs_error"] = max(report["max_abs_error"], err)
            steps = ((got - want.float()).abs() / expand_groups(s16.float(), spec, want.shape[1])).max().item()
            report["max_error_in_steps"] = max(report["max_error_in_steps"], steps)
            report["layers"][t.name] = {"type": t.tensor_type.name, "max_abs_error": err}
        report["tensors"] += 1
    if expected:
        raise QatlmError(f"GGUF export: tensors missing from the written file: {sorted(expected)[:3]}")
    return report
