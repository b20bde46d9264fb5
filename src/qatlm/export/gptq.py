"""GPTQ exports: v2 (qatlm's native layout: stored zeros are the true zeros) and v1 (stored zero − 1).

GPTQ v1 loaders add 1 to every stored zero, so a zero point of 0 cannot be written (it would wrap
to 2^bits − 1 and corrupt the layer). ``--format gptq-v1`` refuses such checkpoints and names the
layers; quantizing with ``--v1-zeros`` keeps every zero point >= 1 so that the v1 export is exact.
"""

from __future__ import annotations

from qatlm.errors import QatlmError
from qatlm.quant.packing import pack_cols


def to_v1_zeros(packed_layers: dict) -> None:
    """Rewrite each layer's ``qzeros`` in v1 form (zero − 1), in place; refuse any zero point of 0."""
    bad = []
    for name, layer in packed_layers.items():
        _, z, _ = layer.integers()
        if int(z.min()) < 1:
            bad.append(f"{name} ({int((z < 1).sum())} groups)")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise QatlmError(f"GPTQ v1 cannot store a zero point of 0 (its loaders add 1 to every stored zero); found in {', '.join(bad[:5])}{more}. "
                         "Export --format gptq (v2), or quantize with --v1-zeros")
    for layer in packed_layers.values():
        _, z, _ = layer.integers()
        layer.qzeros = pack_cols((z - 1).t().contiguous().cpu(), layer.spec.bits, "output width").to(layer.qzeros.device)
