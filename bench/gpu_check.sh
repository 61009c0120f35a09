#!/usr/bin/env bash
# The GPU path, checked in one run (bench/gpu_check.py; the device command is in bench/README.md).
#   bash bench/gpu_check.sh --download-wheels       # here (needs PyPI): fill .whl/ for the device (CPython 3.12, x86-64)
#   bash bench/gpu_check.sh [--device cuda|cpu] [--out FILE] [...]   # where torch and transformers are installed
# The project's other dependencies come from .whl/ when this python lacks them at the pinned versions;
# the project itself is imported from src/ (no install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PINS=bench/gpu_check_wheels.txt

if [ "${1:-}" = "--download-wheels" ]; then
  rm -rf .whl && mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl -r "$PINS"
  ls -l .whl && du -ch .whl/*.whl | tail -1
  exit 0
fi

if ! "$PY" - "$PINS" <<'PYEOF'
import importlib.metadata as metadata
import sys

pins = [line.split("#")[0].strip() for line in open(sys.argv[1])]
off = []
for pin in filter(None, pins):
    name, version = pin.split("==")
    try:
        if metadata.version(name) != version:
            off.append(pin)
    except metadata.PackageNotFoundError:
        off.append(pin)
if off:
    print("gpu_check: installing from .whl/: " + " ".join(off))
sys.exit(1 if off else 0)
PYEOF
then
  site=$(mktemp -d /tmp/h3fusion-site.XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --find-links .whl --target "$site" -r "$PINS" \
    || { echo "gpu_check: the wheels in .whl/ do not install here; run 'bash bench/gpu_check.sh --download-wheels' (with PyPI) and carry .whl"; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false H3FUSION_NO_PROGRESS=1 PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
