"""GPU preprocessing through pycuda: the kernel runner (stream, buffers, launch), in runtime/gpu/context.py's context.

Per call: images are copied to the device as uint8 (the only bus crossing): straight from the page-locked buffers
decode workers wrote them into (``pool``, runtime/gpu/pinned.py), or, for any other image, packed first into one
of two reused page-locked staging slots; then one kernel launch writes every field of the batch as NCHW FP32/FP16
into the destination: our own buffer, or a consumer's (a backend's device input) at a batch offset. Copy, kernel
and the consumer are ordered on one stream (the backend's); a slot is packed again only once its previous upload has
left it (an event per slot), so the next batch is packed and queued while the current one runs; the host waits only
for a result.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from runtime.gpu import abi
from runtime.gpu.context import Context
from runtime.gpu.jpeg import DeviceImage
from runtime.gpu.pinned import HostPool
from runtime.model.geometry import FieldPlan
from runtime.model.manifest import Contract


class GpuPreprocessor:
    """uint8 images -> preprocessed fields on the GPU. Buffers are sized for the largest batch seen and reused."""

    def __init__(self, contract: Contract, fp16: bool = False, device: int = 0, stream: Any = None) -> None:
        from runtime.gpu.build import build_cubin

        self.context = Context(device)
        cuda = self.cuda = self.context.cuda
        self.contract, self.fp16 = contract, fp16
        self.device = self.context.device
        major, minor = self.device.compute_capability()
        self.arch = f"sm_{major}{minor}"
        with self.active():
            self.module = cuda.module_from_file(str(build_cubin(self.arch)))  # compiled once, cached on disk
            self.kernel = self.module.get_function("bhx_preprocess")
            self.kernel.prepare("PPPP")
            self.stream = stream or cuda.Stream()  # share the consumer's stream to order kernel -> engine
            self.copied = (cuda.Event(), cuda.Event())  # a staging slot is refilled once its upload has finished
        self.field_bytes = int(np.prod(contract.field_shape)) * (2 if fp16 else 4)
        self._bufs: dict[str, tuple[Any, Any, int]] = {}  # name -> (host pinned or None, device, bytes)
        self.pool = HostPool(self._pinned)  # what decode workers write images into

    def _pinned(self, nbytes: int) -> np.ndarray:
        with self.active():
            return self.cuda.pagelocked_empty(nbytes, np.uint8)

    def active(self) -> Any:
        return self.context.active()

    def _buffer(self, name: str, nbytes: int, pinned: bool, device: bool = True) -> tuple[Any, Any]:
        """(page-locked host array or None, device allocation or None) of at least nbytes, grown only when needed."""
        host, dev, size = self._bufs.get(name, (None, None, 0))
        if size < nbytes:
            size = max(nbytes, size * 2)
            if dev is not None:
                dev.free()
            host = self.cuda.pagelocked_empty(size, np.uint8) if pinned else None
            dev = self.cuda.mem_alloc(size) if device else None
            self._bufs[name] = (host, dev, size)
        return host, dev

    def submit(self, images: list[Any], plans: list[FieldPlan], bgr: bool = True,
               dst: int | None = None, dst_field0: int = 0, slot: int = 0) -> tuple[int, int]:
        """Queue the upload and the kernel for all fields of ``images``; returns (device pointer, fields).

        ``dst`` is a device pointer to a (B, T, 3, P, P) tensor of the right dtype (default: our own buffer);
        fields are written from batch index ``dst_field0``. Nothing waits on the host; consumers must use
        ``self.stream`` (or synchronise) before reading.
        """
        cuda = self.cuda
        with self.active():
            on_gpu = [isinstance(a, DeviceImage) for a in images]  # decoded on the GPU: RGB, maybe pitched
            srcs = [abi.SourceImage(a.height, a.width, a.channels, a.bgr, a.pitch) if g else
                    abi.SourceImage(a.shape[0], a.shape[1], a.shape[2], bgr) for a, g in zip(images, on_gpu)]
            offsets, total = abi.layout(srcs)
            jobs = abi.job_table(srcs, offsets, plans)
            n = len(jobs)
            params = abi.params(self.contract, n, self.fp16, dst_field0)
            self.copied[slot].synchronize()  # this slot's previous upload has left its staging buffers
            staging, d_src = self._buffer(f"src{slot}", total, pinned=True)
            direct = [g or self.pool.owns(a) for a, g in zip(images, on_gpu)]  # no packing copy for these
            for a, off, d in zip(images, offsets, direct):
                if not d:
                    staging[off:off + a.nbytes] = np.ascontiguousarray(a).reshape(-1)
            meta = jobs.tobytes() + params.tobytes()
            h_meta, d_meta = self._buffer(f"meta{slot}", len(meta), pinned=True)
            h_meta[: len(meta)] = np.frombuffer(meta, np.uint8)
            if any(direct):  # each image from where it lies
                for a, src, off, d, g in zip(images, srcs, offsets, direct, on_gpu):
                    if g:  # ordered after its decode: CUDA's legacy default stream, which this stream waits for
                        cuda.memcpy_dtod_async(int(d_src) + off, a.ptr, src.nbytes, self.stream)
                    else:
                        cuda.memcpy_htod_async(int(d_src) + off, a.reshape(-1) if d else
                                               staging[off:off + a.nbytes], self.stream)
            else:
                cuda.memcpy_htod_async(d_src, staging[:total], self.stream)
            cuda.memcpy_htod_async(d_meta, h_meta[: len(meta)], self.stream)
            self.copied[slot].record(self.stream)
            if dst is None:
                _, d_out = self._buffer(f"out{slot}", (dst_field0 + n) * self.field_bytes, pinned=False)
                dst = int(d_out)
            threads = abi.thread_count(self.contract, n)
            grid = (-(-threads // abi.BLOCK), 1)
            # kept so the benchmark can time the kernel alone by re-launching it on the same device data
            self.last_launch = (grid, (abi.BLOCK, 1, 1), self.stream, int(d_src), int(d_meta),
                                int(d_meta) + jobs.nbytes, int(dst))
            self.kernel.prepared_async_call(*self.last_launch)
        return dst, n


    def to_host(self, images: list[Any], plans: list[FieldPlan], bgr: bool = True,
                slot: int = 0) -> np.ndarray:
        """Preprocess and bring the fields back: for CPU consumers, tests and the CPU-vs-GPU benchmark."""
        dptr, n = self.submit(images, plans, bgr, slot=slot)
        c = self.contract
        out = np.empty((n, *c.field_shape), np.float16 if self.fp16 else np.float32)
        with self.active():
            host, _ = self._buffer("download", out.nbytes, pinned=True, device=False)
            self.cuda.memcpy_dtoh_async(host[: out.nbytes], dptr, self.stream)
            self.stream.synchronize()
            out.reshape(-1).view(np.uint8)[:] = host[: out.nbytes]
        return out

    def close(self) -> None:
        with self.active():
            self.stream.synchronize()
            for _, dev, _ in self._bufs.values():
                if dev is not None:
                    dev.free()
            self._bufs.clear()
        self.context.close()
