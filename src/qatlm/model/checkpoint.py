"""Loading full-precision models, and saving / loading / describing packed checkpoints.

A qatlm checkpoint is an ordinary Hugging Face folder: ``config.json`` with a GPTQ
``quantization_config`` (``checkpoint_format: gptq_v2``), safetensors weights where every quantized
linear ``X`` is stored as ``X.qweight``/``X.qzeros``/``X.scales``/``X.g_idx`` (+ ``X.bias``), and the
tokenizer. Writing goes to a temporary sibling folder that is renamed into place only when complete.

A K-quant grid (``--grid q2_k|q3_k|q4_k``) is not GPTQ: its ``quantization_config`` says
``quant_method: qatlm_kquant`` and the grid; each K-quant layer ``X`` is stored as ``X.kblocks`` (uint8, the
llama.cpp tensor's rows of GGUF blocks, exported to GGUF as they are), layers of other widths in the GPTQ
tensors of the 4-bit fallback grid. qatlm loads it; llama.cpp and transformers read its GGUF export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qatlm.version import __version__
from qatlm.errors import QatlmError
from qatlm.io import atomic_dir, check_output, write_shards
from qatlm.model.source import check_fp_folder, check_model_dir, default_dtype, load_config, read_config_json, weight_files
from qatlm.model.arch import defuse_experts, is_router
from qatlm.model.layers import swap_layers
from qatlm.quant.grid import K_FORMATS, QuantSpec, spec_from_tag
from qatlm.quant.layers import packed_layer
from qatlm.quant.linear import PackedLinear
from qatlm.quant.packing import v1_zeros_to_v2
from qatlm.summary import RunSummary

SHARD_BYTES = 4 * 1024**3
STREAM_SHARD_BYTES = 512 * 1024**2  # when assembling a lazily loaded model block by block


def source_dtype(model_dir, cache_dir=None, builtin_fp16: bool = True) -> torch.dtype:
    """The dtype a model folder ships its weights in (config.json ``dtype`` / ``torch_dtype``), float32 when
    unsaid; the built-in model (stored here in float32, dequantized from a 4-bit GGUF) counts as float16."""
    if builtin_fp16:
        from qatlm.data.assets import MODEL_NAME, cache_root

        if Path(model_dir).resolve() == (cache_root(cache_dir) / "models" / MODEL_NAME).resolve():
            return torch.float16
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dt = getattr(torch, str(name), None)
    return dt if dt in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def load_tokenizer(path):
    from transformers import AutoTokenizer

    p = Path(path)
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        return None  # a folder without tokenizer files is still a valid model
    try:
        return AutoTokenizer.from_pretrained(p, trust_remote_code=False)
    except Exception as e:  # its files are there but broken: say so instead of dropping the tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QatlmError(f"the tokenizer in {p} does not load: {first}") from None


def load_fp_model(path, dtype: torch.dtype | None = None, device="cpu"):
    """A full-precision causal LM from a local safetensors folder (never unpickles, no remote code)."""
    from transformers import AutoModelForCausalLM

    p, config = check_fp_folder(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            p, dtype=dtype or default_dtype(device), use_safetensors=True, trust_remote_code=False, output_loading_info=True
        )
    except (ValueError, KeyError, RuntimeError) as e:
        if "ignore_mismatched_sizes" in str(e):
            raise QatlmError(f"{p}: the tensor shapes in its safetensors do not match its config.json") from None
        raise QatlmError(f"cannot load {p} as a causal LM: {str(e).strip().splitlines()[0]}") from None
    # transformers fills a missing tensor with random values and only warns: a quantized copy of that is garbage
    missing = [k for k in info.get("missing_keys", []) if not (k.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
    if missing:
        raise QatlmError(f"{p} lacks {len(missing)} weight(s) the {type(model).__name__} needs (e.g. {missing[0]}); "
                         "transformers would fill them with random values")
    if info.get("mismatched_keys"):
        raise QatlmError(f"{p}: tensor shapes do not match config.json (e.g. {info['mismatched_keys'][0][0]})")
    defuse_experts(model)  # MoE: one linear layer per expert, quantized like the others
    return model.to(device).eval()


def _tied_duplicates(sd: dict) -> set[str]:
    """State-dict keys that share storage with an earlier key (tied embeddings)."""
    seen, dup = {}, set()
    for k, v in sd.items():
        if v.device.type == "meta":
            continue
        key = (v.data_ptr(), v.shape, v.dtype)
        if v.numel() and key in seen:
            dup.add(k)
        else:
            seen[key] = k
    return dup


KQUANT_METHOD = "qatlm_kquant"


def layer_grids(model: nn.Module, spec: QuantSpec) -> dict[str, QuantSpec]:
    """The packed layers of ``model`` whose grid is not ``spec``'s own for their width: a mixed model's overrides."""
    base = spec.plain
    return {n: m.spec for n, m in model.named_modules() if isinstance(m, PackedLinear) and m.spec != base.layer_spec(m.in_features)}


def stored_base(model: nn.Module, spec: QuantSpec) -> QuantSpec:
    """The grid a checkpoint names as its base: ``spec``, or, for a mixed model none of whose layers is on ``spec``'s own
    grid (a budget whose menu leaves it out), its most common layer grid, so that every grid the checkpoint names is
    one some layer is on (loaders and ``export --for`` read the base as a grid in use)."""
    if spec.kformat is not None or not spec.mixed:
        return spec
    overrides = layer_grids(model, spec)
    if not overrides or len(overrides) < sum(isinstance(m, PackedLinear) for m in model.modules()):
        return spec
    top = Counter(overrides.values()).most_common(1)[0][0]
    return dataclasses.replace(spec, bits=top.bits, group_size=top.group_size, sym=top.sym)


def dynamic_config(overrides: dict[str, QuantSpec]) -> dict:
    """Per-module overrides as GPTQModel's ``dynamic`` config: an anchored pattern per module name."""
    return {f"+:^{re.escape(n)}$": {"bits": s.bits, "group_size": s.group_size, "sym": s.sym} for n, s in sorted(overrides.items())}


