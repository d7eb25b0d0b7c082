"""A field's stains against the stains its model was trained on. The field's optical density against its own white,
unmixed into haematoxylin and eosin amounts with Ruifrok and Johnston's vectors (Anal. Quant. Cytol. Histol. 23(4),
2001), gives a few stain measures (``profile``); the model directory's stain reference (runtime/model/
stain_reference.py) holds the same measures over its training images. ``drift`` is how far a field's measures lie
from the reference's medians (docs/quality.md: what it catches and what it misses)."""
from __future__ import annotations

import cv2
import numpy as np

from runtime.model.stain_reference import DRIFT_MEASURES, StainReference

# H&E optical-density vectors (RGB), Ruifrok & Johnston; their cross product completes the basis (the residual axis:
# no mixture of H and E has any of it). A stained pixel's optical density, in that basis, has non-negative
# haematoxylin and eosin amounts where its colour is a mixture of the two stains.
HE = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])
HE = HE / np.linalg.norm(HE, axis=1, keepdims=True)
RESIDUAL = np.cross(HE[0], HE[1]) / np.linalg.norm(np.cross(HE[0], HE[1]))
TO_STAINS = np.linalg.inv(np.stack([HE[0], HE[1], RESIDUAL])).astype(np.float32)
STAINED_OD = 0.15  # optical density (norm, after the white point) above which a pixel counts as stained


def percentile_u8(counts: np.ndarray, q: float) -> int:
    """The q-th percentile of uint8 values from their histogram (exact for integers, without a sort)."""
    return int(np.searchsorted(np.cumsum(counts), q / 100 * counts.sum()))


def stained_density(px: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(optical density RGB (N, 3), its norm (N,)) of the stained pixels of ``px`` (BGR uint8), and which pixels
    (row-major) they are, against the field's
    own white (its 99th percentile per channel: glass, or the lightest tissue), so that a tinted white balance is not
    taken for a stain; a table per channel."""
    tables = np.empty((256, 1, 3), np.float32)
    for c in range(3):
        white = max(percentile_u8(cv2.calcHist([px], [c], None, [256], [0, 256]).ravel(), 99), 1)
        tables[:, 0, c] = -np.log10(np.clip((np.arange(256) + 1) / (white + 1), 1e-3, 1.0))
    od = cv2.LUT(px, tables).reshape(-1, 3)[:, ::-1]  # BGR in, the stain vectors' RGB order out
    density = np.sqrt(np.einsum("ij,ij->i", od, od))
    stained = density > STAINED_OD
    return od[stained], density[stained], stained


def profile(amounts: np.ndarray) -> dict[str, float]:
    """A field's stain measures from its stained pixels' (haematoxylin, eosin, residual) amounts (N, 3)."""
    if not len(amounts):
        return {k: 0.0 for k in PROFILE}
    h, e = amounts[:, 0], amounts[:, 1]
    q = np.percentile(amounts[:, :2], (50, 90, 99), axis=0)
    return {"h50": float(q[0, 0]), "h90": float(q[1, 0]), "h99": float(q[2, 0]),
            "e50": float(q[0, 1]), "e90": float(q[1, 1]), "e99": float(q[2, 1]),
            "h_mean": float(h.mean()), "e_mean": float(e.mean()), "h_share": float((h > e).mean())}


PROFILE = ("h50", "h90", "h99", "e50", "e90", "e99", "h_mean", "e_mean", "h_share")


def field_profile(px: np.ndarray) -> dict[str, float]:
    """``profile`` of a field's pixels (BGR uint8; as the quality check reads them: every second pixel of every
    second row of the field as decoded, then every second of those)."""
    od, _, _ = stained_density(np.ascontiguousarray(px[::2, ::2]))
    return profile(od @ TO_STAINS)


# DRIFT_MEASURES (runtime/model/stain_reference.py): the densest haematoxylin (nuclei) and eosin of the field
# (docs/quality.md: why)
FLOOR = 1e-3  # an amount below this (no stain of that kind at all) counts as this, so that every ratio is finite
MIN_SPREAD = 0.1  # a reference's half-range counts as at least this (natural log: +-10 %), for one of a few fields


def drift(measures: dict[str, float], reference: StainReference) -> float:
    """The field's stain drift: for each of DRIFT_MEASURES, how far it lies from the reference fields' median, as a
    ratio of natural logarithms to the reference's own half-range on that side (its lowest or highest field); the
    largest of them. At most 1 within the range of the reference's fields, 2 twice as far out."""
    out = 0.0
    for k in DRIFT_MEASURES:
        s = reference.measures[k]
        x, med = np.log(max(measures[k], FLOOR)), np.log(max(s.median, FLOOR))
        bound = np.log(max(s.high, FLOOR)) if x > med else np.log(max(s.low, FLOOR))
        out = max(out, float(abs(x - med) / max(abs(bound - med), MIN_SPREAD)))
    return out
