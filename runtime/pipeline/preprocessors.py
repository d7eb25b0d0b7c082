"""Where preprocessing runs, chosen once per classifier: numpy into a reused host batch (CPU), our CUDA kernel
writing straight into a GPU backend's input (images cross the bus once, as uint8), or the kernel with the batch
brought back for a backend that takes host input."""
from __future__ import annotations

import time
from typing import Any, Protocol, cast

import numpy as np

from runtime.backends.base import Backend, DeviceInputBackend
from runtime.backends.choose import PREPROCESSORS
from runtime.errors import Unavailable
from runtime.model.manifest import Contract
from runtime.pipeline.preprocess import preprocess_fields
from runtime.pipeline.tiling import FieldPlan

Outputs = dict[str, np.ndarray]


class Preprocessor(Protocol):
    """The fields of decoded images -> the backend's outputs, through one preprocessing path."""

    name: str  # where preprocessing runs, as results report it: "cpu" or "gpu"

    def infer(self, images: list[np.ndarray], plans: list[FieldPlan], n: int) -> tuple[float, Outputs]:
        """(perf_counter when preprocessing was handed on, outputs) for the ``n`` fields of ``plans``."""
        ...

    def close(self) -> None: ...


class CpuPreprocessor:
    name = "cpu"

    def __init__(self, backend: Backend, contract: Contract, batch_size: int) -> None:
        self.backend, self.contract, self.batch_size = backend, contract, batch_size
        self.batch: np.ndarray | None = None  # allocated on first use (a 32-field batch is 116 MB)

    def infer(self, images: list[np.ndarray], plans: list[FieldPlan], n: int) -> tuple[float, Outputs]:
        if self.batch is None:
            self.batch = np.empty((self.batch_size, *self.contract.field_shape), np.float32)
        batch, k = self.batch[:n], 0
        for img, plan in zip(images, plans):
            preprocess_fields(img, plan, self.contract, out=batch[k:k + plan.n_fields])
            k += plan.n_fields
        return time.perf_counter(), self.backend.run(batch)

    def close(self) -> None:
        self.batch = None


class GpuIntoBackend:
    """One kernel launch for the whole batch, written into the backend's device input on its stream."""

    name = "gpu"

    def __init__(self, backend: DeviceInputBackend, gpu: Any) -> None:
        self.backend, self.gpu = backend, gpu

    def infer(self, images: list[np.ndarray], plans: list[FieldPlan], n: int) -> tuple[float, Outputs]:
        self.gpu.submit(images, plans, dst=self.backend.input_ptr)
        return time.perf_counter(), self.backend.run_device(n)

    def close(self) -> None:
        self.gpu.close()


class GpuToHost:
    """The kernel, its batch brought back for a backend that takes host input."""

    name = "gpu"

    def __init__(self, backend: Backend, gpu: Any) -> None:
        self.backend, self.gpu = backend, gpu

    def infer(self, images: list[np.ndarray], plans: list[FieldPlan], n: int) -> tuple[float, Outputs]:
        batch = self.gpu.to_host(images, plans)
        return time.perf_counter(), self.backend.run(batch)

    def close(self) -> None:
        self.gpu.close()


def open_preprocessor(choice: str, backend: Backend, contract: Contract, batch_size: int,
                      notes: list[str]) -> Preprocessor:
    """"cpu" (numpy), "gpu" (our kernel; fails loudly where it cannot run) or "auto": the kernel only next to a GPU
    backend, sharing its stream and writing its input dtype, else the CPU; where the kernel cannot run here (no
    pycuda, no GPU, no nvcc to build it) auto falls back to the CPU with a note."""
    if choice not in PREPROCESSORS:
        raise ValueError(f"preprocess must be one of {', '.join(PREPROCESSORS)}, not {choice!r}")
    if choice == "cpu" or (choice == "auto" and not backend.device_input):
        return CpuPreprocessor(backend, contract, batch_size)
    try:
        from runtime.gpu.preprocessor import GpuPreprocessor

        if backend.device_input:
            gpu_backend = cast(DeviceInputBackend, backend)
            return GpuIntoBackend(gpu_backend, GpuPreprocessor(contract, fp16=gpu_backend.input_fp16,
                                                               stream=gpu_backend.stream))
        return GpuToHost(backend, GpuPreprocessor(contract))
    except Unavailable as e:
        if choice == "gpu":
            raise
        notes.append(f"preprocess auto chose the CPU: {str(e).splitlines()[0]}")
        return CpuPreprocessor(backend, contract, batch_size)
