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


def cuda_options(precision: str, nhwc: bool = False, graphs: bool = False) -> dict[str, str]:
    """The CUDA execution provider's options for a variant. FP32 means FP32: TF32 off (ONNX Runtime's default is on).
    Every other variant keeps cuDNN's default math, tensor cores included: ``use_tf32=0`` selects cuDNN's FMA-only
    kernels whatever the data type, which switched tensor cores off for FP16 too. ``nhwc``: cuDNN's channels-last
    kernels (only where that layout passed its gate on a GPU); ``graphs``: CUDA graph capture (fixed bindings)."""
    return ({} if PRECISIONS[precision].tensor_cores else {"use_tf32": "0"}) | \
        ({"prefer_nhwc": "1"} if nhwc else {}) | ({"enable_cuda_graph": "1"} if graphs else {})


def make_session(model: Path | bytes, precision: str, cuda: bool, threads: int | None = None,
                 extra_cuda_options: dict[str, str] | None = None, nhwc: bool = False,
                 graphs: bool = False) -> ort.InferenceSession:
    """The one way an ONNX Runtime session is made for a variant, by the backend and by the benchmarks alike (what
    is measured is what ships); ``extra_cuda_options`` for the backend's stream or a benchmark's other settings."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    # Worker threads sleep instead of spinning between runs: no CPU burnt while idle (power on a Jetson) and no
    # stealing from other work on the same cores; a run is ~100s of ms on a CPU, so the wake-up cost is noise.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provs: list = [("CUDAExecutionProvider", cuda_options(precision, nhwc, graphs) | (extra_cuda_options or {})),
                   "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=provs)


class OrtBackend:
    """ONNX Runtime on the CPU or CUDA. On CUDA with pycuda: device inputs the kernel fills, and CUDA graphs captured
    per fixed batch (1 and the configured one), replayed on bindings made once; ``nhwc`` None: channels-last where
    the model directory records that layout passing its gate on a GPU for this precision."""

    def __init__(self, model: ModelDir, precision: str = "fp32", cuda: bool = False,
                 threads: int | None = None, nhwc: bool | None = None, graphs: bool = True) -> None:
        manifest, fname = model.manifest, model.variant(precision).file
        path, self.file_sha256 = model.file(fname)
        self.device_input = False
        self.notes: list[str] = []
        self.nhwc = cuda and (model.layout_passed(precision, "nhwc") if nhwc is None else nhwc)
        device_options = self._device_buffers(manifest) if cuda else None
        self.graphs = graphs and self.device_input  # a graph replays fixed addresses: our device buffers only
        self._make = lambda graphs: make_session(path, precision, cuda, threads, device_options, self.nhwc, graphs)
        try:
            try:
                self.session = self._session()
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
            self._free_device()  # the device buffers made above are not left behind
            raise
        meta = self.session.get_modelmeta().custom_metadata_map
        manifest.check_model(path, {i.name: list(i.shape) for i in self.session.get_inputs()},
                             [o.name for o in self.session.get_outputs()], meta.get("contract"))
        self.input_name = manifest.input_name
        self.output_names = list(manifest.output_names)
        self.precision = precision
        self.name = f"onnxruntime-{'cuda' if cuda else 'cpu'}-{precision}" + ("-nhwc" if self.nhwc else "")
        self.model_file = fname
        # On the CPU one field (6 patches) per run: larger batches only cost memory (docs/performance.md); GPUs want
        # more.
        self.preferred_batch = 8 if cuda else 1
        self.on_gpu = cuda
        self.batches: tuple[int, ...] = ()  # fixed sizes (fix_batches); () runs every batch at its own size
        self._bound: dict[tuple[int, int], tuple[ort.SessionIOBinding, ort.RunOptions, dict[str, tuple]]] = {}

    def _session(self) -> ort.InferenceSession:
        """The session, with CUDA graphs where asked for; a graph ONNX Runtime refuses to capture (a node off the
        GPU) is said once, in the backend's notes, and the session made uncaptured."""
        if not self.graphs:
            return self._make(False)
        try:
            return self._make(True)
        except Exception as e:
            self.graphs = False
            self.notes.append(f"CUDA graphs refused, running uncaptured: {str(e).splitlines()[0][:200]}")
            return self._make(False)

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
        nbytes = self.max_batch * int(np.prod(self.field_shape)) * 4
        with self.context.active() as cuda:
            self.stream = cuda.Stream()
            self.d_inputs = [cuda.mem_alloc(nbytes) for _ in range(2)]
            for d in self.d_inputs:  # a padded batch's spare rows hold zeros (or an earlier batch), never garbage
                cuda.memset_d8(d, 0, nbytes)
        self.d_outputs: list = []  # device outputs of the bindings, freed with the inputs
        self.input_ptrs = tuple(int(d) for d in self.d_inputs)
        self.input_fp16 = False  # every variant keeps float32 inputs
        self.device_input = True
        return {"has_user_compute_stream": "1", "user_compute_stream": str(self.stream.handle)}

    def fix_batches(self, sizes: tuple[int, ...]) -> list[str]:
        """The batch sizes the caller will fill (1 and its configured batch): with graphs, each is captured now,
        per slot, before any batch is staged (a capture records whatever else is queued on its stream meanwhile),
        and a partial batch later runs padded to the next size up. A capture that fails is said (the returned
        notes) and the session made again, uncaptured."""
        if not self.graphs:
            return []
        self.batches = tuple(sorted(set(sizes)))
        try:
            for fixed in self.batches:
                for slot in range(len(self.input_ptrs)):
                    for _ in range(3):  # ONNX Runtime runs uncaptured first (its allocations), then captures
                        self.run_device(fixed, slot)
        except Exception as e:  # ORT raises its own types (Fail, RuntimeException)
            with self.context.active():
                self.stream.synchronize()
            self.graphs, self.batches = False, ()
            self._bound.clear()
            self.session = self._make(False)
            return [f"CUDA graph capture failed, running uncaptured: {str(e).splitlines()[0][:200]}"]
        return []

    def run_device(self, n: int, slot: int = 0) -> dict[str, np.ndarray]:
        """Outputs for the n fields the preprocessing kernel wrote into input ``slot`` (it ran on the stream ONNX
        Runtime computes on, so it is done before the run reads its input), via bindings made once per size."""
        fixed = next((b for b in self.batches if b >= n), n)
        io, options, host = self._binding(fixed, slot)
        self.session.run_with_iobinding(io, options)
        with self.context.active() as cuda:  # outputs bound on the device, copied into pinned host arrays
            for d, h in host.values():
                cuda.memcpy_dtoh_async(h, d, self.stream)
            self.stream.synchronize()
        return {name: h[:n].copy() for name, (_, h) in host.items()}

    def _binding(self, fixed: int, slot: int) -> tuple[ort.SessionIOBinding, ort.RunOptions, dict[str, tuple]]:
        """The I/O binding of (batch size, slot), made once: what a CUDA graph replays must not move."""
        key = (fixed, slot)
        if key not in self._bound:
            io, options, host = self.session.io_binding(), ort.RunOptions(), {}
            io.bind_input(self.input_name, "cuda", 0, np.float32, [fixed, *self.field_shape], self.input_ptrs[slot])
            with self.context.active() as cuda:
                for name in self.output_names:
                    d = cuda.mem_alloc(fixed * 4)
                    self.d_outputs.append(d)
                    host[name] = (d, cuda.pagelocked_empty(fixed, np.float32))
                    io.bind_output(name, "cuda", 0, np.float32, [fixed, 1], int(d))
            if self.graphs:  # graph ids start at 1 (ONNX Runtime's gpu_graph_id; -1 would mean uncaptured)
                options.add_run_config_entry("gpu_graph_id", str(len(self._bound) + 1))
            self._bound[key] = (io, options, host)
        return self._bound[key]

    def run(self, fields: np.ndarray) -> dict[str, np.ndarray]:
        """Host fields in, host outputs out (CPU preprocessing); never captured: a graph replays fixed addresses."""
        options = ort.RunOptions()
        if self.graphs:
            options.add_run_config_entry("gpu_graph_id", "-1")
        values = self.session.run(self.output_names, {self.input_name: fields}, options)
        return {n: np.asarray(v, np.float32).reshape(-1) for n, v in zip(self.output_names, values)}

    def close(self) -> None:
        self._bound.clear()
        del self.session
        self._free_device()

    def _free_device(self) -> None:
        if hasattr(self, "d_inputs"):
            with self.context.active():
                self.stream.synchronize()
                for d in self.d_inputs + self.d_outputs:
                    d.free()
            del self.d_inputs
            self.context.close()
