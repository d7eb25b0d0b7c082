"""The one small interface every backend implements, and the error a backend that cannot run here raises."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from runtime.errors import Unavailable


class BackendUnavailable(Unavailable):
    """The requested backend cannot run on this machine; the message says what is missing."""


class Backend(Protocol):
    name: str  # what actually runs, e.g. "onnxruntime-cpu-fp32", "openvino-cpu-bf16", "tensorrt-fp16"
    precision: str  # the model variant it runs: "fp32", "fp16", "bf16", "int8"
    model_file: str  # the file that runs (ONNX variant, or TensorRT engine)
    device_input: bool  # True: a DeviceInputBackend whose input buffer the GPU kernel can fill
    file_sha256: str  # its sha256, checked against the manifest (or the engine's sidecar) when loaded
    preferred_batch: int  # fields per run() when the user does not say: the measured sweet spot
    on_gpu: bool  # inference runs on a GPU, so the host's cores are free to decode

    def run(self, fields: np.ndarray) -> dict[str, np.ndarray]:
        """(B, T, 3, P, P) float32 preprocessed fields -> {output name: (B,) float32} for the manifest's outputs."""
        ...

    def close(self) -> None: ...


class DeviceInputBackend(Backend, Protocol):
    """A GPU backend whose inputs the preprocessing kernel writes directly, on the backend's ``stream``: one device
    input per slot (two: batch k+1 is written into one while batch k runs from the other)."""

    input_ptrs: tuple[int, ...]
    input_fp16: bool
    stream: object

    def fix_batches(self, sizes: tuple[int, ...]) -> list[str]:
        """The batch sizes the caller fills, said before the first batch (a CUDA-graph backend captures them);
        notes on what could not be prepared."""
        ...

    def run_device(self, n: int, slot: int = 0) -> dict[str, np.ndarray]:
        """Outputs for the n fields the kernel wrote (on ``stream``) into input ``slot``."""
        ...
