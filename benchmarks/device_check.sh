#!/usr/bin/env bash
# One command for a GPU box (H100/H200 or a Jetson): install what the machine lacks from wheels carried with the
# repository, then run every GPU check and benchmark (python -m benchmarks.device_check) and write the results with
# the machine's description under benchmarks/results/device/ (or --out DIR).
#
#   bash benchmarks/device_check.sh [--wheels DIR] [--out DIR] [--dry-run]
#
# --wheels DIR (default .wheels): *.whl installed offline into a private folder (pycuda and its pure-Python
# needs, onnxslim, tensorrt where a wheel exists), and ort-gpu.tar.xz or its split parts ort-gpu.tar.xz.part-*
# (onnxruntime-gpu's onnxruntime/ folder and dist-info; see README "The GPU path"). --dry-run prints and checks
# the plan without a GPU (CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.wheels
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
SITE=${TMPDIR:-/tmp}/breakhis-device-site
if [ -d "$WHEELS" ]; then
  mkdir -p "$SITE"
  shopt -s nullglob
  whl=("$WHEELS"/*.whl)
  [ ${#whl[@]} -gt 0 ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${whl[@]}"
  parts=("$WHEELS"/ort-gpu.tar.xz.part-*)
  if [ ${#parts[@]} -gt 0 ]; then cat "${parts[@]}" | tar xJf - -C "$SITE"
  elif [ -f "$WHEELS/ort-gpu.tar.xz" ]; then tar xJf "$WHEELS/ort-gpu.tar.xz" -C "$SITE"; fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# onnxruntime-gpu finds cuDNN and cuBLAS in the nvidia-* Python packages' lib folders.
NV=$("$PY" -c 'import nvidia, os; print(os.pathsep.join(sorted({os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p) if os.path.isdir(os.path.join(p, d, "lib"))})))' 2>/dev/null || true)
[ -n "$NV" ] && export LD_LIBRARY_PATH="$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$PY" -m benchmarks.device_check "${ARGS[@]}"
