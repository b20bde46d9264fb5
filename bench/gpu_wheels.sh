#!/usr/bin/env bash
# The Python packages qatlm needs that the lent GPU machine's image lacks (it has torch, transformers, accelerate,
# safetensors, tqdm, numpy, matplotlib, pyarrow), as wheels for its Python 3.12, downloaded here into .whl/
# (ignored by git; carried to the machine with the device tool's `carry: [".whl"]`). See bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  gguf==0.19.0 compressed-tensors==0.17.1 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 loguru==0.7.3
# defuser (MoE models) and its pypcre ship as sources only: built here with a Python 3.12 (pyenv's, where present)
PY312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | head -1 || true)
PY312=${PY312:-$(command -v python3.12 || true)}
if [ -n "$PY312" ] && "$PY312" -c "" 2>/dev/null; then
  "$PY312" -m pip wheel -q --no-deps -w .whl defuser==0.0.28 pypcre==0.6.4 || echo "defuser/pypcre not built: the MoE check will say so"
else
  echo "no python3.12 here: defuser/pypcre not built, the MoE check will say so"
fi
du -sh .whl
