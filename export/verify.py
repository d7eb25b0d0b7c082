"""Fidelity of a deployed variant (TensorRT engine, ONNX Runtime CUDA, an ONNX file) against the FP32 ONNX Runtime
CPU reference on real images: per output max/median |difference| of the probability and label agreement, gated."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.classifier import Classifier
from runtime.inputs import image_files

# max |probability difference| allowed, and labels must agree on every field (INT8 is held to the FP16 gate)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "int8": 1e-2}


@dataclass
class Fidelity:
    candidate: str
    fields: int
    max_abs: float
    median_abs: float
    label_agreement: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance and self.label_agreement == 1.0

    def lines(self) -> list[str]:
        return [f"candidate {self.candidate} vs onnxruntime-cpu FP32 on {self.fields} fields:",
                f"  probability  max|d|={self.max_abs:.3e} median|d|={self.median_abs:.3e} "
                f"(tolerance {self.tolerance:g})",
                f"  labels       {self.label_agreement:.1%} agree (required 100%)",
                f"  {'PASS' if self.ok else 'FAIL'}"]


def field_probs(clf: Classifier, images: list[Path]) -> np.ndarray:
    out = []
    for r in clf.classify(images):
        if r.error:
            raise RuntimeError(r.error)
        out += [f.probability for f in r.fields]
    return np.asarray(out)


def verify(model_dir: Path, images_dir: Path, backend: str = "tensorrt", precision: str = "fp16",
           onnx_file: str | None = None, limit: int | None = None, start: int = 0) -> Fidelity:
    images = image_files(images_dir)[start:][:limit]
    if not images:
        raise RuntimeError(f"{images_dir}: no images")
    with Classifier(model_dir, backend="cpu", preprocess="cpu") as ref:
        want = field_probs(ref, images)
        threshold = ref.contract.threshold
    if onnx_file:  # an ONNX variant on ONNX Runtime CPU, e.g. model.fp16.onnx
        cand = Classifier(model_dir, backend="cpu", preprocess="cpu", onnx_file=onnx_file)
        precision = "fp16" if "fp16" in onnx_file else "int8" if "int8" in onnx_file else "fp32"
    else:
        cand = Classifier(model_dir, backend=backend, precision=precision)
    with cand:
        got = field_probs(cand, images)
        name = cand.backend.name
    d = np.abs(got - want)
    agree = float(np.mean((got > threshold) == (want > threshold)))
    return Fidelity(name, len(d), float(d.max()), float(np.median(d)), agree, TOLERANCE[precision])
