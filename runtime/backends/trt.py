"""TensorRT backend: one engine deserialised once, one execution context on one stream, named-tensor API.

Input comes either from the host (``run``) or already on the device in ``input_ptr``, written there by the GPU
preprocessing kernel on ``stream`` (``run_device``): then the image crosses the bus once, as uint8.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime import engine_cache
from runtime.manifest import Manifest, ModelError


class TrtUnavailable(RuntimeError):
    """TensorRT (or what a build needs) is not usable here; the message says what is missing."""


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TrtUnavailable(f"TensorRT is not installed ({e}). On JetPack 6 it comes with the OS "
                             "(python3-libnvinfer); on x86 use NVIDIA's tensorrt wheel") from None
    if not hasattr(trt, "Runtime"):  # tensorrt-stubs alone provides an importable, empty namespace package
        raise TrtUnavailable("only TensorRT type stubs are installed here, not the TensorRT runtime")
    return trt


class TensorRTBackend:
    def __init__(self, model_dir: Path, manifest: Manifest, precision: str = "fp16", allow_build: bool = False,
                 cuda_graph: bool = False) -> None:
        import_tensorrt()
        import tensorrt as trt  # typed by tensorrt-stubs: mypy checks this code in CI
        from runtime.gpu import _import_pycuda

        cuda = self.cuda = _import_pycuda()
        from export.trt_build import TrtOptions, build_engine, device_target

        target = device_target(model_dir, manifest, precision, trt)
        try:
            path, info = engine_cache.select(model_dir, target)
        except engine_cache.EngineMismatch:
            if not allow_build:
                raise
            build_engine(model_dir, TrtOptions(precision=precision))
            path, info = engine_cache.select(model_dir, target)
        self.name = f"tensorrt-{precision}"
        self.max_batch = int(info.profile["max"])
        self.preferred_batch = int(info.profile["opt"])
        self.ctx = cuda.Device(0).retain_primary_context()
        self.ctx.push()
        try:
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise ModelError(f"{path}: TensorRT could not deserialise the engine")
            self.context = self.engine.create_execution_context()
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
            if "probability" not in names:
                raise ModelError(f"{path}: engine has no 'probability' output ({names})")
            self.outputs = [n for n in names if n != self.input]
            self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input)))
            c = manifest.contract
            self.field_shape = (c.seq_len, 3, c.patch, c.patch)
            self.stream = cuda.Stream()
            field_bytes = int(np.prod(self.field_shape)) * self.in_dtype.itemsize
            self.d_input = cuda.mem_alloc(self.max_batch * field_bytes)
            self.d_out = {n: cuda.mem_alloc(self.max_batch * 4) for n in self.outputs}  # (B, 1) float32 each
            self.h_prob = cuda.pagelocked_empty(self.max_batch, np.float32)
            self.context.set_tensor_address(self.input, int(self.d_input))
            for n, d in self.d_out.items():
                self.context.set_tensor_address(n, int(d))
            self.graphs: dict[int, Any] = {}
            self.cuda_graph = cuda_graph
            self._execute(self.preferred_batch)  # warm-up: first-inference costs stay out of steady state
            self.stream.synchronize()
        finally:
            cuda.Context.pop()

    @property
    def input_ptr(self) -> int:
        """Device address of the (max_batch, T, 3, P, P) input binding, for the preprocessing kernel."""
        return int(self.d_input)

    @property
    def input_fp16(self) -> bool:
        return self.in_dtype == np.float16

    def _execute(self, n: int) -> None:
        """Enqueue inference of n fields already in d_input, and the probability download, on self.stream."""
        if self.cuda_graph and n in self.graphs:
            self.graphs[n].launch(self.stream)
        else:
            self.context.set_input_shape(self.input, (n, *self.field_shape))
            if self.cuda_graph:  # capture once per batch size, after one plain run (TensorRT's recommendation)
                self.context.execute_async_v3(self.stream.handle)
                self.stream.begin_capture()
                self.context.execute_async_v3(self.stream.handle)
                self.graphs[n] = self.stream.end_capture().instantiate()
                self.graphs[n].launch(self.stream)
            elif not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
        self.cuda.memcpy_dtoh_async(self.h_prob[:n], self.d_out["probability"], self.stream)

    def run_device(self, n: int) -> np.ndarray:
        """Probabilities of the n fields the preprocessing kernel wrote to input_ptr (on self.stream)."""
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"batch of {n} fields is outside the engine's profile 1..{self.max_batch}")
        self.ctx.push()
        try:
            self._execute(n)
            self.stream.synchronize()  # the only host wait: the result is needed now
        finally:
            self.cuda.Context.pop()
        return self.h_prob[:n].copy()

    def run(self, fields: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(fields), self.max_batch):
            chunk = np.ascontiguousarray(fields[i:i + self.max_batch], dtype=self.in_dtype)
            self.ctx.push()
            try:
                self.cuda.memcpy_htod_async(self.d_input, chunk, self.stream)
            finally:
                self.cuda.Context.pop()
            out.append(self.run_device(len(chunk)))
        return np.concatenate(out)

    def close(self) -> None:
        self.ctx.push()
        try:
            self.stream.synchronize()
            self.graphs.clear()
            del self.context, self.engine, self.runtime
            self.d_input.free()
            for d in self.d_out.values():
                d.free()
        finally:
            self.cuda.Context.pop()
        self.ctx.detach()
