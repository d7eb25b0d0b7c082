"""What a classification gives: every field with its coordinates and probability, the image's verdict, and the
model and backend that made it (``ModelInfo``, shared by image and slide results)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from runtime.backends.base import Backend
from runtime.io.scale import from_name, magnification_advice
from runtime.model.geometry import FieldPlan
from runtime.model.manifest import Contract, Manifest
from runtime.pipeline.quality import FieldQuality, advice

FOCUS = "out_of_focus"  # the focus check's flag (runtime/pipeline/quality.py)
UNTRAINED_WARNING = "UNTRAINED reference weights: this verdict is NOT a diagnosis (demo/test model)."
STANDING = "research model: not a medical device, its verdict is not a diagnosis"  # every result's model block says it


@dataclass(frozen=True)
class ModelInfo:
    """The provenance block every result carries: the model, what ran it, and why it was chosen."""

    name: str
    trained: bool
    source: str
    sha256: str
    backend: str
    precision: str
    file: str
    file_sha256: str
    preprocess: str  # "cpu" or "gpu"
    backend_notes: tuple[str, ...] = ()
    recheck: str | None = None  # what is re-checked at FP32 and where (None: FP32 itself, or --recheck off)
    warning: str | None = None  # set for untrained weights
    stain_check: str | None = None  # why the quality check's stain drift is off, where it is (with --qc on)

    @classmethod
    def of(cls, manifest: Manifest, backend: Backend, preprocess: str, notes: list[str],
           recheck: str | None = None, stain_check: str | None = None) -> ModelInfo:
        return cls(**manifest.model_info(), backend=backend.name, precision=backend.precision,
                   file=backend.model_file, file_sha256=backend.file_sha256, preprocess=preprocess,
                   backend_notes=tuple(notes), recheck=recheck, stain_check=stain_check,
                   warning=None if manifest.provenance.trained else UNTRAINED_WARNING)

    @property
    def standing(self) -> str:
        """What a verdict of this model is (and is not), as every output says it."""
        return self.warning or STANDING

    def to_dict(self) -> dict[str, Any]:
        """As results' JSON has it: notes, warning, re-check and stain check only where there are any; always its
        standing."""
        d = asdict(self) | {"backend_notes": list(self.backend_notes), "standing": self.standing}
        return {k: v for k, v in d.items()
                if not (k in ("backend_notes", "warning", "recheck", "stain_check") and not v)}


@dataclass
class FieldResult:
    row: int  # field position in the image's field grid
    col: int
    y: int  # top-left pixel of the field
    x: int
    height: int
    width: int
    patches: int
    probability: float  # FP32's where the field was re-checked
    label: str | None  # None: withheld (--qc withhold and a quality flag)
    fast_probability: float | None = None  # the fast tier's probability, kept where FP32 re-checked the field
    quality: dict[str, float] | None = None  # the field's quality measures (runtime/pipeline/quality.py)
    flags: list[str] = field(default_factory=list)  # the quality limits it crosses

    @property
    def rechecked(self) -> bool:
        return self.fast_probability is not None


@dataclass
class Result:
    path: str
    label: str | None = None
    probability: float | None = None
    fields: list[FieldResult] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    model: ModelInfo | None = None
    error: str | None = None
    size: tuple[int, int] | None = None  # (width, height)
    conversions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the decoder said about this image
    advice: list[str] = field(default_factory=list)  # what to do about its fields' quality flags ("re-focus ...")

    @property
    def rechecked(self) -> int:
        """Fields whose result FP32 gave on re-check."""
        return sum(f.rechecked for f in self.fields)

    @property
    def withheld(self) -> int:
        """Fields the quality check kept out of the verdict (--qc withhold)."""
        return sum(f.label is None for f in self.fields)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"model": self.model.to_dict() if self.model else {}, "rechecked": self.rechecked,
                               "withheld": self.withheld}

    def finish(self, plan: FieldPlan, probs: np.ndarray, contract: Contract, fast: dict[int, float] | None = None,
               quality: list[FieldQuality] | None = None, withhold: bool = False) -> None:
        """The verdict from every field's probability (screening rule: the image's probability is the highest
        field probability, so one malignant field makes the image Malignant). ``fast``: the fast tier's
        probabilities of the fields re-checked at FP32 (``probs`` holds FP32's for them). ``quality``: each field's;
        with ``withhold`` a flagged field gets no label, and withholding can only withhold: a counted Malignant field
        makes the image Malignant, but where every counted field is Benign and a field was withheld there is no
        verdict (an error that says why: the withheld field could be the malignant one)."""
        fh, fw = contract.field_size
        cols = plan.grid[1]
        fast = fast or {}
        self.fields = [FieldResult(row=i // cols, col=i % cols, y=int(y), x=int(x), height=fh, width=fw,
                                   patches=contract.seq_len, probability=float(pr), label=contract.label(float(pr)),
                                   fast_probability=fast.get(i))
                       for i, ((y, x), pr) in enumerate(zip(plan.field_origins, probs))]
        for f, q in zip(self.fields, quality or []):
            f.quality, f.flags = q.measures, q.flags
            if withhold and q.flags:
                f.label = None
        self.advice = advice([flag for f in self.fields for flag in f.flags])
        # an image whose file name states another magnification: its focus flag's advice names the magnification
        said = magnification_advice(from_name(self.path), contract, resampled=False)
        if said and any(FOCUS in f.flags for f in self.fields):
            self.advice = [said if a in advice([FOCUS]) else a for a in self.advice]
        counted = [f.probability for f in self.fields if f.label is not None]
        verdict = contract.label(max(counted)) if counted else None
        if self.withheld and verdict != contract.labels[1]:
            held = [f for f in self.fields if f.label is None]
            self.error = f"{self.path}: no verdict: {withheld_reason(held, len(self.fields), contract.labels)}"
            return
        assert counted
        self.probability = max(counted)
        self.label = verdict


def withheld_count(held: list[Any], total: int) -> str:
    """How many of ``total`` fields the quality check withheld (``held``, each with its ``flags``), and why."""
    return (f"{len(held)} of {total} field{'s' if total > 1 else ''} withheld by the quality check "
            f"({'; '.join(advice([x for f in held for x in f.flags]))})")


def withheld_reason(held: list[Any], total: int, labels: tuple[str, str]) -> str:
    """Why an image whose fields the quality check withheld has no verdict: how many, what their flags say to do, and
    that its counted fields alone cannot give the negative label."""
    return (f"{withheld_count(held, total)}; no counted field is {labels[1]} and a withheld one could be, so it is "
            f"not called {labels[0]}: capture those fields again, or use --qc flag for a marked verdict")
