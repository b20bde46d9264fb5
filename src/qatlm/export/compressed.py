"""compressed-tensors ``pack-quantized`` (the format vLLM and transformers' compressed-tensors
integration read), built with the ``compressed-tensors`` library's own compressor and config models.

Per quantized linear: ``weight_packed`` (int32, 32/bits codes per word along the input dimension),
``weight_scale`` (fp16, ``[out, groups]``), ``weight_zero_point`` (asymmetric only; packed along the
output dimension) and ``weight_shape``. Codes and zeros are stored signed (q − 2^(b−1)); the weight
is ``scale · (q − zero)`` in both conventions, so the export is exact.
"""

from __future__ import annotations

import torch

from qatlm.errors import QatlmError
from qatlm.quant.grid import dequantize


def _lib():
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError:
        raise QatlmError("compressed-tensors export needs the compressed-tensors package: pip install 'qatlm[export]'") from None
    return PackedQuantizationCompressor, QuantizationArgs, QuantizationConfig, QuantizationScheme


def scheme_for(spec, targets=("Linear",)):
    _, QuantizationArgs, _, QuantizationScheme = _lib()
    kw = {"strategy": "channel"} if spec.group_size == -1 else {"strategy": "group", "group_size": spec.group_size}
    args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.sym, dynamic=False, **kw)
    return QuantizationScheme(targets=list(targets), weights=args)


def compress_layer(layer, scheme) -> dict:
    """The pack-quantized tensors of one ``PackedLinear``."""
    Compressor = _lib()[0]
    spec = layer.spec
    if spec.group_size != -1 and layer.in_features % spec.group_size:
        raise QatlmError(f"compressed-tensors needs the group size to divide the input width ({layer.in_features} % {spec.group_size})")
    q, z, _ = layer.integers()
    s16 = layer.scales.t().contiguous()
    w = dequantize(q, s16.float(), z, spec)
    off = 2 ** (spec.bits - 1)
    sd = {"weight": w, "weight_scale": s16}
    if not spec.sym:
        sd["weight_zero_point"] = (z - off).to(torch.int8)
    out = Compressor.compress(sd, scheme)
    # the library re-quantized the exact grid weights: check, with its own unpacker, that it stored our integers
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    codes = unpack_from_int32(out["weight_packed"], spec.bits, q.shape).to(torch.int64)
    same = torch.equal(codes, q.to(torch.int64) - off)
    if not spec.sym:
        zp = unpack_from_int32(out["weight_zero_point"], spec.bits, z.shape, packed_dim=0).to(torch.int64)
        same = same and torch.equal(zp, z.to(torch.int64) - off)
    if not same or not torch.equal(out["weight_scale"], s16):
        raise QatlmError("compressed-tensors did not store this layer's integers exactly; refusing a lossy export")
    return out


def quantization_config(schemes: list, ignore: list[str]) -> dict:
    """The config of a pack-quantized model: one config group per scheme (a mixed model's grids each name their layers)."""
    _, _, QuantizationConfig, _ = _lib()
    cfg = QuantizationConfig(config_groups={f"group_{i}": s for i, s in enumerate(schemes)}, format="pack-quantized",
                             quantization_status="compressed", ignore=ignore)
    return cfg.model_dump(exclude_none=True)
