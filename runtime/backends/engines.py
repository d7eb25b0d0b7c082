"""TensorRT engines of a model directory: where they live, what each was built for, which one fits this machine.

Every engine ``engines/<key>.engine`` has a sidecar ``engines/<key>.json``; an engine is chosen by comparing the
sidecar with this machine (TensorRT version, GPU, compute capability) and the model (ONNX sha256, precision)
before anything is deserialised, so a stale or foreign engine is reported instead of crashing the runtime.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import Unavailable
from runtime.model.manifest import ModelError
from runtime.model.model_dir import ModelDir, verified_file
from runtime.model.precisions import ENGINE_PRECISIONS, PRECISIONS


class EngineMismatch(Unavailable):
    """No engine in the model directory fits this machine/model; the message lists what differs."""


class TrtUnavailable(Unavailable):
    """TensorRT (or what a build needs) is not usable here; the message says what is missing."""


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TrtUnavailable(f"TensorRT is not installed ({e}). On JetPack 6 it comes with the OS "
                             "(python3-libnvinfer); on x86 use NVIDIA's tensorrt wheel") from None
    if not hasattr(trt, "Runtime"):  # tensorrt-stubs alone provides an importable, empty namespace package
        raise TrtUnavailable("only TensorRT type stubs are installed here, not the TensorRT runtime: on a Jetson it "
                             "comes with JetPack (python3-libnvinfer), on an x86 GPU machine from NVIDIA's tensorrt "
                             "wheel (docs/gpu-and-jetson.md); meanwhile --backend onnxruntime-cuda (GPU) or cpu")
    return trt


@dataclass(frozen=True)
class BuildPlan:
    """How a precision is reached on a TensorRT generation: which ONNX, typing mode, builder flags."""

    onnx_file: str
    strongly_typed: bool
    flags: tuple[str, ...]
    constrain_tail_fp32: bool  # TensorRT 10: everything after the convolution chain pinned to FP32
    calibrate: bool


def plan_build(trt_major: int, precision: str, model: ModelDir) -> BuildPlan:
    """TensorRT 10 takes the range-safe FP32 ONNX and precision flags (the FP32 tail pinned, constraints obeyed);
    TensorRT 11 has no FP16/INT8 flags and builds strongly typed networks from the variant's own ONNX. Either way
    the precision must be a variant that passed its gate (ModelError naming the gate result otherwise)."""
    if trt_major < 10:
        raise TrtUnavailable(f"TensorRT {trt_major}.x is not supported (needs the TensorRT 10+ named-tensor API)")
    flags = PRECISIONS[precision].trt10_flags
    if flags is None:
        raise TrtUnavailable(f"TensorRT builds {', '.join(ENGINE_PRECISIONS)} engines, not {precision}")
    variant = model.variant(precision).file
    if trt_major == 10:
        return BuildPlan(model.variant("fp32").file, False, flags, bool(flags), "INT8" in flags)
    return BuildPlan(variant, True, (), False, False)


def device_target(model: ModelDir, precision: str, trt: Any) -> EngineTarget:
    """The engine key for this machine: TensorRT version, GPU, compute capability, ONNX hash, precision."""
    from runtime.gpu.context import device_info

    name, cc = device_info()
    onnx_file = plan_build(int(trt.__version__.split(".")[0]), precision, model).onnx_file
    sha = model.manifest.files.get(onnx_file)
    if sha is None:
        raise ModelError(f"{model}: {onnx_file} has no sha256 in manifest.json (export the model again)")
    return EngineTarget(tensorrt=trt.__version__, gpu=name, compute_capability=cc, onnx_sha256=sha,
                        precision=precision)


@dataclass(frozen=True)
class EngineTarget:
    """What an engine must match to be usable here."""

    tensorrt: str
    gpu: str
    compute_capability: str  # "8.7"
    onnx_sha256: str
    precision: str

    def key(self) -> str:
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-")
        return f"{self.precision}-{gpu}-sm{self.compute_capability.replace('.', '')}-trt{self.tensorrt}-" \
               f"{self.onnx_sha256[:12]}"


@dataclass
class EngineInfo:
    """The sidecar: the target plus how the engine was built."""

    target: EngineTarget
    onnx_file: str
    profile: dict[str, int]  # min / opt / max batch
    options: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    engine_sha256: str = ""  # of the engine file, checked before it is deserialised

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EngineInfo:
        d = json.loads(text)
        return cls(target=EngineTarget(**d["target"]), onnx_file=d["onnx_file"], profile=d["profile"],
                   options=d.get("options", {}), build_seconds=d.get("build_seconds", 0.0),
                   engine_sha256=d.get("engine_sha256", ""))


def paths(folder: Path, target: EngineTarget) -> tuple[Path, Path]:
    """(engine, sidecar) in a model's engines folder (ModelDir.engines). The key holds dots (TensorRT 10.13.3.9):
    suffixes are appended, never substituted."""
    key = target.key()
    return folder / f"{key}.engine", folder / f"{key}.json"


def save(folder: Path, info: EngineInfo, engine: bytes) -> Path:
    eng, side = paths(folder, info.target)
    eng.parent.mkdir(parents=True, exist_ok=True)
    eng.write_bytes(engine)
    info.engine_sha256 = hashlib.sha256(engine).hexdigest()
    side.write_text(info.to_json())  # written last: an engine without a sidecar is never selected
    return eng


def select(folder: Path, want: EngineTarget) -> tuple[Path, EngineInfo]:
    """The engine built for exactly ``want``; otherwise EngineMismatch saying how the others differ."""
    eng, side, model_dir = *paths(folder, want), folder.parent
    if eng.is_file() and side.is_file():
        try:
            info = EngineInfo.from_json(side.read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged sidecar: refused, never deserialised
            raise EngineMismatch(f"{side}: unreadable engine sidecar ({type(e).__name__}: {str(e)[:200]}); the "
                                 f"engine beside it is not loaded. Build it again with: python -m export trt -m "
                                 f"{model_dir} --precision {want.precision}") from None
        if info.target == want:
            verified_file(eng.parent, eng.name, {eng.name: info.engine_sha256})  # a swapped engine is refused
            return eng, info
    reasons = []
    for other in sorted(folder.glob("*.json")):
        try:
            t = EngineInfo.from_json(other.read_text()).target
        except (OSError, ValueError, KeyError, TypeError) as e:
            reasons.append(f"{other.name}: unreadable sidecar ({e})")
            continue
        diffs = [f"{k} {getattr(t, k)!r} (here: {getattr(want, k)!r})" for k in asdict(want)
                 if getattr(t, k) != getattr(want, k)]
        reasons.append(f"{other.name[:-len('.json')]}: built for another " + ", ".join(diffs))
    detail = ("\n  " + "\n  ".join(reasons)) if reasons else " (no engines built yet)"
    raise EngineMismatch(f"{model_dir}: no {want.precision} engine for {want.gpu} (sm {want.compute_capability}), "
                         f"TensorRT {want.tensorrt}, this ONNX{detail}\n"
                         f"build one with: python -m export trt -m {model_dir} --precision {want.precision}")
