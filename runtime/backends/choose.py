"""Which backend runs: ``open_backend`` picks one once, by name or "auto", and the precision it runs."""
from __future__ import annotations

from runtime.backends.base import Backend, BackendUnavailable
from runtime.errors import Unavailable
from runtime.model.manifest import ModelError
from runtime.model.model_dir import ModelDir

BACKENDS = ("auto", "cpu", "openvino", "onnxruntime-cuda", "tensorrt")  # "cpu" is ONNX Runtime on the CPU
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
PREPROCESSORS = ("auto", "cpu", "gpu")


def resolve_precision(requested: str, on_gpu: bool, model: ModelDir) -> tuple[str, list[str]]:
    """(precision, notes). An explicit precision must be a listed variant (else ModelError with its gate result);
    "auto" is FP16 on a GPU where the model has a passing FP16 variant, FP32 otherwise, and says why."""
    if requested not in PRECISIONS:
        raise BackendUnavailable(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        model.variant(requested)
        return requested, []
    if not on_gpu:
        return "fp32", []
    try:
        model.variant("fp16")
        return "fp16", []
    except ModelError as e:
        return "fp32", [f"precision auto chose fp32: {e}"]


def open_backend(name: str, model: ModelDir, threads: int | None = None,
                 precision: str = "auto", allow_build: bool = False) -> tuple[Backend, list[str]]:
    """(backend, notes). "auto" tries TensorRT, then ONNX Runtime CUDA, then the CPU tier, noting why each one it
    skipped could not be used; a backend named explicitly fails loudly instead. ``precision`` picks the model
    variant (one meaning on every backend; see resolve_precision and cpu_tier)."""
    from runtime.backends import ort

    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if precision == "bf16":  # the one place the bf16 rule is stated: OpenVINO, on a CPU with native BF16
        if name not in ("auto", "openvino"):
            raise BackendUnavailable(f"bf16 is the CPU tier, run by OpenVINO: backend {name} has no bf16 tier (use "
                                     "--backend openvino, or auto on a CPU with native BF16)")
        from runtime.backends.openvino import native_bf16

        ok, reason = native_bf16()
        if not ok:  # checked before the model's variant table: whether or not this export made a bf16 variant
            raise BackendUnavailable(f"bf16 cannot run here: {reason}; use --precision fp32")
    notes: list[str] = []
    gpu_wanted = name in ("tensorrt", "onnxruntime-cuda") or (name == "auto" and precision != "bf16")
    if gpu_wanted and name in ("auto", "tensorrt"):
        from runtime.backends import trt
        from runtime.backends.engines import EngineMismatch, TrtUnavailable
        from runtime.gpu.context import GpuUnavailable

        try:
            prec, why = resolve_precision(precision, True, model)
            return trt.TensorRTBackend(model, prec, allow_build), notes + why
        except (TrtUnavailable, GpuUnavailable, EngineMismatch) as e:
            if name == "tensorrt":
                raise BackendUnavailable(f"backend tensorrt: {e}") from None
            notes.append(f"tensorrt skipped: {str(e).splitlines()[0]}")
    if gpu_wanted and name in ("auto", "onnxruntime-cuda"):
        msg = "needs onnxruntime-gpu and a CUDA GPU; this onnxruntime offers " + ", ".join(ort.providers())
        try:
            if ort.cuda_available():
                prec, why = resolve_precision(precision, True, model)
                return ort.OrtBackend(model, prec, cuda=True, threads=threads), notes + why
        except ort.CudaDidNotStart as e:  # listed, but it did not start
            msg = str(e)
        if name == "onnxruntime-cuda":
            raise BackendUnavailable(f"backend onnxruntime-cuda: {msg}")
        notes.append(f"onnxruntime-cuda skipped: {msg}")
    backend, why = cpu_tier(name, precision, model, threads)
    return backend, notes + why


def cpu_tier(name: str, precision: str, model: ModelDir, threads: int | None) -> tuple[Backend, list[str]]:
    """The CPU backends. Precision auto: BF16 on OpenVINO where this CPU has native BF16 and the model a BF16
    variant that passed its gate (said in a note), else FP32 (ONNX Runtime, or OpenVINO when named). An explicit
    precision runs exactly that variant, or is refused with the reason."""
    from runtime.backends import openvino, ort

    if name == "cpu" or precision in ("fp16", "int8") or (name == "auto" and precision == "fp32"):
        if name == "openvino":
            raise BackendUnavailable(f"backend openvino runs fp32 and bf16, not {precision}")
        prec, why = resolve_precision(precision, False, model)
        return ort.OrtBackend(model, prec, cuda=False, threads=threads), why
    notes: list[str] = []
    if precision == "auto":
        ok, reason = openvino.native_bf16()
        try:
            gate = model.variant("bf16").gate if ok else {}
        except ModelError as e:
            ok, reason = False, str(e)
        if ok:
            precision = "bf16"
            notes.append(f"precision auto chose bf16 (OpenVINO): this CPU has native BF16 and the model's BF16 "
                         f"variant passed its gate ({gate.get('fields')} fields, {gate.get('label_agreement', 0):.0%}"
                         f" labels kept, probability max|d| {gate.get('max_abs', {}).get('probability', 0):.2g}); "
                         "--precision fp32 forces FP32")
        else:
            notes.append(f"precision auto chose fp32: no bf16 tier here ({reason})")
            if name == "auto":
                return ort.OrtBackend(model, "fp32", cuda=False, threads=threads), notes
            precision = "fp32"
    try:
        return openvino.OpenVinoBackend(model, precision, threads), notes
    except (openvino.OpenVinoUnavailable, ModelError) as e:
        if not (name == "auto" and notes):  # asked for explicitly: say why not
            raise BackendUnavailable(f"backend openvino: {e}") if isinstance(e, Unavailable) else e from None
        why = [f"precision auto fell back to fp32: OpenVINO could not run bf16 ({str(e).splitlines()[0]})"]
        return ort.OrtBackend(model, "fp32", cuda=False, threads=threads), why

