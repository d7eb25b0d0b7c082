"""OpenVINO CPU backend: the CPU's BF16 tier (and FP32), always with an explicit precision hint.

BF16 runs the FP32 ``model.onnx`` with OpenVINO's ``INFERENCE_PRECISION_HINT`` = bf16, which it executes natively
only where the CPU has BF16 arithmetic (x86 AVX512_BF16 or AMX). The hint is never left to OpenVINO's default (it
picks BF16 by itself on such CPUs), and a BF16 request on a CPU without native BF16 is refused, not emulated.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import Unavailable
from runtime.model.manifest import ModelError
from runtime.model.model_dir import ModelDir
from runtime.model.precisions import PRECISIONS, runs_on


class OpenVinoUnavailable(Unavailable):
    """OpenVINO is not installed, or this CPU cannot run the requested precision natively."""


def _core() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise OpenVinoUnavailable("OpenVINO is not installed (pip install -e '.[openvino]'; bash setup.sh installs "
                                  "it, setup.sh --runtime-only does not)") from None
    return ov.Core()


@functools.lru_cache(maxsize=1)
def cpu_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin reports this CPU can do natively (``OPTIMIZATION_CAPABILITIES``), e.g. BF16."""
    return tuple(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def native(precision: str) -> tuple[bool, str]:
    """(whether this CPU runs ``precision`` natively for OpenVINO, and why not when it does not)."""
    need = PRECISIONS[precision].cpu_capability
    try:
        caps = cpu_capabilities() if need else ()
    except OpenVinoUnavailable as e:
        return False, str(e)
    if not need or need in caps:
        return True, ""
    return False, f"this CPU has no native {need} (OpenVINO's CPU capabilities: {', '.join(caps)})"


def owns_the_cores(threads: int | None) -> bool:
    """Whether inference with ``threads`` threads (None: OpenVINO's choice, every core) takes every core this
    process may run on, the one case where pinning threads to cores cannot put two processes on the same core."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # Linux
    return not threads or threads >= cores


def compile_onnx(path: Path, precision: str, threads: int | None = None) -> tuple[Any, Any]:
    """(model as read, compiled model) for an ONNX file at ``precision`` (fp32 or bf16), latency-tuned; refuses
    BF16 where the CPU lacks it and checks that the hint took effect."""
    hint = PRECISIONS[precision].openvino_hint if precision in PRECISIONS else ""
    if not hint:
        raise OpenVinoUnavailable(f"OpenVINO runs the {' and '.join(runs_on('openvino'))} variants, not {precision!r}")
    ok, why = native(precision)
    if not ok:
        raise OpenVinoUnavailable(f"{precision}: {why}")
    core = _core()
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if not owns_the_cores(threads):
        # OpenVINO pins its threads to cores chosen without regard to other processes: two 1-thread processes on a
        # 2-core machine (a cohort's Ray actors) were pinned to the same core and each ran at half speed
        # (docs/performance.md). A process given fewer threads than it may run on leaves placement to the OS.
        config["ENABLE_CPU_PINNING"] = False
    try:
        model = core.read_model(str(path))
        compiled = core.compile_model(model, "CPU", config)
    except RuntimeError as e:
        raise ModelError(f"{path}: OpenVINO cannot load it ({str(e).splitlines()[0][:300]})") from None
    got = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if got != hint:
        raise OpenVinoUnavailable(f"OpenVINO compiled {path.name} with inference precision {got}, not {precision}")
    return model, compiled


def infer(request: Any, input_name: str, output_names: list[str], fields: np.ndarray) -> dict[str, np.ndarray]:
    """One synchronous run of an infer request: {output name: (B,) float32}."""
    res = request.infer({input_name: np.ascontiguousarray(fields, np.float32)})
    by_name = {k.get_any_name(): v for k, v in res.items()}
    return {n: np.asarray(by_name[n], np.float32).reshape(-1) for n in output_names}


class OpenVinoBackend:
    def __init__(self, model: ModelDir, precision: str = "bf16", threads: int | None = None) -> None:
        # Both precisions run the FP32 file; BF16 is how OpenVINO executes it, gated like a file of its own.
        manifest, fname = model.manifest, model.variant(precision).file
        path, self.file_sha256 = model.file(fname)
        graph, self.compiled = compile_onnx(path, precision, threads)
        key = ["framework", "contract"]  # the ONNX file's metadata, as OpenVINO keeps it
        stored = graph.get_rt_info(key).astype(str) if graph.has_rt_info(key) else None
        manifest.check_model(path, {i.get_any_name(): [d.get_length() if d.is_static else "?"
                                                       for d in i.get_partial_shape()] for i in graph.inputs},
                             [o.get_any_name() for o in graph.outputs], stored)
        self.request = self.compiled.create_infer_request()
        self.input_name = manifest.input_name
        self.output_names = list(manifest.output_names)
        self.precision = precision
        self.name = f"openvino-cpu-{precision}"
        self.model_file = fname
        self.preferred_batch = 1  # as ONNX Runtime on the CPU: larger batches only cost memory
        self.device_input = False
        self.on_gpu = False

    def run(self, fields: np.ndarray) -> dict[str, np.ndarray]:
        return infer(self.request, self.input_name, self.output_names, fields)

    def close(self) -> None:
        del self.request, self.compiled
