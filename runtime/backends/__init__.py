"""Inference backends behind one small interface; ``open_backend`` picks one once, by name or "auto"."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.manifest import Manifest

BACKENDS = ("auto", "cpu", "onnxruntime-cuda")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine; the message says what is missing."""


class Backend(Protocol):
    name: str  # what actually runs, e.g. "onnxruntime-cpu"
    preferred_batch: int  # fields per run() when the user does not say: the measured sweet spot

    def run(self, fields: np.ndarray) -> np.ndarray:
        """(B, T, 3, P, P) float32 preprocessed fields -> (B,) float32 probabilities."""
        ...

    def close(self) -> None: ...


def open_backend(name: str, model_dir: Path, manifest: Manifest, threads: int | None = None) -> Backend:
    """Open the named backend; "auto" takes the fastest that is available here and never fails over silently
    from an explicitly named one."""
    from runtime.backends import ort

    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "onnxruntime-cuda" or (name == "auto" and ort.cuda_available()):
        if not ort.cuda_available():
            raise BackendUnavailable("backend onnxruntime-cuda needs onnxruntime-gpu and a CUDA GPU; "
                                     "this machine's onnxruntime offers only " + ", ".join(ort.providers()))
        return ort.OrtBackend(model_dir, manifest, cuda=True, threads=threads)
    return ort.OrtBackend(model_dir, manifest, cuda=False, threads=threads)
