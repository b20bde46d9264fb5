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

A uniform 2/3-bit grid is written losslessly in the 4-bit container (GGML's own 2/3-bit types,
Q2_K/Q3_K, have 16-weight sub-blocks with 4-bit-quantized scales and cannot hold those step sizes
exactly); the report says so and gives the size. To get llama.cpp's 2/3-bit sizes, train on its grid:
``--grid q2_k|q3_k|q4_k|q5_k|q6_k|q4_0|q5_0|q5_1|q8_0`` (``quant/kquant.py``) stores each layer as those blocks themselves,
which are written to the file as they are (rows permuted like any other tensor's), bit-exact. Every written tensor is read back with the ``gguf``
package's own dequantizer and compared with the source weights; the maximum error is reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qatlm.errors import QatlmError
from qatlm.quant.grid import QuantSpec, dequantize, expand_groups
from qatlm.quant.kquant import KPackedLinear, decode, unpack_blocks

QK = 32  # weights per GGML block
# families llama.cpp runs under another architecture's name (its converter writes Mistral as llama)
RUNS_AS = {"mistral": "llama", "mixtral": "llama"}


def gguf_arch(model_type: str):
    """The ``gguf.MODEL_ARCH`` of a transformers ``model_type``, from the gguf package's own architecture names
    (``qwen2_moe`` -> qwen2moe, ``gemma3_text`` -> gemma3); None when llama.cpp has no such architecture."""
    import gguf

    name = RUNS_AS.get(model_type, model_type).removesuffix("_text").replace("_", "")
    return next((arch for arch, n in gguf.MODEL_ARCH_NAMES.items() if n == name), None)


def module_of(tensor_name: str) -> tuple[str, str]:
    """``model.layers.0.self_attn.q_proj.qweight`` -> (``model.layers.0.self_attn.q_proj``, ``weight``): packed
    tensors of a layer are one GGUF weight."""
    base, _, suffix = tensor_name.rpartition(".")
    return base, ("weight" if suffix in ("qweight", "qzeros", "scales", "g_idx") else suffix)


_EXPERT_LAYER = re.compile(r"^(?P<head>.*\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)$")


def stacked_name(module: str) -> tuple[str, int | None]:
    """``...mlp.experts.3.gate_proj`` -> (``...mlp.experts.gate_proj``, 3): llama.cpp stacks each block's experts into
    one tensor, which the gguf package's map names by the stacked module; other modules are their own name."""
    m = _EXPERT_LAYER.match(module)
    return (f"{m['head']}.{m['proj']}", int(m["e"])) if m else (module, None)


def gguf_name(names, module: str) -> str | None:
    return names.get_name(stacked_name(module)[0])


def unmapped_tensors(arch, n_layers: int, tensor_names) -> list[str]:
    """Checkpoint tensors that have no llama.cpp tensor in the gguf package's name map for ``arch``."""
    import gguf

    names = gguf.get_tensor_name_map(arch, n_layers)
    return sorted({n for n in tensor_names if "rotary" not in n and gguf_name(names, module_of(n)[0]) is None})


def ggml_type_for(spec: QuantSpec) -> str:
    if spec.kformat is not None:
        return spec.kformat.name
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


def encode_packed(layer, perm: torch.Tensor | None, name: str):
    """One packed layer as GGML rows: (bytes [out, row bytes], GGML type, the float weight the file must decode
    to, the per-weight step to measure errors in), rows permuted by ``perm`` if given."""
    if isinstance(layer, KPackedLinear):
        data = layer.kblocks if perm is None else layer.kblocks[perm]
        parts = unpack_blocks(data, layer.spec, layer.in_features)  # decoded once: the weight and its steps
        step = expand_groups(parts["s"].abs(), layer.spec, layer.in_features)
        return data.cpu().numpy(), layer.spec.kformat.name, decode(parts, layer.spec, layer.in_features), step
    spec = layer.spec
    q, z, _ = layer.integers()
    s16 = layer.scales.t().contiguous()
    w = dequantize(q, s16.float(), z, spec)
    if perm is not None:
        q, z, s16, w = q[perm], z[perm], s16[perm], w[perm]
    data, kind = encode_layer(q.cpu(), z.cpu(), s16.cpu(), spec, name)
    return data, kind, w, expand_groups(s16.float(), spec, layer.in_features)


def _llama_permute(n_out: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's llama graph expects for q/k (its rotary pairs adjacent channels)."""
    idx = torch.arange(n_out)
    return idx.reshape(n_head, 2, n_out // n_head // 2).transpose(1, 2).reshape(n_out)


def _tokenizer_meta(writer, src: Path, config, gguf):
    tj = src / "tokenizer.json"
    if not tj.exists():
        raise QatlmError(f"{src} has no tokenizer.json; GGUF export needs the tokenizer (a BPE tokenizer.json)")
    tj_data = json.loads(tj.read_text())
    model = tj_data.get("model", {})
    # two tokenizer families llama.cpp reads: byte-level BPE (GPT-2 style: SmolLM, Llama-3, Qwen) and SentencePiece
    # BPE with byte fallback (Llama-2, Mistral, Gemma, Phi-3), whose HF form is a BPE with ``byte_fallback``
    spm = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    if model.get("type") != "BPE" or ((src / "tokenizer.model").exists() and "merges" not in model):
        raise QatlmError(f"GGUF export supports byte-level BPE and SentencePiece-BPE tokenizers; this one is {model.get('type')}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    vocab = tok.get_vocab()
    n = config.vocab_size  # llama.cpp wants one token per embedding row: ids past the embedding cannot be used anyway
    rev = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tok.added_tokens_decoder.values()} if hasattr(tok, "added_tokens_decoder") else {}
    unk = model.get("unk_token")
    tokens, types, scores = [], [], []
    for i in range(n):
        t = rev.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added and t != unk:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.UNKNOWN if t == unk else
                         gguf.TokenType.BYTE if spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">") else gguf.TokenType.NORMAL)
        # SentencePiece BPE merges the pair whose result scores highest; its pieces are numbered in merge order
        scores.append(0.0 if types[-1] != gguf.TokenType.NORMAL else -float(i))
    if spm:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_adds_space_prefix(tj_data))
    else:
        writer.add_tokenizer_model("gpt2")
        mt = config.model_type
        pre = ("qwen2" if mt.startswith("qwen") else
               "smollm" if config.vocab_size == 49152 else "llama-bpe" if config.vocab_size >= 128000 else "default")
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=len(tokens))  # llama.cpp reads SentencePiece scores; transformers the merges
    special.add_to_gguf(writer, quiet=True)


