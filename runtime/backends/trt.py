"""TensorRT backend: one engine deserialised once, one execution context on one stream, named-tensor API.

Input comes either from the host (``run``) or already on the device in one of two ``input_ptrs``, written there by
the GPU preprocessing kernel on ``stream`` (``run_device``; the next batch is written into the other): then the
image crosses the bus once, as uint8. Buffers are sized from the engine's own tensor shapes and types, checked
against the manifest's contract.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from runtime.backends import engines
from runtime.backends.engines import import_tensorrt
from runtime.model.manifest import ModelError
from runtime.model.model_dir import ModelDir


class TensorRTBackend:
    def __init__(self, model: ModelDir, precision: str = "fp16", allow_build: bool = False) -> None:
        import_tensorrt()
        import tensorrt as trt  # typed by tensorrt-stubs: mypy checks this code in CI

        from runtime.gpu.context import Context

        self.context = Context()  # the primary context, shared with the preprocessing kernel
        manifest, target = model.manifest, engines.device_target(model, precision, trt)
        try:
            path, info = engines.select(model.engines, target)
        except engines.EngineMismatch:
            if not allow_build:
                raise
            from runtime.backends.trt_build import TrtOptions, build_engine

            build_engine(model, TrtOptions(precision=precision))
            path, info = engines.select(model.engines, target)
        self.name = f"tensorrt-{precision}"
        self.precision = precision
        self.model_file, self.file_sha256 = f"engines/{path.name}", info.engine_sha256
        self.device_input = self.on_gpu = True
        self.max_batch = int(info.profile["max"])
        self.preferred_batch = int(info.profile["opt"])
        self.field_shape = manifest.contract.field_shape
        with self.context.active() as cuda:
            self.cuda = cuda
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise ModelError(f"{path}: TensorRT could not deserialise the engine")
            self.execution = self.engine.create_execution_context()
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            self.input = manifest.input_name
            self.outputs = list(manifest.output_names)
            if self.input not in names or not set(self.outputs) <= set(names):
                raise ModelError(f"{path}: engine tensors {names} do not match the manifest "
                                 f"({self.input} -> {', '.join(self.outputs)})")
            dims = self.engine.get_tensor_shape(self.input)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            if shape[1:] != self.field_shape:
                raise ModelError(f"{path}: engine input {shape} does not fit the contract's fields {self.field_shape}")
            self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input)))
            self.stream = cuda.Stream()
            self.d_inputs = [cuda.mem_alloc(self.max_batch * int(np.prod(self.field_shape)) * self.in_dtype.itemsize)
                             for _ in range(2)]
            self.h_out: dict[str, Any] = {}
            self.d_out: dict[str, Any] = {}
            for n in self.outputs:  # (B, 1) each; element type from the engine
                dt = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
                self.h_out[n] = cuda.pagelocked_empty(self.max_batch, dt)
                self.d_out[n] = cuda.mem_alloc(self.max_batch * dt.itemsize)
            for n, ptr in [(self.input, self.d_inputs[0]), *self.d_out.items()]:
                if not self.execution.set_tensor_address(n, int(ptr)):
                    raise ModelError(f"{path}: TensorRT refused the address of tensor {n}")
            self._execute(self.preferred_batch)  # warm-up: first-inference costs stay out of steady state
            self.stream.synchronize()

    @property
    def input_ptrs(self) -> tuple[int, ...]:
        """Device addresses of the two (max_batch, T, 3, P, P) inputs, for the preprocessing kernel."""
        return tuple(int(d) for d in self.d_inputs)

    @property
    def input_fp16(self) -> bool:
        return self.in_dtype == np.float16

    def _execute(self, n: int, slot: int = 0) -> None:
        """Enqueue inference of n fields already in input ``slot``, and the outputs' download, on self.stream."""
        if not self.execution.set_tensor_address(self.input, int(self.d_inputs[slot])):
            raise RuntimeError(f"TensorRT refused the address of input {slot}")
        if not self.execution.set_input_shape(self.input, (n, *self.field_shape)):
            raise RuntimeError(f"TensorRT refused batch {n} (profile 1..{self.max_batch})")
        if not self.execution.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for name, d in self.d_out.items():
            self.cuda.memcpy_dtoh_async(self.h_out[name][:n], d, self.stream)

    def fix_batches(self, sizes: tuple[int, ...]) -> list[str]:
        """Nothing to prepare: the engine runs any batch in its profile as it comes."""
        return []

    def run_device(self, n: int, slot: int = 0) -> dict[str, np.ndarray]:
        """Outputs for the n fields the preprocessing kernel wrote into input ``slot`` (on self.stream)."""
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"batch of {n} fields is outside the engine's profile 1..{self.max_batch}")
        with self.context.active():
            self._execute(n, slot)
            self.stream.synchronize()  # the only host wait: the result is needed now
        return {name: h[:n].astype(np.float32) for name, h in self.h_out.items()}

    def run(self, fields: np.ndarray) -> dict[str, np.ndarray]:
        out: list[dict[str, np.ndarray]] = []
        for i in range(0, len(fields), self.max_batch):
            chunk = np.ascontiguousarray(fields[i:i + self.max_batch], dtype=self.in_dtype)
            with self.context.active() as cuda:
                cuda.memcpy_htod_async(self.d_inputs[0], chunk, self.stream)
            out.append(self.run_device(len(chunk)))
        return {name: np.concatenate([o[name] for o in out]) for name in self.outputs}

    def close(self) -> None:
        with self.context.active():
            self.stream.synchronize()
            del self.execution, self.engine, self.runtime
            for d in self.d_inputs:
                d.free()
            for d in self.d_out.values():
                d.free()
        self.context.close()
