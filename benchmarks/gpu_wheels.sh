#!/usr/bin/env bash
# The cp312 wheels benchmarks/gpu.py needs on the GPU machine (which has torch, torchvision, timm, numpy,
# Pillow, PyYAML, tqdm, packaging, psutil, py-cpuinfo, msgpack, ninja, einops, safetensors, scikit-learn),
# at the versions of constraints.txt, into .whl/; then a check that they install offline into a clean
# Python 3.12 environment.  Usage: bash benchmarks/gpu_wheels.sh [PYTHON] [PYTHON3.12]
set -euo pipefail
PY=${1:-.venv/bin/python}
PY312=${2:-}
if [ -z "$PY312" ]; then  # the first Python 3.12 that runs (a pyenv shim may exist and refuse)
  for c in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312=$c; break; fi
  done
fi
OUT=.whl
pin() { grep -iE "^$1==" constraints.txt | head -1; }
BINARY=(hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions webdataset braceexpand
        simplejpeg)
rm -rf "$OUT" && mkdir -p "$OUT"
# DeepSpeed ships an sdist only: build its pure-Python wheel (no ops compiled; they are JIT-built where used).
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" "$(pin deepspeed)"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT" $(for p in "${BINARY[@]}"; do pin "$p"; done)
ls -l "$OUT"
du -ch "$OUT"/*.whl | tail -1
if [ -z "$PY312" ]; then
  echo "no python3.12 here: the offline install was not checked" >&2
  exit 0
fi
CLEAN=$(mktemp -d)
trap 'rm -rf "$CLEAN"' EXIT
"$PY312" -m venv "$CLEAN/venv"
env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null "$CLEAN/venv/bin/python" -m pip install --no-index --no-deps --no-compile --target "$CLEAN/site" "$OUT"/*.whl
# What imports without the machine's own packages (numpy, torch): the rest needs them.
PYTHONPATH="$CLEAN/site" "$CLEAN/venv/bin/python" -c \
  "import pydantic, pydantic_core, hjson, braceexpand, annotated_types, typing_inspection; print('offline install into a clean', __import__('sys').version.split()[0], 'environment: ok')"
