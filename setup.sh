#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with the runtime, the export stage and the test tools, then the
# model under models/: the TRAINED model from ../shared/models where it exists (the default everywhere), else the
# seeded UNTRAINED reference. Each export makes what this machine runs (FP16 only where an NVIDIA GPU is visible,
# BF16 where the CPU has native BF16) and is kept in models/.export-cache for an identical export later (the
# tests'). Safe to run again: a model whose manifest this code can read is kept.
#
# bash setup.sh --runtime-only: a device (an edge box, a Jetson's CPU side): only what runtime/ needs (no PyTorch, no
# export tools, no test tools) and no export; the model directories are copied from a workstation into models/ and
# their files are checked against their manifests here (and again by the runtime before each use).
# docs/gpu-and-jetson.md says the steps.
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  "") RUNTIME_ONLY= ;;
  --runtime-only) RUNTIME_ONLY=1 ;;
  *) echo "usage: bash setup.sh [--runtime-only]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "$RUNTIME_ONLY" ]; then
  .venv/bin/python -m pip install -q -e .
  found=
  for dir in models/*/; do
    [ -f "$dir/manifest.json" ] || continue
    found=1
    .venv/bin/python -c 'import sys; from runtime.model.model_dir import ModelDir, ModelError
try:
    m = ModelDir.open(sys.argv[1])
    names = sorted(m.manifest.variants)
    for name in names: m.file(m.manifest.variants[name].file)
except ModelError as e:
    sys.exit(f"error: {e}")
listed = ", ".join(names)
print(f"{m.path}: the files of its variants ({listed}) match its manifest")' "$dir" ||
      { echo "error: $dir cannot be used (said above): copy it again from the workstation" >&2; exit 1; }
  done
  [ -n "$found" ] || echo "note: no model directory in models/: copy one exported on a workstation" \
                          "(models/NAME with its manifest.json; docs/gpu-and-jetson.md)" >&2
  echo "ready (runtime only): .venv/bin/python -m runtime.classify --model models/NAME IMAGE..." >&2
  exit 0
fi
# torch==2.13.0 is the CPU build (a plain "torch" would pull a multi-GB CUDA build).
.venv/bin/python -m pip install -q -e '.[export,serve,openvino,openslide,cluster,dicom,triton,dev]'
# Test-only references installed without their dependency pins: patchify's metadata caps numpy < 2 (its code runs
# on numpy 2), and tensorrt-stubs would pull the real TensorRT wheel, which fetches from another index.
.venv/bin/python -m pip install -q --no-deps patchify==0.2.3 tensorrt-stubs==10.13.0.35.1
# (exports from before the contract stated the magnification are made again, so that scale checks apply to them)
usable() { .venv/bin/python -c 'import sys; from runtime.model.model_dir import ModelDir
assert ModelDir.open(sys.argv[1]).contract.magnification' "$1" 2>/dev/null; }
if [ -f "$(.venv/bin/python -c 'from runtime.model.paths import trained_weights; print(trained_weights())')/weights.pt" ]; then
  usable models/breakhis-scratch-v1 || .venv/bin/python -m export trained
else
  untrained=1
  usable models/reference || .venv/bin/python -m export reference -o models/reference
fi
# python -m runtime.triton_server runs in its own environment: PyTriton 0.7.0 (Triton inside) pins numpy<2. The
# runtime's code comes from this checkout (the command moves itself there); skipped with a note where it cannot be
# installed (BREAKHIS_NO_TRITON=1 skips it on purpose).
if [ -z "${BREAKHIS_NO_TRITON:-}" ] && ! .venv-triton/bin/python -c 'import pytriton, onnxruntime' 2>/dev/null; then
  { { [ -x .venv-triton/bin/python ] || "$PY" -m venv .venv-triton; } &&
    .venv-triton/bin/python -m pip install -q 'nvidia-pytriton==0.7.0' onnxruntime openvino; } ||
    echo "note: PyTriton could not be installed in .venv-triton: python -m runtime.triton_server and its tests" \
         "will say so" >&2
fi
echo "ready: .venv/bin/python -m runtime.classify IMAGE..." >&2
if [ -n "${untrained:-}" ]; then
  cat >&2 <<'WARN'
################################################################################################################
WARNING: the trained model was not found (../shared/models/breakhis-scratch-v1, or $BREAKHIS_SHARED): the default
model is the UNTRAINED reference, with random weights. Its verdicts mean nothing; every result says so. Put the
shared folder beside this checkout (or set BREAKHIS_SHARED) and run setup.sh again, or export your own weights
(docs/models.md).
################################################################################################################
WARN
fi
