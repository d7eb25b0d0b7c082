"""Which backend runs: ``open_backend`` picks one once, by name or "auto", and the precision it runs."""
from __future__ import annotations

from collections.abc import Callable

from runtime.backends.base import Backend, BackendUnavailable
from runtime.errors import Unavailable
from runtime.model.manifest import ModelError
from runtime.model.model_dir import ModelDir, recheck_band
from runtime.model.precisions import CHOICES, GPU_BACKENDS, PRECISIONS, preferred, runs_on

BACKENDS = ("auto", "cpu", "openvino", "onnxruntime-cuda", "tensorrt", "triton")  # "cpu": ONNX Runtime on the CPU;
# "triton": a Triton Inference Server (runtime/backends/triton.py: open_triton, which the Classifier calls)
LAYOUTS = {"auto": None, "nchw": False, "nhwc": True}  # ONNX Runtime CUDA's NHWC preference; auto: where gated
PREPROCESSORS = ("auto", "cpu", "gpu")
DECODERS = ("auto", "cpu", "gpu")  # where JPEGs are decoded (runtime/pipeline/decoding.py: open_gpu_jpeg)


def resolve_precision(requested: str, on_gpu: bool, model: ModelDir) -> tuple[str, list[str]]:
    """(precision, notes). An explicit precision must be a listed variant (else ModelError with its gate result);
    "auto" is the table's GPU precision on a GPU where the model has a passing variant of it, FP32 otherwise, and
    says why."""
    if requested != "auto":
        model.variant(requested)
        return requested, []
    best = preferred("gpu")
    if not on_gpu or best is None:
        return "fp32", []
    try:
        model.variant(best.name)
        return best.name, []
    except ModelError as e:
        return "fp32", [f"precision auto chose fp32: {e}"]


def open_backend(name: str, model: ModelDir, threads: int | None = None, precision: str = "auto",
                 allow_build: bool = False, layout: str = "auto", recheck: bool = True) -> tuple[Backend, list[str]]:
    """(backend, notes). "auto" tries TensorRT, then ONNX Runtime CUDA, then the CPU tier, noting why each one it
    skipped could not be used; a backend named explicitly fails loudly instead. ``precision`` picks the model
    variant (one meaning on every backend; see resolve_precision and cpu_tier); ``layout`` the memory layout ONNX
    Runtime CUDA prefers (auto: NHWC where this model's variant passed its gate in it on a GPU); ``recheck``: whether
    a faster tier's in-band fields will be re-checked at FP32 (auto counts their cost only then). Where re-checks
    are on and the band is an old export's probability bound, a note says so."""
    backend, notes = _open_backend(name, model, threads, precision, allow_build, layout, recheck)
    if recheck and backend.precision in model.manifest.variants:
        note = recheck_band(model.manifest, backend.precision)[1]
        notes += [note] if note else []
    return backend, notes