def _adds_space_prefix(tj: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts '▁' before the first word (SentencePiece's add_dummy_prefix): a
    ``Prepend('▁')`` normalizer, or a ``Metaspace`` pre-tokenizer whose prepend scheme is not 'never'."""
    def walk(node):
        if isinstance(node, dict):
            yield node
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)
    for part in (tj.get("normalizer"), tj.get("pre_tokenizer")):
        for n in walk(part):
            if n.get("type") == "Prepend" and n.get("prepend") == "▁":
                return True
            if n.get("type") == "Metaspace" and n.get("prepend_scheme", "always" if n.get("add_prefix_space", True) else "never") != "never":
                return True
    return False


def _rope_dicts(config) -> list[dict]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return [v for v in rope.values() if isinstance(v, dict)] or [rope]  # one dict, or one per layer type (Gemma 3)


def check_config(config, spec: QuantSpec, tensor_names=None):
    """Refuse, from the config and the checkpoint's tensor names alone (before any weight is read), what this
    writer cannot express; returns the ``gguf.MODEL_ARCH``."""
    import gguf

    arch = gguf_arch(config.model_type)
    if arch is None:
        raise QatlmError(f"GGUF export: llama.cpp has no architecture for '{config.model_type}' (the gguf package knows "
                         f"{len(gguf.MODEL_ARCH_NAMES)} architectures, none of this name)")
    for rope in _rope_dicts(config):
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise QatlmError(f"GGUF export does not handle rope scaling '{rope.get('rope_type', rope.get('type'))}' yet")
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar and arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if scalar not in (head_dim, config.hidden_size // config.num_attention_heads):
            # llama.cpp's Gemma graphs do not read the attention scale from the file (measured: logits off by 70 %)
            raise QatlmError(f"GGUF export: llama.cpp scales Gemma's attention by 1/sqrt(head_dim) (or hidden/heads for 27B); "
                             f"this config's query_pre_attn_scalar {scalar} is neither {head_dim} nor "
                             f"{config.hidden_size // config.num_attention_heads}, so llama.cpp would compute another model")
    if tensor_names is not None:
        bad = unmapped_tensors(arch, config.num_hidden_layers, tensor_names)
        if bad:
            experts = [module_of(n)[0] for n in bad if ".experts." in n]
            what = (f"mixture-of-experts layers such as {experts[0]} are not exported to GGUF yet (llama.cpp stacks each "
                    "block's experts into one tensor)" if experts else
                    f"{len(bad)} tensors (e.g. {bad[0]}) have no llama.cpp tensor in the gguf package's map for "
                    f"{gguf.MODEL_ARCH_NAMES[arch]}")
            raise QatlmError(f"GGUF export: {what}")
    if spec is not None and spec.kformat is None and spec.group_size != -1:
        check_grid(spec, spec.group_size, "every layer")
    return arch


def norm_offset(module) -> float:
    """1.0 for a norm layer that scales by ``1 + weight`` (Gemma's RMSNorm: llama.cpp stores ``weight + 1``),
    0.0 for one that scales by ``weight``; found by running the layer with its weight set to zero."""
    import copy

    probe = copy.deepcopy(module).float()
    with torch.no_grad():
        probe.weight.zero_()
        y = probe(torch.randn(2, probe.weight.shape[0]))
    return 1.0 if bool(y.abs().max() > 0) else 0.0


def _hparams(writer, config, arch_name: str, n_head: int, head_dim: int):
    """Hyperparameters under the keys llama.cpp reads: the ones transformers' GGUF reader maps back to this
    config (``GGUF_CONFIG_MAPPING``), and those config attributes llama.cpp needs beside them."""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:  # older transformers: the keys every dense decoder needs
        GGUF_CONFIG_MAPPING = {}
    mt = config.model_type.removesuffix("_text")
    mapping = GGUF_CONFIG_MAPPING.get(mt) or GGUF_CONFIG_MAPPING.get(RUNS_AS.get(mt, mt)) or {}
    ropes = getattr(config, "rope_parameters", None) or {}
    theta_full = (ropes.get("full_attention") or ropes).get("rope_theta", getattr(config, "rope_theta", None))
    theta_swa = (ropes.get("sliding_attention") or {}).get("rope_theta")
    partial = (_rope_dicts(config)[0].get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0)
    computed = {"rope.dimension_count": int(head_dim * partial), "rope.freq_base": theta_full, "attention.key_length": head_dim}
    values = {"context_length": config.max_position_embeddings, "block_count": config.num_hidden_layers,
              "feed_forward_length": config.intermediate_size, "embedding_length": config.hidden_size,
              "attention.head_count": n_head, "attention.head_count_kv": config.num_key_value_heads,
              "attention.layer_norm_rms_epsilon": config.rms_norm_eps, "vocab_size": config.vocab_size,
              "attention.key_length": head_dim, "attention.value_length": head_dim, **computed}
    for key, attr in mapping.items():
        if key in computed:
            continue
        v = getattr(config, attr, None) if attr else None
        if v is not None:
            values[key] = v
    for key, v in values.items():
        if v is None:
            continue
        full = f"{arch_name}.{key}"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, int):
            writer.add_uint32(full, int(v))
        else:
            writer.add_float32(full, float(v))
    # what llama.cpp needs beyond transformers' mapping, read from the config attribute of the same meaning
    if theta_swa is not None:
        writer.add_rope_freq_base_swa(float(theta_swa))
    if getattr(config, "sliding_window", None) and "attention.sliding_window" not in values:
        writer.add_sliding_window(int(config.sliding_window))
    types = getattr(config, "layer_types", None)
    if types and getattr(config, "sliding_window", None):
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    for attr, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                      ("final_logit_softcapping", writer.add_final_logit_softcapping)):
        if getattr(config, attr, None):
            add(float(getattr(config, attr)))
    for attr, key in (("num_experts", "expert_count"), ("num_local_experts", "expert_count"), ("num_experts_per_tok", "expert_used_count"),
                      ("moe_intermediate_size", "expert_feed_forward_length"),
                      ("shared_expert_intermediate_size", "expert_shared_feed_forward_length")):
        v = getattr(config, attr, None)
        if isinstance(v, int) and key not in values and v > 0:
            writer.add_uint32(f"{arch_name}.{key}", v)
            values[key] = v
    if isinstance(getattr(config, "norm_topk_prob", None), bool) and values.get("expert_count"):
        writer.add_bool(f"{arch_name}.expert_weights_norm", config.norm_topk_prob)  # renormalise the chosen experts' weights
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar and scalar != head_dim:
        writer.add_attention_scale(float(scalar) ** -0.5)


@dataclass
class _GGUFJob:
    """One export: the writer, the model's tensor-name map and rotary layout, and what the file must decode to."""

    writer: object
    names: object
    n_head: int
    n_kv: int
    permute: bool  # llama.cpp's llama graph pairs adjacent rotary channels
    expected: dict = field(default_factory=dict)  # gguf name -> (the float tensor it must decode to, step sizes or None)
    done: set = field(default_factory=set)  # state-dict keys written

    def rows(self, name: str, n_rows: int):
        """The row order of q_proj / k_proj in llama.cpp's rotary layout (None: unchanged)."""
        if self.permute and name.endswith(("q_proj", "k_proj")):
            return _llama_permute(n_rows, self.n_head if name.endswith("q_proj") else self.n_kv)
        return None


def _write_header(writer, config, arch, spec, src: Path, float_type: str, gguf) -> str:
    """Architecture, hyper-parameters, file type and tokenizer; returns the GGML type of the quantized layers."""
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    writer.add_name(src.name)
    n_head = config.num_attention_heads
    _hparams(writer, config, arch_name, n_head, getattr(config, "head_dim", None) or config.hidden_size // n_head)
    kind = ggml_type_for(spec) if spec is not None else float_type.upper()
    float_ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}[float_type]
    writer.add_file_type(float_ftype if spec is None else
                         getattr(gguf.LlamaFileType, "MOSTLY_" + {"Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}.get(kind, kind)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_meta(writer, src, config, gguf)
    return kind


def _write_packed(job: _GGUFJob, packed: dict, gguf) -> dict:
    """Every packed layer as its GGML blocks (stacked experts are collected and returned, not yet written)."""
    stacks: dict[str, dict] = {}  # gguf name -> {expert: (bytes, weight, step sizes, type)}
    for mod_name, layer in packed.items():
        gname = gguf_name(job.names, mod_name)
        if gname is None:
            raise QatlmError(f"GGUF export: no llama.cpp tensor for layer {mod_name}")
        perm = job.rows(mod_name, layer.out_features)
        data, kind, w, step = encode_packed(layer, perm, mod_name)
        expert = stacked_name(mod_name)[1]
        if expert is not None:
            if layer.bias is not None:
                raise QatlmError(f"GGUF export: expert layer {mod_name} has a bias, which llama.cpp's stacked experts lack")
            stacks.setdefault(gname, {})[expert] = (data, w, step, kind)
        else:
            job.writer.add_tensor(gname + ".weight", data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
            job.expected[gname + ".weight"] = (w, step)
        job.done.update(f"{mod_name}.{k}" for k in ("weight", "qweight", "qzeros", "scales", "g_idx", "kblocks"))
        if layer.bias is not None:
            b = layer.bias.detach().float().cpu()
            b = b[perm] if perm is not None else b
            job.writer.add_tensor(gname + ".bias", b.numpy().astype(np.float32))
            job.expected[gname + ".bias"] = (b, None)
            job.done.add(mod_name + ".bias")
    return stacks


def _write_stacks(job: _GGUFJob, stacks: dict, gguf) -> None:
    """Stacked experts: [experts, out, bytes per row], one tensor per block and projection."""
    for gname, experts in stacks.items():
        order = sorted(experts)
        if order != list(range(len(order))):
            raise QatlmError(f"GGUF export: {gname} is missing experts (has {order[:8]}...)")
        kinds = {experts[e][3] for e in order}
        if len(kinds) > 1:
            raise QatlmError(f"GGUF export: the experts of {gname} are stored in different types {sorted(kinds)}")
        job.writer.add_tensor(gname + ".weight", np.stack([experts[e][0] for e in order]),
                              raw_dtype=getattr(gguf.GGMLQuantizationType, kinds.pop()))
        job.expected[gname + ".weight"] = (torch.cat([experts[e][1] for e in order]), torch.cat([experts[e][2] for e in order]))


def _write_floats(job: _GGUFJob, model, fdtype, tied: bool) -> None:
    """Every tensor that is not a packed layer (embeddings, norms, head, routers) in float."""
    offsets = {n: o for n, m in model.named_modules() if "norm" in type(m).__name__.lower()
               and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1 and (o := norm_offset(m))}
    for key, t in model.state_dict().items():
        if key in job.done or (tied and key == "lm_head.weight"):
            continue
        base, _, suffix = key.rpartition(".")
        gname = job.names.get_name(base)
        if gname is None:
            if "rotary" in key:
                continue
            raise QatlmError(f"GGUF export: no llama.cpp tensor for {key}")
        a = t.detach().float().cpu()
        if suffix == "weight" and base in offsets:
            a = a + offsets[base]  # Gemma's norms scale by 1 + weight; llama.cpp stores weight + 1
        perm = job.rows(base, a.shape[0])
        a = a[perm] if perm is not None else a
        if a.dim() == 2 and a.shape[0] == 1:
            a = a[0]  # a one-row matrix (the shared-expert gate) is one of llama.cpp's vectors
        arr = a.numpy().astype(fdtype if a.dim() == 2 else np.float32)
        job.writer.add_tensor(f"{gname}.{suffix}", arr)
        job.expected[f"{gname}.{suffix}"] = (torch.from_numpy(arr.astype(np.float32)), None)


def _verify(out_file: Path, expected: dict, report: dict, gguf) -> dict:
    """Read every tensor back with gguf's own dequantizer and compare with what it must hold."""
    reader = gguf.GGUFReader(str(out_file))
    for t in reader.tensors:
        want, s16 = expected.pop(t.name)
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(want.shape))
        # (stacked experts come back [experts, out, in]; ``want`` holds them as [experts·out, in])
        err = (got - want.float()).abs().max().item()
        if s16 is None:  # float tensors: exact in f32, rounded in f16
            report["float_max_abs_error"] = max(report.get("float_max_abs_error", 0.0), err)
        else:
            report["max_abs_error"] = max(report["max_abs_error"], err)
            steps = ((got - want.float()).abs() / s16.clamp_min(1e-30)).max().item()
            report["max_error_in_steps"] = max(report["max_error_in_steps"], steps)
            report["layers"][t.name] = {"type": t.tensor_type.name, "max_abs_error": err}
        report["tensors"] += 1
    if expected:
        raise QatlmError(f"GGUF export: tensors missing from the written file: {sorted(expected)[:3]}")
    return report


def write_gguf(model, spec: QuantSpec | None, src: Path, out_file: Path, float_type: str = "f16") -> dict:
    """Write the loaded packed ``model`` (from ``src``) to ``out_file``, read it back with gguf's dequantizer, and
    return a report. ``spec`` None: a full-precision model, every tensor in ``float_type`` (the input llama.cpp's
    own quantizer takes)."""
    import gguf

    from qatlm.quant.linear import PackedLinear

    config = model.config
    arch = check_config(config, spec)
    if float_type not in ("f16", "f32"):
        raise QatlmError(f"--float-type must be f16 or f32, not {float_type}")
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[arch])
    kind = _write_header(writer, config, arch, spec, src, float_type, gguf)
    job = _GGUFJob(writer, gguf.get_tensor_name_map(arch, config.num_hidden_layers), config.num_attention_heads,
                   config.num_key_value_heads, arch == gguf.MODEL_ARCH.LLAMA)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    _write_stacks(job, _write_packed(job, packed, gguf), gguf)
    _write_floats(job, model, np.float16 if float_type == "f16" else np.float32, getattr(config, "tie_word_embeddings", False))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = {"format": "gguf", "arch": gguf.MODEL_ARCH_NAMES[arch], "ggml_type": kind, "tensors": 0,
              "max_abs_error": 0.0, "max_error_in_steps": 0.0, "layers": {}}
    return _verify(out_file, job.expected, report, gguf)
