"""Another lab's stain, made from ours: re-staining by Ruifrok and Johnston's colour deconvolution (H, E and DAB
optical-density vectors, Anal. Quant. Cytol. Histol. 23(4), 2001: the image's optical density against white 255
unmixed into the three stains, the haematoxylin or eosin amount scaled, the image rebuilt), and colour normalisation
by Reinhard's LAB statistics (IEEE CG&A 21(5), 2001) to a model's stain reference. Used by benchmarks/evaluate.py
(accuracy under each) and benchmarks/stain_limits.py (the stain-drift limit)."""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from runtime.model.stain_reference import StainReference

HED = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])  # H, E, DAB (RGB)
HED = HED / np.linalg.norm(HED, axis=1, keepdims=True)
_FROM_OD = np.linalg.inv(HED)
JITTER, JITTER_SEED = 0.2, 0  # the random re-staining: each stain's amount x U(0.8, 1.2), per image, seed 0


def restain(bgr: np.ndarray, h: float = 1.0, e: float = 1.0) -> np.ndarray:
    """``bgr`` (uint8) with its haematoxylin amount x ``h`` and its eosin amount x ``e`` (DAB, and anything the
    three vectors do not span, unchanged)."""
    rgb = bgr[..., ::-1].reshape(-1, 3).astype(np.float64)
    stains = -np.log10(np.maximum(rgb, 1.0) / 255.0) @ _FROM_OD
    stains[:, 0] *= h
    stains[:, 1] *= e
    out = 255.0 * 10.0 ** -(stains @ HED)
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(bgr.shape)[..., ::-1])


def jitter_factors(index: int) -> tuple[float, float]:
    """The random re-staining's (h, e) factors for the ``index``-th image of a run (sorted by name): one draw per
    image from one generator seeded JITTER_SEED, so a run's every image gets its own and reruns the same."""
    draws = np.random.default_rng(JITTER_SEED).uniform(1 - JITTER, 1 + JITTER, (index + 1, 2))
    return float(draws[index, 0]), float(draws[index, 1])


# name -> (what it stands for, how it is made from an image and its index in the run)
RESTAININGS: dict[str, tuple[str, Callable[[np.ndarray, int], np.ndarray]]] = {
    "h0.6": ("haematoxylin x0.6 (under-stained or faded)", lambda b, i: restain(b, h=0.6)),
    "e0.7": ("eosin x0.7", lambda b, i: restain(b, e=0.7)),
    "e1.5": ("eosin x1.5", lambda b, i: restain(b, e=1.5)),
    "h1.3": ("haematoxylin x1.3", lambda b, i: restain(b, h=1.3)),
    "jitter": (f"random per-image amounts, +-{JITTER:.0%} per stain (seed {JITTER_SEED})",
               lambda b, i: restain(b, *jitter_factors(i))),
}


def reinhard(bgr: np.ndarray, reference: StainReference) -> np.ndarray:
    """Reinhard's colour normalisation: each LAB channel (OpenCV's 8-bit LAB) shifted and scaled from the image's
    mean and standard deviation to the reference's."""
    lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB).astype(np.float64)
    flat = lab.reshape(-1, 3)
    mean, std = flat.mean(0), np.maximum(flat.std(0), 1e-6)
    out = (lab - mean) / std * np.asarray(reference.lab_std) + np.asarray(reference.lab_mean)
    return cv2.cvtColor(np.clip(np.rint(out), 0, 255).astype(np.uint8), cv2.COLOR_LAB2BGR)
