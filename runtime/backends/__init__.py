"""Inference backends behind one small interface; ``open_backend`` picks one once, by name or "auto"."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.manifest import Manifest

BACKENDS = ("auto", "cpu", "onnxruntime-cuda", "tensorrt")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine; the message says what is missing."""


class Backend(Protocol):
    name: str  # what actually runs, e.g. "onnxruntime-cpu", "tensorrt-fp16"
    preferred_batch: int  # fields per run() when the user does not say: the measured sweet spot

    def run(self, fields: np.ndarray) -> np.ndarray:
        """(B, T, 3, P, P) float32 preprocessed fields -> (B,) float32 probabilities."""
        ...

    def close(self) -> None: ...


class DeviceInputBackend(Backend, Protocol):
    """A GPU backend whose input the preprocessing kernel can write directly (``input_ptr``, on ``stream``)."""

    input_ptr: int
    input_fp16: bool
    stream: object

    def run_device(self, n: int) -> np.ndarray: ...


def open_backend(name: str, model_dir: Path, manifest: Manifest, threads: int | None = None,
                 precision: str = "fp16", allow_build: bool = False,
                 onnx_file: str | None = None) -> tuple[Backend, list[str]]:
    """(backend, notes). "auto" tries TensorRT, then ONNX Runtime CUDA, then CPU, noting why each one it skipped
    could not be used; a backend named explicitly fails loudly instead. ``onnx_file`` picks another ONNX file of
    the model directory for the ONNX Runtime backends (e.g. model.fp16.onnx on the CPU, for verification)."""
    from runtime.backends import ort

    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    notes: list[str] = []
    if name in ("auto", "tensorrt"):
        from runtime.backends import trt
        from runtime.engine_cache import EngineMismatch
        from runtime.gpu import GpuUnavailable

        try:
            return trt.TensorRTBackend(model_dir, manifest, precision, allow_build), notes
        except (trt.TrtUnavailable, GpuUnavailable, EngineMismatch) as e:
            if name == "tensorrt":
                raise BackendUnavailable(f"backend tensorrt: {e}") from None
            notes.append(f"tensorrt skipped: {str(e).splitlines()[0]}")
    if name in ("auto", "onnxruntime-cuda"):
        if ort.cuda_available():
            return ort.OrtBackend(model_dir, manifest, cuda=True, threads=threads, filename=onnx_file), notes
        msg = "needs onnxruntime-gpu and a CUDA GPU; this onnxruntime offers " + ", ".join(ort.providers())
        if name == "onnxruntime-cuda":
            raise BackendUnavailable(f"backend onnxruntime-cuda {msg}")
        notes.append(f"onnxruntime-cuda skipped: {msg}")
    return ort.OrtBackend(model_dir, manifest, cuda=False, threads=threads, filename=onnx_file), notes
