"""Which export each serving runtime loads for a given checkpoint, or why none does.

One table of facts, measured by ``bench/runtimes.py`` (its results are ``bench/results/runtimes.md``), read by
``qatlm export --for RUNTIME``, the closing lines of ``qatlm quantize`` / ``qatlm info`` and the model card, so that
every hint names an export that the runtime really loads:

- **vLLM** (CPU build 0.32: the CPUWNA16 kernel, 4-bit codes only; on GPUs Marlin also takes 8-bit, not checked
  here): 4-bit weights, every layer's input width a multiple of the group size (a grid whose last group is short
  is written in smaller groups that divide, each group's step size repeated: exact). qatlm writes compressed-tensors ``pack-quantized`` (symmetric and
  asymmetric; vLLM's GPTQ path takes symmetric grids only) and declares ``float16`` in the config: under vLLM's
  default ``dtype=auto`` a float32 config is served in bf16, which rounds the fp16 step sizes (held-out perplexity
  +4.9 % on SmolLM2); in fp16 the step sizes are exact.
- **llama.cpp**: GGUF, every grid but asymmetric 8-bit (Q8_0 is symmetric); K-quant grids bit-exactly in their own
  types; 2/3-bit uniform grids held losslessly in 4-bit blocks, about 5 bits per weight.
- **transformers**: GPTQ through gptqmodel (``qatlm install gptq``), every uniform grid whose group size divides
  every layer's width (gptqmodel's kernels refuse a short last group); the other grids and the K-quant checkpoints
  through transformers' GGUF reader (which dequantizes to full precision).
"""

from __future__ import annotations

from dataclasses import dataclass

from qatlm.errors import QatlmError

RUNTIMES = ("vllm", "llama.cpp", "transformers")
_ALIASES = {"vllm": "vllm", "llama.cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp", "gguf": "llama.cpp",
            "transformers": "transformers", "hf": "transformers"}


@dataclass(frozen=True)
class Route:
    """How one runtime serves one checkpoint: the export ``format`` (None: no export it loads) and the ``dtype`` the
    export declares for that runtime; ``why``: the reason there is none, or a note on the one there is."""

    runtime: str
    format: str | None
    dtype: str | None = None
    why: str = ""
    regroup: int | None = None  # written with this smaller group size (each of the grid's groups split: exact)

    def hint(self, path: str = "DIR") -> str:
        """One line for a person: the command that makes this runtime's export, or why there is none."""
        name = {"vllm": "vLLM", "llama.cpp": "llama.cpp", "transformers": "transformers"}[self.runtime]
        if self.format is None:
            return f"{name}: none ({self.why})"
        return f"{name}: qatlm export {path} --for {self.runtime} --out DIR ({self.format}" + (f"; {self.why})" if self.why else ")")


def runtime_name(name: str) -> str:
    r = _ALIASES.get(str(name).strip().lower())
    if r is None:
        raise QatlmError(f"unknown runtime '{name}' for --for; choose one of {', '.join(RUNTIMES)}")
    return r


def _ragged(spec, widths) -> list[int]:
    """Input widths that the group size does not divide (their last group is short)."""
    if spec.group_size == -1:
        return []
    return sorted({w for w in widths if w % spec.group_size})


def regroup_size(spec, widths) -> int | None:
    """For a grid whose group size leaves a short last group in some layer (576 wide at g128: 4 groups and a half),
    the largest group size that divides the grid's and every width, a multiple of 32 as the kernels want; each
    group of the grid is then written as g/g' groups with the same step size and zero point: the same weights,
    exactly, at a little more storage. None where nothing needs it, or nothing fits."""
    import math

    if not _ragged(spec, widths):
        return None
    g = math.gcd(spec.group_size, *widths)
    return g if g >= 32 and g % 32 == 0 else None


def _split(spec, widths, runtime: str) -> str:
    g = regroup_size(spec, widths)
    return (f"written in groups of {g}: each {spec.group_size}-group split, same step sizes, exact; {runtime}'s kernels need "
            f"the group size to divide every input width ({spec.group_size} does not divide {', '.join(map(str, _ragged(spec, widths)))})")


