"""ONNX -> TensorRT engine, for TensorRT 10 (JetPack 6: builder precision flags) and 11 (strongly typed).

No PyTorch here: this module runs on the Jetson itself, where engines must be built for the local GPU.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.backends import engines
from runtime.backends.engines import EngineInfo, TrtUnavailable, device_target, import_tensorrt, plan_build
from runtime.model.manifest import Manifest
from runtime.model.model_dir import ModelDir
from runtime.model.precisions import ENGINE_PRECISIONS

if TYPE_CHECKING:
    import tensorrt as trt

CONV_SCOPE = "/encoder/vgg16/"  # ONNX node-name prefix of the convolution chain (export/model.py's module path)


@dataclass(frozen=True)
class TrtOptions:
    """What `python -m export trt` accepts; every field is recorded in the engine's sidecar."""

    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mb: int = 1024  # leaves room on an 8 GB Jetson Orin Nano, shared with the OS and the runtime
    dla_core: int | None = None
    timing_cache: str | None = None
    calib_images: str | None = None  # TensorRT 10 INT8: folder of real images for the entropy calibrator
    calib_count: int = 64  # images (all their fields) used for calibration

    def validate(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(ENGINE_PRECISIONS)}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("batch sizes must satisfy 1 <= min <= opt <= max")
        if self.workspace_mb < 16:
            raise ValueError("workspace must be at least 16 MB")


def build_engine(model: ModelDir, opts: TrtOptions, log: Callable[[str], None] = print) -> Path:
    """Build, save with its sidecar and return the engine path. Raises TrtUnavailable with the parser's errors."""
    opts.validate()
    import_tensorrt()  # clear error where TensorRT is missing or only its stubs are installed
    import tensorrt as trt  # typed by tensorrt-stubs: mypy checks this builder code in CI
    manifest = model.manifest
    plan = plan_build(int(trt.__version__.split(".")[0]), opts.precision, model)
    onnx_path = model.path / plan.onnx_file
    if not onnx_path.is_file():
        raise TrtUnavailable(f"{onnx_path}: not found (TensorRT {trt.__version__} builds {opts.precision} from it)")
    target = device_target(model, opts.precision, trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)  # explicit batch is the only mode in TensorRT 10+
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrtUnavailable(f"{onnx_path}: the TensorRT ONNX parser refused it:\n  {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    inp = network.get_input(0)
    field = [inp.shape[i] for i in range(1, len(inp.shape))]  # (T, 3, P, P) after the dynamic batch axis
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, trt.Dims([opts.min_batch, *field]), trt.Dims([opts.opt_batch, *field]),
                      trt.Dims([opts.max_batch, *field]))
    config.add_optimization_profile(profile)
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.constrain_tail_fp32:
        pinned = _pin_tail_fp32(network)
        log(f"TensorRT {trt.__version__}: {len(pinned)} layers after the convolution chain constrained to FP32")
    if plan.calibrate:
        if not opts.calib_images:
            raise TrtUnavailable("INT8 on TensorRT 10 needs --calib-images DIR (real images for calibration)")
        config.int8_calibrator = make_calibrator(trt, manifest, Path(opts.calib_images), opts.calib_count,
                                                 opts.opt_batch, model.engines / "int8.calib")
        config.set_calibration_profile(profile)
    if opts.dla_core is not None:
        if builder.num_DLA_cores <= opts.dla_core:
            raise TrtUnavailable(f"DLA core {opts.dla_core} requested; this device has {builder.num_DLA_cores}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = opts.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers the DLA cannot run (LSTM) stay on the GPU
    cache_path = Path(opts.timing_cache) if opts.timing_cache else model.engines / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"{cache_path}: timing cache from another device or TensorRT; timing from scratch")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    config.progress_monitor = make_progress_monitor(trt, log)
    log(f"building {opts.precision} engine from {plan.onnx_file} for {target.gpu} (sm {target.compute_capability}),"
        f" batch {opts.min_batch}/{opts.opt_batch}/{opts.max_batch}, workspace {opts.workspace_mb} MB ...")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise TrtUnavailable("TensorRT could not build the engine (see the TensorRT messages above)")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    info = EngineInfo(target=target, onnx_file=plan.onnx_file,
                      profile={"min": opts.min_batch, "opt": opts.opt_batch, "max": opts.max_batch},
                      options=asdict(opts), build_seconds=round(seconds, 1))
    path = engines.save(model.engines, info, bytes(memoryview(serialized)))
    log(f"built {path.name} in {seconds:.1f} s")
    return path


def _pin_tail_fp32(network: trt.INetworkDefinition) -> list[str]:
    """TensorRT 10 with FP16 enabled: only the (range-safe) convolution chain may run in FP16; pooling, Dense,
    BatchNorm (whose rescaled statistics underflow in FP16), the LSTM and the sigmoid run in FP32 (with
    OBEY_PRECISION_CONSTRAINTS set, the build fails rather than silently ignoring this)."""
    import tensorrt as trt
    floats = (trt.float32, trt.float16)
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [k for k in range(layer.num_outputs) if layer.get_output(k).dtype in floats]
        if layer.name.startswith(CONV_SCOPE) or not outs:
            continue
        layer.precision = trt.float32
        for k in outs:
            layer.set_output_type(k, trt.float32)
        pinned.append(layer.name)
    if not any("LSTM" in name for name in pinned):
        raise TrtUnavailable("no LSTM layers found after the convolution chain: cannot keep the tail in FP32")
    return pinned


def make_progress_monitor(trt: Any, log: Callable[[str], None]) -> Any:
    """Build progress on stderr, one line per phase (TensorRT calls it from the builder thread)."""

    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.t0: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.t0[phase_name] = time.perf_counter()
            log(f"  {'  ' if parent_phase else ''}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            dt = time.perf_counter() - self.t0.pop(phase_name, time.perf_counter())
            if dt > 1:
                log(f"  {phase_name} done in {dt:.1f} s")

    return Monitor()


def make_calibrator(trt: Any, manifest: Manifest, folder: Path, n_images: int, batch: int, cache: Path) -> Any:
    """TensorRT 10 INT8 entropy calibration fed with real fields (CPU preprocessing, same contract); the
    calibration cache is saved so a rebuild does not calibrate again."""
    import pycuda.driver as cuda

    from runtime.io.fields import folder_fields

    data = folder_fields(folder, manifest.contract, n_images)
    if not len(data):
        raise TrtUnavailable(f"--calib-images {folder}: no usable images for INT8 calibration")
    batch = min(batch, len(data))  # the profile's optimum batch: calibration runs the engine's usual shape

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.pos = 0
            self.device = cuda.mem_alloc(data[:batch].nbytes)

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.pos + batch > len(data):
                return None
            cuda.memcpy_htod(self.device, np.ascontiguousarray(data[self.pos:self.pos + batch]))
            self.pos += batch
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, blob: Any) -> None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_bytes(bytes(memoryview(blob)))

    print(f"INT8 calibration on {len(data)} fields from {folder}", file=sys.stderr)
    return Calibrator()
