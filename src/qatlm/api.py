"""The Python API: one config dataclass per method and one verb, ``quantize(model, config)``.

    summary = qatlm.quantize(model, qatlm.BlockAPConfig(bits=2, group_size=64), tokenizer=tok, out="out/w2g64")

The method is the one ``config`` belongs to: quantize a float model (RTN, Block-AP, EfficientQAT, DL-QAT,
EfficientQAT+DL-QAT) or train a packed one (E2E-QP, DL-QAT with ``E2EQPConfig`` / ``DLQATConfig``). The model
is changed in place and the run's summary returned. With ``out`` the API owns the folders: resumable state in
``out.work`` (``resume=True`` continues an interrupted run), the packed checkpoint written atomically to ``out``
with ``training_summary.json``, then the work folder removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from qatlm.errors import QatlmError
from qatlm.methods.block_ap import BlockAPConfig, quantize_block_ap
from qatlm.methods.dl_qat import BlockAPDLQATConfig, DLQATConfig, RTNDLQATConfig, quantize_blockap_dlqat, quantize_rtn_dlqat, train_dl_qat
from qatlm.methods.e2e_qp import E2EQPConfig, EfficientQATConfig, quantize_efficientqat, train_e2e_qp
from qatlm.methods.rtn import RTNConfig, quantize_rtn

# method name -> (config class, function(model, config, **data) -> summary dict); the model is changed in place
METHODS = {
    "rtn": (RTNConfig, quantize_rtn),
    "block-ap": (BlockAPConfig, quantize_block_ap),
    "efficientqat": (EfficientQATConfig, quantize_efficientqat),
    "dl-qat": (RTNDLQATConfig, quantize_rtn_dlqat),
    "efficientqat+dl-qat": (BlockAPDLQATConfig, quantize_blockap_dlqat),
}
# training a packed model: name -> (config class, function(model, config, tokenizer, **data) -> summary dict)
TRAINERS = {
    "e2e-qp": (E2EQPConfig, train_e2e_qp),
    "dl-qat": (DLQATConfig, train_dl_qat),
}


def method_for(config) -> str:
    for table in (METHODS, TRAINERS):
        for name, (cls, _) in table.items():
            if type(config) is cls:
                return name
    raise QatlmError(f"unknown method config {type(config).__name__}; known: {', '.join(METHODS)}, and {', '.join(TRAINERS)} for packed models")


def quantize(model: nn.Module, config, *, tokenizer=None, out=None, resume: bool = False, overwrite: bool = False, **data) -> dict:
    """Quantize ``model`` in place (or train it, for a packed model and an end-to-end config); returns the summary."""
    from qatlm.model.checkpoint import save_quantized
    from qatlm.model.layers import packed_layers

    name = method_for(config)
    trainer = next((fn for cls, fn in TRAINERS.values() if type(config) is cls), None)
    work = None
    if out is not None:
        out = Path(out).expanduser()
        work = out.parent / f"{out.name}.work"
        if out.exists() and not (overwrite or resume):
            raise QatlmError(f"{out} exists: pass overwrite=True to replace it")
        if work.exists() and not resume:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        data["work_dir"] = work
        data["resume"] = resume
    if trainer is not None:
        if tokenizer is None:
            raise QatlmError(f"{name} trains end to end on text: pass tokenizer=")
        summary = trainer(model, config, tokenizer, **data) or {}
    else:
        summary = METHODS[name][1](model, config, tokenizer=tokenizer, **data) or {}
    summary.setdefault("method", name)
    if out is not None:
        layers = packed_layers(model)
        if not layers:
            raise QatlmError(f"{name} left no packed layers to save")
        spec = getattr(config, "spec", None) or next(iter(layers.values())).spec
        save_quantized(model, out, spec, tokenizer=tokenizer, overwrite=True, meta={"method": name},
                       report=lambda tmp: (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n"))
        shutil.rmtree(work, ignore_errors=True)
    return summary
