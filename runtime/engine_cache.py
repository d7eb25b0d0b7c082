"""TensorRT engines of a model directory: where they live, what each was built for, which one fits this machine.

Every engine ``engines/<key>.engine`` has a sidecar ``engines/<key>.json``; an engine is chosen by comparing the
sidecar with this machine (TensorRT version, GPU, compute capability) and the model (ONNX sha256, precision)
before anything is deserialised, so a stale or foreign engine is reported instead of crashing the runtime.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "fp16", "int8")


class EngineMismatch(RuntimeError):
    """No engine in the model directory fits this machine/model; the message lists what differs."""


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EngineInfo:
        d = json.loads(text)
        return cls(target=EngineTarget(**d["target"]), onnx_file=d["onnx_file"], profile=d["profile"],
                   options=d.get("options", {}), build_seconds=d.get("build_seconds", 0.0))


def engine_dir(model_dir: Path) -> Path:
    return Path(model_dir) / "engines"


def paths(model_dir: Path, target: EngineTarget) -> tuple[Path, Path]:
    base = engine_dir(model_dir) / target.key()
    return base.with_suffix(".engine"), base.with_suffix(".json")


def save(model_dir: Path, info: EngineInfo, engine: bytes) -> Path:
    eng, side = paths(model_dir, info.target)
    eng.parent.mkdir(parents=True, exist_ok=True)
    eng.write_bytes(engine)
    side.write_text(info.to_json())  # written last: an engine without a sidecar is never selected
    return eng


def select(model_dir: Path, want: EngineTarget) -> tuple[Path, EngineInfo]:
    """The engine built for exactly ``want``; otherwise EngineMismatch saying how the others differ."""
    eng, side = paths(model_dir, want)
    if eng.is_file() and side.is_file():
        info = EngineInfo.from_json(side.read_text())
        if info.target == want:
            return eng, info
    reasons = []
    for other in sorted(engine_dir(model_dir).glob("*.json")):
        try:
            t = EngineInfo.from_json(other.read_text()).target
        except (ValueError, KeyError, TypeError) as e:
            reasons.append(f"{other.name}: unreadable sidecar ({e})")
            continue
        diffs = [f"{k} {getattr(t, k)!r} (here: {getattr(want, k)!r})" for k in asdict(want)
                 if getattr(t, k) != getattr(want, k)]
        reasons.append(f"{other.stem}: built for another " + ", ".join(diffs))
    detail = ("\n  " + "\n  ".join(reasons)) if reasons else " (no engines built yet)"
    raise EngineMismatch(f"{model_dir}: no {want.precision} engine for {want.gpu} (sm {want.compute_capability}), "
                         f"TensorRT {want.tensorrt}, this ONNX{detail}\n"
                         f"build one with: python -m export trt -m {model_dir} --precision {want.precision}")
