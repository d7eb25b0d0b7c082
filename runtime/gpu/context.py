"""The one owner of CUDA state in this process: pycuda imported and checked once, and the device's primary
context (the one ONNX Runtime and TensorRT also use) made current around each use, from any thread, one at a time.
Every CUDA call of the runtime runs inside ``Context.active()``."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from runtime.errors import Unavailable


class GpuUnavailable(Unavailable):
    """A GPU path was asked for but cannot run here; the message says why."""


def import_pycuda() -> Any:
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        raise GpuUnavailable(f"GPU preprocessing needs pycuda ({e}); install it with `pip install pycuda` on a "
                             "machine with the CUDA toolkit, or use --preprocess cpu") from None
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            raise GpuUnavailable("GPU preprocessing: no CUDA device found")
    except cuda.Error as e:
        raise GpuUnavailable(f"GPU preprocessing: CUDA driver not usable ({e})") from None
    return cuda


def device_info(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor"): what engines are keyed by."""
    d = import_pycuda().Device(device)
    major, minor = d.compute_capability()
    return d.name(), f"{major}.{minor}"


class Context:
    """The device's primary context, retained once and released by ``close``."""

    def __init__(self, device: int = 0) -> None:
        self.cuda = import_pycuda()
        self.device = self.cuda.Device(device)
        self.ctx = self.device.retain_primary_context()
        self.lock = threading.RLock()  # re-entrant: a backend call may use a helper that is active too

    @contextmanager
    def active(self) -> Iterator[Any]:
        """The context made current on this thread for the block; yields pycuda's driver module."""
        with self.lock:
            self.ctx.push()
            try:
                yield self.cuda
            finally:
                self.cuda.Context.pop()

    def close(self) -> None:
        self.ctx.detach()