def _open_backend(name: str, model: ModelDir, threads: int | None, precision: str, allow_build: bool, layout: str,
                  recheck: bool) -> tuple[Backend, list[str]]:
    from runtime.backends import ort

    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "triton":
        raise BackendUnavailable("backend triton needs a server: --triton-url http://HOST:PORT or grpc://HOST:PORT")
    if precision not in CHOICES:
        raise BackendUnavailable(f"unknown precision {precision!r}; choose one of {', '.join(CHOICES)}")
    if layout not in LAYOUTS:
        raise BackendUnavailable(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    row = PRECISIONS.get(precision)  # None: auto
    if row is not None and name != "auto" and name not in row.backends:  # the table says which backends run it
        raise BackendUnavailable(f"backend {name} has no {precision} tier: it runs {' and '.join(runs_on(name))}; "
                                 f"{precision} is {row.role}")
    if row is not None and row.cpu_capability:
        from runtime.backends.openvino import native

        ok, reason = native(precision)
        if not ok:  # checked before the model's variant table: whether or not this export made the variant
            raise BackendUnavailable(f"{precision} cannot run here: {reason}; use --precision fp32")
    notes: list[str] = []
    on_gpu = row is None or bool(set(GPU_BACKENDS) & set(row.backends))  # auto tries the GPU for this precision
    gpu_wanted = name in GPU_BACKENDS or (name == "auto" and on_gpu)
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
                cuda_backend = ort.OrtBackend(model, prec, cuda=True, threads=threads, nhwc=LAYOUTS[layout])
                return cuda_backend, notes + why + cuda_backend.notes
        except ort.CudaDidNotStart as e:  # listed, but it did not start
            msg = str(e)
        if name == "onnxruntime-cuda":
            raise BackendUnavailable(f"backend onnxruntime-cuda: {msg}")
        notes.append(f"onnxruntime-cuda skipped: {msg}")
    backend, why = cpu_tier(name, precision, model, threads, recheck)
    return backend, notes + why


def cpu_tier(name: str, precision: str, model: ModelDir, threads: int | None,
             recheck: bool = True) -> tuple[Backend, list[str]]:
    """The CPU backends. Precision auto: an INT8 variant the export kept (it passed its gate and, counting its
    re-checks where ``recheck``, beat every other tier where it was exported) on ONNX Runtime; else the table's CPU
    precision (BF16) on OpenVINO where this CPU runs it natively, the model has a variant of it that passed its gate
    and it is faster than FP32 by its gate's figures (counting its re-checks where ``recheck``) (said in a note),
    else FP32 (ONNX Runtime, or OpenVINO when named). An explicit precision runs exactly that variant, or is refused
    with the reason."""
    from runtime.backends import openvino, ort

    if precision == "auto" and name in ("auto", "cpu") and "int8" in model.manifest.variants:
        speed = _speed("int8", model.variant("int8").gate, recheck)
        if speed and not speed.startswith("slower"):
            return ort.OrtBackend(model, "int8", cuda=False, threads=threads), [
                f"precision auto chose int8 (ONNX Runtime): the model's INT8 variant passed its gate{speed}; "
                "--precision fp32 forces FP32"]
    row = PRECISIONS.get(precision)
    if name == "cpu" or (row is not None and "openvino" not in row.backends) or (name, precision) == ("auto", "fp32"):
        prec, why = resolve_precision(precision, False, model)
        return ort.OrtBackend(model, prec, cuda=False, threads=threads), why
    notes: list[str] = []
    best = preferred("cpu")
    if precision == "auto" and best is not None:
        ok, reason = openvino.native(best.name)
        try:
            gate = model.variant(best.name).gate if ok else {}
        except ModelError as e:
            ok, reason = False, str(e)
        speed = _speed(best.name, gate, recheck) if ok else ""
        if ok and speed.startswith("slower"):
            ok, reason = False, speed
        if ok:
            precision = best.name
            notes.append(f"precision auto chose {best.name} (OpenVINO): this CPU has native {best.cpu_capability} and "
                         f"the model's {best.name.upper()} variant passed its gate ({gate.get('fields')} fields, "
                         f"{gate.get('label_agreement', 0):.0%} labels kept outside its re-check band, probability "
                         f"max|d| {gate.get('max_abs', {}).get('probability', 0):.2g}){speed}; --precision fp32 "
                         "forces FP32")
        else:
            notes.append(f"precision auto chose fp32: no {best.name} tier here ({reason})")
            if name == "auto":
                return ort.OrtBackend(model, "fp32", cuda=False, threads=threads), notes
    precision = "fp32" if precision == "auto" else precision
    try:
        return openvino.OpenVinoBackend(model, precision, threads), notes
    except (openvino.OpenVinoUnavailable, ModelError) as e:
        if not (name == "auto" and notes):  # asked for explicitly: say why not
            raise BackendUnavailable(f"backend openvino: {e}") if isinstance(e, Unavailable) else e from None
        why = [f"precision auto fell back to fp32: OpenVINO could not run {precision} ({str(e).splitlines()[0]})"]
        return ort.OrtBackend(model, "fp32", cuda=False, threads=threads), why


def _speed(precision: str, gate: dict, recheck: bool = True) -> str:
    """What the gate measured of a CPU tier's speed, counting its re-checks where they are on: ", N ms per field with
    its re-checks (...)", "slower ..." where they (or its own time) eat the gain, "" where the gate recorded no
    times."""
    from runtime.model.fidelity import effective_ms

    ms, fields = gate.get("ms_per_field"), gate.get("fields") or 0
    if not ms or not fields:
        return ""
    if not recheck:  # --recheck off: no field runs at FP32 again, so none of their cost is counted
        said = f"{ms[precision]:.0f} ms per field, its re-checks off (FP32 {ms['fp32']:.0f} ms, measured by its gate)"
        return f", {said}" if ms[precision] < ms["fp32"] else f"slower than fp32 here: {said}"
    share = gate.get("in_band", 0) / fields
    eff = effective_ms(ms, share, precision)
    said = (f"{eff:.0f} ms per field with its re-checks ({ms[precision]:.0f} ms + {share:.1%} of fields at FP32's "
            f"{ms['fp32']:.0f} ms, measured by its gate)")
    return f", {said}" if eff < ms["fp32"] else f"slower than fp32 here counting its re-checks: {said}"


def reference_for(backend: Backend, model: ModelDir, threads: int | None) -> tuple[Callable[[], Backend], str]:
    """(how to open, what it is): the FP32 backend a faster tier's re-checks run on (runtime/pipeline/recheck.py):
    next to a GPU backend, a second ONNX Runtime CUDA session at FP32 (TF32 off) where onnxruntime-gpu is here, else
    ONNX Runtime on the CPU at FP32, the runtime's own FP32 reference. Its file is checked now (ModelError naming it,
    with the ways out), not at the first in-band field."""
    from runtime.backends import ort

    try:
        model.file(model.variant("fp32").file)
    except ModelError as e:
        raise ModelError(f"{e}; the re-checks of {backend.precision} run on this FP32 file: export the model again, or "
                         "give up the re-checks with --recheck off") from None

    def cpu() -> Backend:
        return ort.OrtBackend(model, "fp32", cuda=False, threads=threads)

    if backend.on_gpu and ort.cuda_available():
        def cuda() -> Backend:
            try:
                return ort.OrtBackend(model, "fp32", cuda=True, threads=threads, nhwc=False, graphs=False)
            except ort.CudaDidNotStart:
                return cpu()

        return cuda, "onnxruntime-cuda-fp32, a second session (opened at start by a service, else on first need)"
    return cpu, "onnxruntime-cpu-fp32, a second session (opened at start by a service, else on first need)"