def quantization_config(spec: QuantSpec, meta: dict | None = None, lm_head: bool = False, checkpoint_format: str = "gptq_v2",
                        overrides: dict[str, QuantSpec] | None = None) -> dict:
    meta = dict(meta or {})
    if spec.zero_min:
        meta["zero_min"] = spec.zero_min
    meta.pop("layers", None)
    if overrides:  # a mixed model: qatlm reads its grids from here; GPTQ loaders from "dynamic"
        meta["layers"] = {n: s.tag for n, s in sorted(overrides.items())}
    if spec.target_bpw is not None:
        meta["target_bpw"] = spec.target_bpw
    if spec.kformat is not None:  # rows the type cannot hold: GPTQ tensors of a uniform grid, or blocks of another type
        fb = spec.fallback
        fallback = {"grid": fb.format} if fb.kformat is not None else \
            {"bits": fb.bits, "group_size": fb.group_size, "sym": fb.sym, "format": "gptq_v2"}
        return {"quant_method": KQUANT_METHOD, "grid": spec.format, "bits": spec.bits, "group_size": spec.group_size,
                "fallback": fallback,
                "lm_head": lm_head, "meta": {"quantizer": [f"qatlm:{__version__}"], "qatlm": meta}}
    cfg = {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": spec.sym,
        "desc_act": False,
        "checkpoint_format": checkpoint_format,
        "lm_head": lm_head,
        "meta": {"quantizer": [f"qatlm:{__version__}"], "qatlm": meta},
    }
    if overrides:
        cfg["dynamic"] = dynamic_config(overrides)
    return cfg


