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
    """A GPU backend whose input the preprocessing kernel can write directly (``input_ptr``, on ``stream``)."""

    input_ptr: int
    input_fp16: bool
    stream: object

    def run_device(self, n: int) -> dict[str, np.ndarray]: ...
