"""Where preprocessing runs, chosen once per classifier: numpy into a reused host batch (CPU), our CUDA kernel
writing straight into a GPU backend's input (images cross the bus once, as uint8), or the kernel with the batch
brought back for a backend that takes host input."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Union, cast

import numpy as np

from runtime.backends.base import Backend, DeviceInputBackend
from runtime.backends.choose import PREPROCESSORS
from runtime.errors import Unavailable
from runtime.model.geometry import FieldPlan
from runtime.model.manifest import Contract
from runtime.model.preprocess import preprocess_fields

if TYPE_CHECKING:
    from runtime.gpu.jpeg import DeviceImage

Outputs = dict[str, np.ndarray]
Pixels = Union[np.ndarray, "DeviceImage"]  # a decoded image: BGR in host memory, or RGB on the GPU (GPU paths only)


class Preprocessor(Protocol):
    """The fields of decoded images -> the backend's outputs, through one preprocessing path, in ``slots`` buffers:
    with two, batch k+1 is staged into one while batch k runs from the other (the scheduler's runner thread)."""

    name: str  # where preprocessing runs, as results report it: "cpu" or "gpu"
    slots: int

    def stage(self, images: list[Pixels], plans: list[FieldPlan], n: int, slot: int) -> None:
        """Preprocess the ``n`` fields of ``plans`` into ``slot`` (on a GPU: queued, not waited for)."""
        ...

    def run(self, n: int, slot: int) -> Outputs:
        """The backend's outputs for the ``n`` fields staged in ``slot``."""
        ...

    def host_buffer(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """Where a decode worker writes an image (page-locked memory on the GPU paths), or None: ordinary memory."""
        ...

    def release(self, image: np.ndarray) -> None:
        """Nothing reads ``image`` any more (its fields are inferred): its buffer may take the next image."""
        ...

    def host_pixels(self, image: Pixels) -> np.ndarray:
        """The image as BGR uint8 in host memory (an image decoded on the GPU is copied back: the re-check's rare
        need)."""
        ...

    def close(self) -> None: ...


class CpuPreprocessor:
    """numpy into reused host batches; one slot by default (inference needs the cores preprocessing would take)."""

    name = "cpu"

    def __init__(self, backend: Backend, contract: Contract, batch_size: int, slots: int = 1) -> None:
        self.backend, self.contract, self.batch_size, self.slots = backend, contract, batch_size, slots
        self.batches: dict[int, np.ndarray] = {}  # allocated on first use (a 32-field batch is 116 MB)

    def stage(self, images: list[Pixels], plans: list[FieldPlan], n: int, slot: int) -> None:
        if slot not in self.batches:
            self.batches[slot] = np.empty((self.batch_size, *self.contract.field_shape), np.float32)
        k = 0
        for img, plan in zip(images, plans):
            assert isinstance(img, np.ndarray)  # images decoded on the GPU go only to the GPU paths
            preprocess_fields(img, plan, self.contract, out=self.batches[slot][k:k + plan.n_fields])
            k += plan.n_fields

    def run(self, n: int, slot: int) -> Outputs:
        return self.backend.run(self.batches[slot][:n])

    def host_buffer(self, shape: tuple[int, ...]) -> None:
        return None

    def release(self, image: np.ndarray) -> None:
        pass

    def host_pixels(self, image: Pixels) -> np.ndarray:
        assert isinstance(image, np.ndarray)
        return image

    def close(self) -> None:
        self.batches.clear()


class _GpuDecodeBuffers:
    """The GPU paths' decode buffers: the kernel runner's page-locked pool."""

    gpu: Any

    def host_buffer(self, shape: tuple[int, ...]) -> np.ndarray | None:
        return self.gpu.pool.take(shape)

    def release(self, image: np.ndarray) -> None:
        self.gpu.pool.give(image)

    def host_pixels(self, image: Pixels) -> np.ndarray:
        from runtime.gpu.jpeg import to_host

        return image if isinstance(image, np.ndarray) else to_host(image, self.gpu.context)


class GpuIntoBackend(_GpuDecodeBuffers):
    """One kernel launch per batch, written into one of the backend's device inputs, on the backend's stream: the
    upload and kernel of batch k+1 are queued while batch k runs from the other input."""

    name = "gpu"

    def __init__(self, backend: DeviceInputBackend, gpu: Any, batch_size: int, notes: list[str]) -> None:
        self.backend, self.gpu, self.slots = backend, gpu, len(backend.input_ptrs)
        notes += backend.fix_batches((1, batch_size))  # a lone image's field, and full batches (a partial padded)

    def stage(self, images: list[Pixels], plans: list[FieldPlan], n: int, slot: int) -> None:
        self.gpu.submit(images, plans, dst=self.backend.input_ptrs[slot], slot=slot)

    def run(self, n: int, slot: int) -> Outputs:
        return self.backend.run_device(n, slot)

    def close(self) -> None:
        self.gpu.close()


class GpuToHost(_GpuDecodeBuffers):
    """The kernel, its batch brought back for a backend that takes host input (which runs while the next batch is
    preprocessed on the GPU)."""

    name = "gpu"
    slots = 2

    def __init__(self, backend: Backend, gpu: Any) -> None:
        self.backend, self.gpu = backend, gpu
        self.batches: dict[int, np.ndarray] = {}

    def stage(self, images: list[Pixels], plans: list[FieldPlan], n: int, slot: int) -> None:
        self.batches[slot] = self.gpu.to_host(images, plans, slot=slot)

    def run(self, n: int, slot: int) -> Outputs:
        return self.backend.run(self.batches.pop(slot))

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
                                                               stream=gpu_backend.stream), batch_size, notes)
        return GpuToHost(backend, GpuPreprocessor(contract))
    except Unavailable as e:
        if choice == "gpu":
            raise
        notes.append(f"preprocess auto chose the CPU: {str(e).splitlines()[0]}")
        return CpuPreprocessor(backend, contract, batch_size)