def save_quantized(model: nn.Module, out_dir, spec: QuantSpec, tokenizer=None, overwrite: bool = False, meta: dict | None = None,
                   dtype: torch.dtype | None = None, checkpoint_format: str = "gptq_v2", in_place: bool = False,
                   report=None, block_files=None, declare: str | None = None) -> Path:
    """Write ``model`` (whose quantized layers are ``PackedLinear``) as a packed HF checkpoint.

    ``report(folder)``, if given, adds files (training summary, curves) before the folder appears.
    ``block_files``: the work folder where a lazily loaded model's packed blocks were written (streamed in).
    ``dtype``: storage dtype of the tensors that are not quantized (embeddings, norms, head); default:
    as they are in memory. Step sizes are always fp16, as the format requires. ``declare``: the dtype config.json
    names for runtimes that compute in it (storage unchanged).
    """
    out = Path(out_dir).expanduser()
    check_output(out, (), overwrite)
    defuse_experts(model)  # fused experts left in float are stored per expert, as the loader expects them
    packed = [n for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    if not packed:
        raise QatlmError("the model has no packed layers: quantize it before saving")
    spec = stored_base(model, spec)

    def cast(k, v):
        v = v.detach().contiguous().cpu()
        return v.to(dtype) if dtype is not None and v.is_floating_point() and not k.endswith(".scales") else v

    def tensors():
        """Every tensor to store, one at a time: those in memory, then the blocks a lazily loaded model
        left on disk (``block_files``: its work folder), so the whole packed model is never held at once."""
        sd = model.state_dict()
        dup = _tied_duplicates(sd)
        on_disk = set()
        for k, v in sd.items():
            if v.device.type == "meta":
                on_disk.add(k)
            elif k not in dup:
                yield k, cast(k, v)
        if not on_disk:
            return
        from qatlm.model.lazy import block_file, lazy_source

        src = lazy_source(model)
        if src is None or block_files is None:
            raise QatlmError(f"cannot save: {len(on_disk)} tensors (e.g. {min(on_disk)}) are not loaded and no block files were given")
        prefix = src[1] + "."
        for i in sorted({int(k[len(prefix):].split(".")[0]) for k in on_disk}):
            with safe_open(block_file(block_files, i), framework="pt") as fh:
                for k in fh.keys():
                    yield f"{prefix}{i}.{k}", cast(k, fh.get_tensor(k))

    def build(tmp: Path):
        write_shards(tensors(), tmp, SHARD_BYTES if block_files is None else STREAM_SHARD_BYTES)
        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        if dtype is not None or declare is not None:
            cfg["dtype"] = declare or str(dtype).removeprefix("torch.")
        cfg["quantization_config"] = quantization_config(spec, meta, lm_head=any(n.endswith("lm_head") for n in packed),
                                                         checkpoint_format=checkpoint_format, overrides=layer_grids(model, spec))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report(tmp)

    if in_place:
        build(out)
    else:
        atomic_dir(out, build)
    return out


def _weight_files(p: Path) -> list[Path]:
    files = weight_files(p)
    if not files:
        raise QatlmError(f"{p} has no .safetensors weights")
    return files


def weights_size(path) -> int:
    """Bytes of the safetensors weights of a model folder."""
    return sum(f.stat().st_size for f in _weight_files(Path(path)))


def read_quant_config(path) -> tuple[Path, dict]:
    """``(folder, quantization_config)`` of a packed checkpoint, checked against its tensors' shapes and dtypes
    (a hand-edited config is named in one line before anything uses it)."""
    p = check_model_dir(path)
    qc = read_config_json(p).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") not in ("gptq", KQUANT_METHOD):
        raise QatlmError(f"{p} is not a qatlm/GPTQ checkpoint (config.json has no GPTQ quantization_config)")
    _resolve_dynamic(p, qc)
    check_packed_tensors(p, spec_from_config(qc), p.name)
    return p, qc


def _resolve_dynamic(p: Path, qc: dict) -> None:
    """A GPTQ ``dynamic`` config written by another tool: its patterns resolved against this checkpoint's layer names
    into qatlm's per-layer grids (``meta.qatlm.layers``), in place."""
    dyn = qc.get("dynamic")
    meta = qc.setdefault("meta", {}).setdefault("qatlm", {}) if isinstance(qc.get("meta", {}), dict) else {}
    if not isinstance(dyn, dict) or not dyn or "layers" in meta:
        return
    base = spec_from_config(qc)
    names = set()
    for f in _weight_files(p):
        with safe_open(f, framework="pt") as fh:
            names |= {k.rsplit(".", 1)[0] for k in fh.keys() if k.endswith(".qweight")}
    names = sorted(names)
    layers = {}
    for n in names:
        for pat, over in dyn.items():
            if re.match(pat[2:] if pat.startswith(("+:", "-:")) else pat, n):
                if not pat.startswith("-:") and isinstance(over, dict):
                    s = QuantSpec(bits=int(over.get("bits", base.bits)), group_size=int(over.get("group_size", base.group_size)),
                                  sym=bool(over.get("sym", base.sym)))
                    if s != base.plain:
                        layers[n] = s.tag
                break
    meta["layers"] = layers


_DTYPES = {".qweight": "I32", ".qzeros": "I32", ".g_idx": "I32", ".scales": "F16", ".kblocks": "U8"}


def check_packed_tensors(folder: Path, spec: QuantSpec, name: str) -> None:
    """Every packed layer's tensors have the dtypes of the format and the shapes its grid implies: the ``qweight``
    rows give the input width, from which ``scales``, ``qzeros`` and ``g_idx`` follow."""
    heads = {}
    for f in _weight_files(folder):
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                if k.endswith(tuple(_DTYPES)):
                    sl = fh.get_slice(k)
                    heads[k] = (tuple(sl.get_shape()), sl.get_dtype())
    for k, (shape, dtype) in heads.items():
        want = _DTYPES[next(e for e in _DTYPES if k.endswith(e))]
        if dtype != want:
            raise QatlmError(f"{folder}: {k} is stored as {dtype}, not {want}: not a packed checkpoint qatlm can read")
    for k in [k for k in heads if k.endswith(".qweight")]:
        layer = k[: -len(".qweight")]
        grid = spec.stored_grid(layer)
        (rows, out), in_f = heads[k][0], heads[k][0][0] * 32 // grid.bits
        want = {".scales": (grid.num_groups(in_f), out), ".qzeros": (grid.num_groups(in_f), out * grid.bits // 32),
                ".g_idx": (in_f,)}
        bad = [f"{layer}{e} is {list(heads[layer + e][0])}, expected {list(w)}" for e, w in want.items()
               if layer + e in heads and heads[layer + e][0] != w]
        if bad or (rows * 32) % grid.bits:
            raise QatlmError(f"{name}: its quantization_config ({grid.bits}-bit, group {grid.group_size}) does not match its "
                             f"tensors: {bad[0] if bad else k + ' rows'}; was config.json edited?")


def spec_from_config(qc: dict) -> QuantSpec:
    if qc.get("quant_method") == KQUANT_METHOD:
        if qc.get("grid") not in K_FORMATS:
            raise QatlmError(f"unknown K-quant grid {qc.get('grid')!r} in quantization_config (this qatlm knows {', '.join(K_FORMATS)})")
        layers, target = _mixed_meta(qc)
        return QuantSpec(format=qc["grid"], layers=layers, target_bpw=target)
    try:
        zmin = int(((qc.get("meta") or {}).get("qatlm") or {}).get("zero_min", 0))
        bits, group = qc["bits"], qc["group_size"]
        if isinstance(bits, bool) or isinstance(group, bool) or int(bits) != bits or int(group) != group:
            raise ValueError
    except (KeyError, TypeError, ValueError, AttributeError):
        raise QatlmError(f"its quantization_config has no whole-number bits / group_size (bits={qc.get('bits')!r}, "
                         f"group_size={qc.get('group_size')!r})") from None
    layers, target = _mixed_meta(qc)
    return QuantSpec(bits=int(bits), group_size=int(group), sym=bool(qc.get("sym", False)), zero_min=zmin, layers=layers, target_bpw=target)


def _mixed_meta(qc: dict) -> tuple[tuple, float | None]:
    """A mixed checkpoint's per-layer grids and budget, from ``meta.qatlm`` of its quantization_config."""
    qmeta = (qc.get("meta") or {}).get("qatlm") or {}
    layers = qmeta.get("layers") or {}
    target = qmeta.get("target_bpw")
    if not isinstance(layers, dict):
        raise QatlmError("its quantization_config's per-layer grids (meta.qatlm.layers) are not a mapping of layer names to grids")
    return tuple(sorted(layers.items())), float(target) if target is not None else None


def load_quantized(path, dtype: torch.dtype | None = None, device="cpu"):
    """Load a qatlm / GPTQ checkpoint into ``PackedLinear`` layers, without gptqmodel.

    GPTQ v1 checkpoints (stored zeros off by one) are converted to v2 semantics while loading.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    p, qc = read_quant_config(path)
    spec = spec_from_config(qc)
    v1 = qc.get("quant_method") == "gptq" and qc.get("checkpoint_format", "gptq") == "gptq"
    dtype = dtype or default_dtype(device)
    config = load_config(p)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    defuse_experts(model)  # MoE: the per-expert layers the checkpoint stores

    # layers first, from the tensor names alone; then the tensors one at a time, each assigned in place: never
    # a whole-checkpoint dict, and each file mapped only while its tensor is copied out (a mapped shard counts
    # in the process's memory): the peak is the packed model plus one tensor
    from accelerate.utils import set_module_tensor_to_device

    from qatlm.model.lazy import ShardReader

    reader = ShardReader(p)
    keys = set(reader.where)
    names = sorted(k.rsplit(".", 1)[0] for k in keys if k.endswith((".qweight", ".kblocks")))
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise QatlmError(f"{p}: quantized tensor {name}.qweight matches no layer of {type(model).__name__}") from None

    def make(name, old):
        with torch.device("meta"):  # its tensors come from the shards below
            return packed_layer(old.in_features, old.out_features, spec, f"{name}.bias" in keys, dtype=dtype, name=name)
    swap_layers(model, make, names=names)
    expected = set(model.state_dict(keep_vars=True))
    unexpected = sorted(keys - expected)
    if unexpected:
        raise QatlmError(f"{p}: tensors that match no layer: {', '.join(unexpected[:5])}")
    for k in sorted(keys, key=lambda k: (str(reader.where[k]), k)):
        v = reader.get(k)
        if v1 and k.endswith(".qzeros"):
            layer = model.get_submodule(k[: -len(".qzeros")])
            v = v1_zeros_to_v2(v, layer.spec.bits, layer.out_features)
        elif v.is_floating_point() and not k.endswith(".scales") and v.dtype != dtype:
            v = v.to(dtype)
        else:  # safetensors hands out views of the mapped file: copy, so that the file is unmapped and the
            v = v.clone()  # memory the model holds is its own (what a memory budget or a cgroup limit sees)
        set_module_tensor_to_device(model, k, "cpu", value=v, dtype=v.dtype)
        del v
    for m in model.modules():  # g_idx is optional in GPTQ files: without it, the plain group order
        if isinstance(m, PackedLinear) and "g_idx" in m._buffers and m.g_idx.device.type == "meta":
            m.g_idx = m.spec.g_idx(m.in_features)
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise QatlmError(f"{p}: checkpoint lacks {', '.join(missing[:5])}")
    return model.to(device).eval()


def read_run_summary(f: Path) -> RunSummary:
    """A checkpoint's ``training_summary.json``, or one line saying what is wrong with it."""
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise QatlmError(f"{f} is not valid JSON; remove it or restore it from the run") from None
    try:
        return RunSummary.from_dict(d)
    except (KeyError, TypeError, AttributeError):
        raise QatlmError(f"{f} does not hold a run summary (method, stages and each stage's figures)") from None


def training_info(s: RunSummary) -> dict:
    """What ``qatlm info`` shows of a run: the recipe, Block-AP's blocks and mean relative errors, each end-to-end
    stage's validation loss before and after."""
    training = {"method": s.method, "stages": s.stages}
    if s.mixed is not None:
        m = s.mixed
        training["mixed"] = {"target_bpw": m.target_bpw, "bits_per_weight": m.bits_per_weight, "grids": m.grids, "samples": m.samples,
                             "predicted_error": sum(m.predicted_block_errors), "measured_error": sum(m.measured_block_errors)}
    if s.block_ap is not None and s.block_ap.blocks:
        b = s.block_ap.blocks
        training.update(blocks=len(b), steps_per_block=b[0].steps, seconds=s.block_ap.seconds, lr_quant=s.block_ap.lr_quant,
                        lr_weight=s.block_ap.lr_weight, rtn_fallback_blocks=s.block_ap.rtn_fallback_blocks,
                        lr_retried_blocks=s.block_ap.lr_retried_blocks,
                        block_rel_error_rtn_mean=sum(x.rtn_rel_error for x in b) / len(b),
                        block_rel_error_trained_mean=sum(x.trained_rel_error for x in b) / len(b))
    for name, e in (("e2e_qp", s.e2e_qp), ("dl_qat", s.dl_qat)):
        if e is not None and e.val_losses:
            training[f"{name}_val_loss"] = [e.val_loss_before, e.val_loss_after]
            training[f"{name}_steps"] = e.steps
            training[f"{name}_trainable_fraction"] = e.trainable_fraction
    return training


def layer_widths(p: Path) -> dict[str, int]:
    """Input width of every linear layer of a checkpoint's architecture, from its config on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(p)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    defuse_experts(model)
    return {n: m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def kblocks_grid(spec: QuantSpec, layer: str, row_bytes: int, widths) -> QuantSpec:
    """The llama.cpp type of a stored ``.kblocks`` tensor: the layer's own grid in a mix, else the base type or, for a
    width the base cannot hold, its fallback; where the row length fits both, the layer's width (``widths()``) decides."""
    tag = dict(spec.layers).get(layer)
    if tag is not None:
        return spec_from_tag(tag, spec)
    base = spec.plain
    fits = [g for g in dict.fromkeys((base, base.fallback)) if g.kformat is not None and row_bytes % g.kformat.block_bytes == 0]
    return fits[0] if len(fits) == 1 else base.layer_spec(widths()[layer])


def checkpoint_info(path) -> dict:
    """What a checkpoint holds, measured from the files on disk."""
    p, qc = read_quant_config(path)
    spec = spec_from_config(qc)
    disk = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    weights_bytes = weights_size(p)
    n_quant = quant_bytes = n_other = other_bytes = embed_bytes = expert_layers = 0
    grids: dict[str, int] = {}
    widths = functools.cache(lambda: layer_widths(p))  # built once, only if a block tensor's type is ambiguous
    kept, other_dtypes = set(), set()
    for f in _weight_files(p):
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                t = fh.get_slice(k)
                numel = 1
                for d in t.get_shape():
                    numel *= d
                nbytes = numel * {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "U8": 1}.get(t.get_dtype(), 4)
                if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx", ".kblocks")):
                    quant_bytes += nbytes
                    if k.endswith(".qweight"):
                        grid = spec.stored_grid(k[: -len(".qweight")])
                        n_quant += numel * 32 // grid.bits
                        grids[grid.tag] = grids.get(grid.tag, 0) + 1
                        expert_layers += ".experts." in k
                    elif k.endswith(".kblocks"):
                        kgrid = kblocks_grid(spec, k[: -len(".kblocks")], t.get_shape()[-1], widths)
                        n_quant += numel * kgrid.kformat.block // kgrid.kformat.block_bytes
                        grids[kgrid.tag] = grids.get(kgrid.tag, 0) + 1
                        expert_layers += ".experts." in k
                else:
                    n_other += numel
                    other_bytes += nbytes
                    other_dtypes.add(t.get_dtype())
                    if "embed" in k or "lm_head" in k:
                        embed_bytes += nbytes
                    kept.add("embeddings" if "embed" in k else "LM head" if "lm_head" in k else "norms" if "norm" in k
                             else "biases" if k.endswith(".bias") else "routers" if is_router(k.rsplit(".", 1)[0]) else k.rsplit(".", 1)[0])
    fp16_bytes = 2 * (n_quant + n_other)
    meta = qc.get("meta", {}).get("qatlm", {})
    src_dtype = meta.get("source_dtype")
    src_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(src_dtype, 2) * (n_quant + n_other)
    summary_file = p / "training_summary.json"
    training = training_info(read_run_summary(summary_file)) if summary_file.is_file() else None
    return {
        "path": str(p),
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": spec.sym,
        "format": KQUANT_METHOD if spec.kformat else qc.get("checkpoint_format", "gptq"),
        "grid": spec.format,
        "target_bpw": spec.target_bpw,
        "layer_grids": dict(sorted(grids.items())) if spec.mixed else None,  # mixed precision: layers per grid
        "method": meta.get("method", "unknown"),
        "source": meta.get("source"),
        "quantized_params": n_quant,
        "other_params": n_other,
        "kept_in_full_precision": sorted(kept),
        "other_dtype": ", ".join(sorted(d.lower() for d in other_dtypes)),
        "size_on_disk_bytes": disk,
        "weights_bytes": weights_bytes,
        "embedding_bytes": embed_bytes,
        "expert_layers": expert_layers,  # mixture of experts: packed per-expert linear layers
        "embedding_share": embed_bytes / max(weights_bytes, 1),
        "bits_per_quantized_weight": 8 * quant_bytes / max(n_quant, 1),
        "bits_per_weight_all": 8 * weights_bytes / max(n_quant + n_other, 1),
        "fp16_size_bytes": fp16_bytes,
        "compression_vs_fp16": fp16_bytes / max(weights_bytes, 1),
        "source_dtype": src_dtype,
        "compression_vs_source": src_bytes / max(weights_bytes, 1) if src_dtype else None,
        "training": training,
    }
