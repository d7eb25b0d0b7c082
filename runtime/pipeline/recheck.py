"""The borderline re-check: every field a faster precision (FP16, BF16, INT8) puts within its re-check band of the
threshold (runtime/model/precisions.py: the band is what its gate's logit bound maps to at the threshold) is
classified again at FP32 and FP32's answer is its result, so every label is FP32's. The FP32 backend is opened on
first need (or at start, ``open``: what a long-running service does, so that its first borderline field does not
pay for it), on the device that runs the fast tier where that device runs FP32 (a second ONNX Runtime session), else
on the CPU (its file is checked when the classifier starts); the re-checked fields are cut again from the decoded
image on the CPU (``preprocess_fields``: the reference path) and run together, one batch per batch of the fast tier
(in a thread of their own on the GPU paths: scheduler.py)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from runtime.backends.base import Backend
from runtime.model.geometry import FieldPlan
from runtime.model.manifest import Contract, ModelError
from runtime.model.precisions import in_band
from runtime.model.preprocess import preprocess_fields

RECHECK = ("on", "off")  # --recheck


class Recheck:
    """``select`` the in-band fields of a batch's probabilities; ``run`` them at FP32. ``open_reference`` makes the
    FP32 backend (called once: on first need, where a failure is the failure of the fields that needed it, or by
    ``open`` at start, where it is the start's)."""

    def __init__(self, band: float, contract: Contract, open_reference: Callable[[], Backend],
                 where: str, batch_size: int) -> None:
        self.band = band
        self.contract, self.batch_size = contract, batch_size
        self._open = open_reference
        self.reference: Backend | None = None
        self.where = where  # what runs the re-checks, as results say it
        self.fields = 0  # fields re-checked so far

    def describe(self) -> str:
        return (f"fields with a probability within {self.band:.3g} of {self.contract.threshold:g} (this precision's "
                f"band, from its gate) are classified again at fp32 ({self.where}) and fp32's answer is their result")

    def select(self, probability: np.ndarray) -> np.ndarray:
        return in_band(probability, self.contract.threshold, self.band)

    def run(self, images: list[np.ndarray], plans: list[FieldPlan]) -> np.ndarray:
        """FP32 probabilities of the fields of ``plans`` (each over the BGR image beside it), in order; ValueError
        where the reference answers a different number of them."""
        reference = self.reference = self.reference or self._open()
        n = sum(p.n_fields for p in plans)
        fields = np.empty((n, *self.contract.field_shape), np.float32)
        k = 0
        for img, plan in zip(images, plans):
            preprocess_fields(img, plan, self.contract, out=fields[k:k + plan.n_fields])
            k += plan.n_fields
        probs = np.concatenate([np.asarray(reference.run(fields[i:i + self.batch_size])["probability"]).reshape(-1)
                                for i in range(0, n, self.batch_size)])
        if probs.size != n:
            raise ValueError(f"the fp32 reference answered {n} fields with {probs.size} probabilities")
        self.fields += n
        return np.asarray(probs, np.float32)

    def open(self) -> None:
        """Open the FP32 reference now, not on the first in-band field, and run one field through it (a first run's
        costs, a GPU's kernel choice, stay out of the first re-check); raises where it cannot run: the caller's
        start fails, not a field. Once: the reference stays open until ``close``. The warm-up field is not counted
        as re-checked."""
        if self.reference is not None:
            return
        reference = self._open()
        what = f"the fp32 reference of the re-checks ({self.where}, {getattr(reference, 'model_file', '?')})"
        try:
            out = np.asarray(reference.run(np.zeros((1, *self.contract.field_shape), np.float32))["probability"])
        except Exception as e:  # each runtime raises its own types: said, with the way out
            reference.close()
            raise ModelError(f"{what} cannot run one field ({type(e).__name__}: {str(e)[:300]}); export the model "
                             "again, or give up the re-checks with --recheck off") from e
        if out.size != 1 or not np.isfinite(out).all():
            reference.close()
            raise ModelError(f"{what} answered one field with {out.reshape(-1)[:4]}: it cannot re-check; export the "
                             "model again, or give up the re-checks with --recheck off")
        self.reference = reference

    def close(self) -> None:
        if self.reference is not None:
            self.reference.close()
            self.reference = None