MOE_WIDTH = -1  # in ``widths``: the checkpoint has quantized mixture-of-experts layers


def route(runtime: str, spec, widths=()) -> Route:
    """The route for ``runtime`` (see the module text) for a checkpoint on grid ``spec`` whose quantized layers have
    the input ``widths`` (``MOE_WIDTH`` among them: quantized experts). A mixed-precision grid goes where every one of
    its layer grids goes, in one format."""
    if getattr(spec, "layers", ()):
        return _mixed_route(runtime, spec, widths)
    runtime = runtime_name(runtime)
    moe = MOE_WIDTH in widths
    widths = [w for w in widths if w != MOE_WIDTH]
    if moe and runtime == "vllm":  # measured: "No WNA16 MoE backend supports the deployment configuration"
        return Route(runtime, None, why="vLLM's CPU build has no backend for quantized mixture-of-experts layers; use --for llama.cpp")
    if moe and runtime == "transformers":  # measured: gptqmodel refuses the 1-wide shared-expert gate, the GGUF reader the experts
        return Route(runtime, None, why="transformers does not load these quantized mixture-of-experts layers (gptqmodel refuses "
                                        "the 1-wide shared-expert gate; its GGUF reader the stacked experts); use --for llama.cpp")
    if runtime == "llama.cpp":
        if spec.kformat is None and spec.bits == 8 and not spec.sym:
            return Route(runtime, None, why="llama.cpp's 8-bit type (Q8_0) is symmetric: an asymmetric 8-bit grid fits it only where "
                                            "every code minus its zero point fits int8 (--format gguf checks that); quantize with --sym")
        lossless = spec.kformat is None and spec.bits in (2, 3)
        return Route(runtime, "gguf", why=f"{spec.bits}-bit codes held losslessly in 4-bit blocks, ~5 bits per weight; "
                                          "for llama.cpp's own 2/3-bit sizes quantize with --grid q2_k|q3_k" if lossless else "")
    if runtime == "transformers":
        if spec.kformat is not None:
            return Route(runtime, "gguf", why="transformers' GGUF reader dequantizes to full precision")
        bad = _ragged(spec, widths)
        if bad and regroup_size(spec, widths):  # gptqmodel's kernels refuse a short last group
            return Route(runtime, "gptq", why="with gptqmodel: qatlm install gptq; " + _split(spec, widths, "gptqmodel"),
                         regroup=regroup_size(spec, widths))
        if bad:
            return Route(runtime, "gguf", why=f"gptqmodel's kernels need the group size to divide every input width ({spec.group_size} "
                                              f"does not divide {', '.join(map(str, bad))}); transformers' GGUF reader "
                                              "dequantizes to full precision")
        return Route(runtime, "gptq", why="with gptqmodel: qatlm install gptq")
    if spec.kformat is not None:
        return Route(runtime, None, why=f"vLLM's kernels take uniform 4/8-bit grids, not llama.cpp's {spec.format.upper()} "
                                        "blocks; use --for llama.cpp")
    if spec.bits not in (4, 8):
        return Route(runtime, None, why=f"vLLM has no kernel for {spec.bits}-bit weights; use --for llama.cpp, with a K-quant grid "
                                        f"(--grid q{spec.bits}_k) for llama.cpp's {spec.bits}-bit sizes")
    if spec.bits == 8:  # measured: "Quant type (uint8) not supported by CPUWNA16, supported types are: uint4, uint4b8"
        return Route(runtime, None, why="vLLM's CPU build has no kernel for 8-bit weights (its WNA16 kernels take 4-bit codes); "
                                        "on a GPU its Marlin kernels do: --format compressed-tensors (not checked here); "
                                        "or use --for llama.cpp")
    bad = _ragged(spec, widths)
    if bad and regroup_size(spec, widths):
        return Route(runtime, "compressed-tensors", dtype="float16", why=_split(spec, widths, "vLLM"), regroup=regroup_size(spec, widths))
    if bad:
        return Route(runtime, None, why=f"vLLM's kernels need the group size to divide every input width ({spec.group_size} does not "
                                        f"divide {', '.join(map(str, bad))}); quantize with a group size that does, or use --for llama.cpp")
    return Route(runtime, "compressed-tensors", dtype="float16", why="")


