"""ONNX Runtime backend (CPU, or the CUDA execution provider where onnxruntime-gpu and a GPU are present)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.errors import Unavailable
from runtime.model.manifest import Manifest, ModelError
from runtime.model.model_dir import ModelDir
from runtime.model.precisions import PRECISIONS


class CudaDidNotStart(Unavailable):
    """onnxruntime-gpu lists its CUDA provider, but a session could not start it (missing CUDA or cuDNN, no GPU)."""


def providers() -> list[str]:
    return list(ort.get_available_providers())


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in providers()


def cuda_options(precision: str) -> dict[str, str]:
    """The CUDA execution provider's options for a variant. FP32 means FP32: TF32 off (ONNX Runtime's default is on).
    Every other variant keeps cuDNN's default math, tensor cores included: ``use_tf32=0`` selects cuDNN's FMA-only
    kernels whatever the data type, which switched tensor cores off for FP16 too."""
    return {} if PRECISIONS[precision].tensor_cores else {"use_tf32": "0"}


def make_session(model: Path | bytes, precision: str, cuda: bool, threads: int | None = None,
                 extra_cuda_options: dict[str, str] | None = None) -> ort.InferenceSession:
    """The one way an ONNX Runtime session is made for a variant, by the backend and by the benchmarks alike (what
    is measured is what ships); ``extra_cuda_options`` for a benchmark's other settings (NHWC, CUDA graphs)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    # Worker threads sleep instead of spinning between runs: no CPU burnt while idle (power on a Jetson) and no
    # stealing from other work on the same cores; a run is ~100s of ms on a CPU, so the wake-up cost is noise.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provs: list = [("CUDAExecutionProvider", cuda_options(precision) | (extra_cuda_options or {})),
                   "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=provs)


class OrtBackend:
    def __init__(self, model: ModelDir, precision: str = "fp32", cuda: bool = False,
                 threads: int | None = None) -> None:
        manifest, fname = model.manifest, model.variant(precision).file
        path, self.file_sha256 = model.file(fname)
        self.device_input = False
        device_options = self._device_buffers(manifest) if cuda else None
        try:
            try:
                self.session = make_session(path, precision, cuda, threads, device_options)
            except Exception as e:  # ORT reports corrupt/foreign files with its own exception types
                raise ModelError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:300]})") from None
            used = self.session.get_providers()
            if cuda and "CUDAExecutionProvider" not in used:
                # ONNX Runtime falls back to the CPU silently when the CUDA provider fails to start (missing CUDA or
                # cuDNN libraries, no usable GPU): this backend would then say CUDA while running on the CPU.
                del self.session
                raise CudaDidNotStart("the CUDA execution provider did not start (ONNX Runtime fell back to the "
                                      "CPU; its log says why, e.g. missing CUDA or cuDNN libraries); the session "
                                      f"had only {', '.join(used)}")
        except BaseException:
            self._free_device()  # the device inputs made above are not left behind
            raise
        meta = self.session.get_modelmeta().custom_metadata_map
        manifest.check_model(path, {i.name: list(i.shape) for i in self.session.get_inputs()},
                             [o.name for o in self.session.get_outputs()], meta.get("contract"))
        self.input_name = manifest.input_name
        self.output_names = list(manifest.output_names)
        self.precision = precision
        self.name = f"onnxruntime-{'cuda' if cuda else 'cpu'}-{precision}"
        self.model_file = fname
        # On the CPU one field (6 patches) per run: larger batches only cost memory (docs/performance.md); GPUs want
        # more.
        self.preferred_batch = 8 if cuda else 1
        self.on_gpu = cuda

    def _device_buffers(self, manifest: Manifest) -> dict[str, str] | None:
        """With pycuda present: a stream of ours that ONNX Runtime computes on (``user_compute_stream``), so the
        preprocessing kernel, the run and the next batch's upload are ordered on it without a host wait, and two
        device inputs the kernel fills in turn (I/O binding). The provider options that say so; None: host input."""
        from runtime.gpu.context import Context, GpuUnavailable

        try:
            self.context = Context()  # the primary context: the one ONNX Runtime's CUDA EP also uses
        except GpuUnavailable:
            return None
        self.field_shape = manifest.contract.field_shape
        self.max_batch = 32
        with self.context.active() as cuda:
            self.stream = cuda.Stream()
            self.d_inputs = [cuda.mem_alloc(self.max_batch * int(np.prod(self.field_shape)) * 4) for _ in range(2)]
        self.input_ptrs = tuple(int(d) for d in self.d_inputs)
        self.input_fp16 = False  # every variant keeps float32 inputs
        self.device_input = True
        return {"has_user_compute_stream": "1", "user_compute_stream": str(self.stream.handle)}

    def run_device(self, n: int, slot: int = 0) -> dict[str, np.ndarray]:
        """Outputs for the n fields the preprocessing kernel wrote into input ``slot``, via I/O binding. The kernel
        ran on the stream ONNX Runtime computes on, so it is done before the run reads its input."""
        io = self.session.io_binding()
        io.bind_input(self.input_name, "cuda", 0, np.float32, [n, *self.field_shape], self.input_ptrs[slot])
        for name in self.output_names:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        return self._named(io.copy_outputs_to_cpu())

    def run(self, fields: np.ndarray) -> dict[str, np.ndarray]:
        return self._named(self.session.run(self.output_names, {self.input_name: fields}))

    def _named(self, values: list) -> dict[str, np.ndarray]:
        return {n: np.asarray(v, np.float32).reshape(-1) for n, v in zip(self.output_names, values)}

    def close(self) -> None:
        del self.session
        self._free_device()

    def _free_device(self) -> None:
        if hasattr(self, "d_inputs"):
            with self.context.active():
                self.stream.synchronize()
                for d in self.d_inputs:
                    d.free()
            del self.d_inputs
            self.context.close()
