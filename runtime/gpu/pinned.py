"""Reused page-locked host buffers that decode workers write images into, so an image crosses to the GPU straight
from where it was decoded (no packing copy on the scheduler's thread). A buffer comes back when its image is done
and is kept for the next image of the same size, up to a cap; beyond it, decoding uses ordinary memory."""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import numpy as np

DEFAULT_CAP = 512 << 20  # bytes of page-locked memory at most: ~500 BreakHis images in flight, a few 4K frames


class HostPool:
    """``take(shape)``: a uint8 array of that shape from the pool (or None: over the cap, use ordinary memory);
    ``give(array)``: back for reuse once nothing reads it (its upload has finished). ``alloc(nbytes)`` makes one flat
    uint8 buffer: page-locked memory on a GPU (pycuda's ``pagelocked_empty`` in the CUDA context)."""

    def __init__(self, alloc: Callable[[int], np.ndarray], cap: int = DEFAULT_CAP) -> None:
        self.alloc, self.cap = alloc, cap
        self.lock = threading.RLock()  # re-entrant: a finalizer (_forget) may run during any allocation under it
        self.free: dict[int, list[np.ndarray]] = {}  # nbytes -> flat buffers ready for reuse
        self.mine: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()  # address -> buffer
        self.idle: set[int] = set()  # addresses of the buffers in ``free`` (a second give is ignored)
        self.held = 0  # bytes allocated and not yet garbage-collected

    def take(self, shape: tuple[int, ...]) -> np.ndarray | None:
        n = int(np.prod(shape))
        with self.lock:
            if self.free.get(n):
                flat = self.free[n].pop()
                self.idle.discard(flat.ctypes.data)
                return flat.reshape(shape)
            if self.held + n > self.cap:
                return None
            self.held += n
        flat = self.alloc(n)
        weakref.finalize(flat, self._forget, n)  # a buffer never given back is freed with its last reference
        self.mine[flat.ctypes.data] = flat
        return flat.reshape(shape)

    def _buffer(self, array: np.ndarray) -> np.ndarray | None:
        """The pool's buffer that ``array`` covers whole (any view or wrapper of its memory), else None."""
        flat = self.mine.get(array.ctypes.data)
        return flat if flat is not None and array.nbytes == flat.nbytes and array.flags.c_contiguous else None

    def owns(self, array: np.ndarray) -> bool:
        return self._buffer(array) is not None

    def give(self, array: np.ndarray) -> None:
        flat = self._buffer(array)
        if flat is not None:
            with self.lock:
                if flat.ctypes.data not in self.idle:
                    self.idle.add(flat.ctypes.data)
                    self.free.setdefault(flat.nbytes, []).append(flat)

    def _forget(self, n: int) -> None:
        with self.lock:
            self.held -= n
