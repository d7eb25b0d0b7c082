#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with the runtime, the export stage and the test tools, then the
# seeded UNTRAINED reference model under models/reference. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU build (a plain "torch" would pull a multi-GB CUDA build).
.venv/bin/python -m pip install -q -e '.[export,serve,dev]'
# Test-only references installed without their dependency pins: patchify's metadata caps numpy < 2 (its code runs
# on numpy 2), and tensorrt-stubs would pull the real TensorRT wheel, which fetches from another index.
.venv/bin/python -m pip install -q --no-deps patchify==0.2.3 tensorrt-stubs==10.13.0.35.1
if [ ! -f models/reference/manifest.json ]; then
  .venv/bin/python -m export reference
fi
echo "ready: .venv/bin/python -m runtime.classify IMAGE..." >&2