# projections vLLM loads as one fused layer (QKVParallelLinear, MergedColumnParallelLinear): one quantization scheme
# for all of them, so a checkpoint that gives them different grids fails its weight loader (measured: vLLM 0.32 CPU)
def _fused_mismatch(spec) -> str | None:
    """Where a mixed checkpoint gives projections vLLM fuses different grids: the first such group, said."""
    from qatlm.model.arch import fused_group

    tags = dict(spec.layers)
    for name in sorted(tags):
        got = {m.rpartition(".")[2]: tags.get(m, spec.plain.tag) for m in fused_group(name)}
        if len(set(got.values())) > 1:
            return ", ".join(f"{m} {t}" for m, t in got.items()) + f" in {name.rpartition('.')[0]}"
    return None


def _mixed_route(runtime: str, spec, widths) -> Route:
    import math

    from qatlm.quant.grid import spec_from_tag

    if spec.kformat is not None and runtime_name(runtime) != "vllm":  # a mix of llama.cpp types exports to GGUF only,
        return route(runtime, spec.plain, widths)  # its Q4_0 / Q8_0 layers included: the K base's route
    grids = sorted({spec.plain, *(spec_from_tag(t, spec) for _, t in spec.layers)}, key=lambda s: s.tag)
    rs = [(g, route(runtime, g, widths)) for g in grids]
    runtime = rs[0][1].runtime
    for g, r in rs:
        if r.format is None:
            return Route(runtime, None, why=f"its {g.tag} layers: {r.why}")
    if runtime == "vllm" and (where := _fused_mismatch(spec)):
        return Route(runtime, None, why=f"vLLM loads q/k/v and gate/up projections as one fused layer with one grid, and "
                                        f"this checkpoint mixes them ({where}); quantize with --tie-fused, or use --for llama.cpp")
    formats = {r.format for _, r in rs}
    if len(formats) > 1:
        return Route(runtime, None, why=f"its layer grids need different formats in {runtime} ({', '.join(sorted(formats))}); "
                                        "use --for llama.cpp")
    regroups = [r.regroup for _, r in rs if r.regroup]
    regroup = math.gcd(*regroups) if regroups else None
    said: dict[str, list[str]] = {}
    for g, r in rs:
        if r.why:
            said.setdefault(r.why, []).append(g.tag)
    why = "; ".join(f"{', '.join(tags)}: {w}" for w, tags in said.items())
    fmt = formats.pop()
    if runtime == "transformers" and fmt == "gptq":  # measured: from_pretrained applies the base grid to every layer
        why = ("load it with gptqmodel's GPTQModel.load (qatlm install gptq), which reads the per-layer grids from the "
               "config's `dynamic`; transformers' from_pretrained gives every layer the base grid and fails"
               + (f"; {why}" if why else ""))
    return Route(runtime, fmt, dtype=rs[0][1].dtype, why=why, regroup=regroup)


def routes(spec, widths=()) -> list[Route]:
    return [route(r, spec, widths) for r in RUNTIMES]


def checkpoint_widths(path) -> list[int]:
    """The input widths of a packed checkpoint's quantized layers, read from the safetensors headers alone."""
    from safetensors import safe_open

    from qatlm.model.checkpoint import read_quant_config, spec_from_config
    from qatlm.model.source import weight_files

    p, qc = read_quant_config(path)
    spec = spec_from_config(qc)
    if spec.kformat is not None:
        return []
    widths = set()
    for f in weight_files(p):
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                if k.endswith(".qweight"):
                    widths.add(fh.get_slice(k).get_shape()[0] * 32 // spec.for_layer(k[: -len(".qweight")], 0).bits)
                    if ".experts." in k:
                        widths.add(MOE_WIDTH)
    return sorted(widths)
