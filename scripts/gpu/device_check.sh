#!/usr/bin/env bash
# The one command to run on the GPU machine, from the repository root, after build_wheel.sh:
#
#   OUT=<folder> bash scripts/gpu/device_check.sh            # device tool: carry ["gpu-kit"]
#
# Installs gpu-kit/'s wheels into a throwaway target dir (pip --no-index --no-deps: that machine
# has no network), then runs every step of device_check.py time-boxed, writing
# $OUT/device_check.json after each step (and each step's own JSON and log beside it). Exit code
# 0 when every step passed. Extra arguments go to `device_check.py check` (see --help there):
# e.g. --device cuda:1, --sizes 1024,2048, --budget-s 300, --timeout parity=150.
# PYTHON picks the interpreter (default python3).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
: "${OUT:?set OUT to the folder the JSON goes to}"
PYTHON=${PYTHON:-python3}
exec "$PYTHON" "$HERE/device_check.py" check --out "$OUT" --python "$(command -v "$PYTHON")" "$@"
