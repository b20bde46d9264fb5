"""``qatlm install RUNTIME``: optional runtimes whose packages pin a torch build pip would swap in.

gptqmodel 7.7 asks for torch>=2.14.1 (a multi-GB CUDA wheel on a CPU machine), so it is installed with --no-deps
beside the torch already present, with its pure-Python dependencies pinned here (the versions the tests reload
GPTQ exports with).
"""

from __future__ import annotations

import subprocess
import sys

from qatlm.errors import QatlmError

RUNTIMES = {
    "gptq": ["gptqmodel==7.7.0", "optimum==2.3.0", "device-smi==0.5.7", "pypcre==0.6.4", "tokenicer==0.0.14",
             "logbar==0.4.15", "defuser==0.0.28", "threadpoolctl>=3.7"],
}


def install_runtime(runtime: str, dry_run: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *RUNTIMES[runtime]]
    if dry_run:
        print(" ".join(cmd))
        return
    print(f"installing the {runtime} runtime: {' '.join(cmd[3:])}", file=sys.stderr)
    if subprocess.call(cmd) != 0:
        raise QatlmError(f"pip could not install the {runtime} runtime (command: {' '.join(cmd)})")
    check = subprocess.run([sys.executable, "-c", "import gptqmodel, optimum"], capture_output=True, text=True)
    if check.returncode != 0:
        raise QatlmError(f"the {runtime} runtime was installed but does not import: {check.stderr.strip().splitlines()[-1]}")
    print(f"{runtime} runtime installed: transformers now loads qatlm's GPTQ exports", file=sys.stderr)
