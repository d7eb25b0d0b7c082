"""Field quality before a verdict: each field's focus, exposure, tissue and stain as numbers, each with a limit
derived from the real BreakHis images at hand (docs/quality.md), and a flag with what to do where a limit is
crossed ("out of focus: re-focus and capture again"). Computed in the decode workers on every second pixel of every
second row of the field as decoded (the host's pixels; a JPEG decoded on the GPU brings back only those rows), about
2 ms per field. ``--qc flag`` marks the verdict, ``withhold`` gives a flagged field no label, ``off`` skips it."""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from runtime.pipeline.tiling import FieldPlan

QC_MODES = ("flag", "withhold", "off")  # --qc
STEP = 2  # the measures read every STEP-th pixel of every STEP-th row: the limits below were derived so

# Glass: bright and colourless (HSV value >= 220, saturation <= 15). The slides' tissue mask and the field tissue
# measure are the same rule; a slide classifies a field with at least MIN_TISSUE tissue.
BACKGROUND_VALUE, BACKGROUND_SATURATION, MIN_TISSUE = 220, 15, 0.25

# H&E optical-density vectors (RGB), Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 23(4), 2001; their cross
# product completes the basis. A tissue pixel's optical density, in that basis, has non-negative haematoxylin and
# eosin amounts where its colour is a mixture of the two stains.
_HE = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])
_HE = _HE / np.linalg.norm(_HE, axis=1, keepdims=True)
_TO_STAINS = np.linalg.inv(np.stack([_HE[0], _HE[1], np.cross(_HE[0], _HE[1])])).astype(np.float32)
STAINED_OD = 0.15  # optical density (norm, after the white point) above which a pixel counts as stained
CONE_SLACK = 0.2  # a stain amount down to -0.2 x the pixel's density still counts as non-negative (stain variation)


@dataclass(frozen=True)
class Limit:
    """One measure's limit: flagged where the measure is below (``below``) or above ``bound``."""

    measure: str
    bound: float
    below: bool
    flag: str
    advice: str  # what the person at the microscope should do

    def crossed(self, value: float, bound: float | None = None) -> bool:
        """Whether ``value`` crosses this limit (or ``bound``, where a caller sets its own)."""
        b = self.bound if bound is None else bound
        return value < b if self.below else value > b


UNDER_EXPOSED = "under-exposed: raise the lamp or the exposure and capture again"
# The limits, derived 2026-12-02 from the 48 BreakHis 100X images and the 10 at other magnifications in
# ../shared/data and from the same images degraded (docs/quality.md has every number): each limit lies between the
# worst real image and the mildest degradation that must be flagged (the midpoint; geometric for the focus ratio).
LIMITS = (
    # real min 2.82, Gaussian blur sigma 2 px at 100X max 2.33
    Limit("focus", 2.56, True, "out_of_focus", "out of focus: re-focus and capture again"),
    # share of pixels white in every channel (>= 250): real max 0.249 (a field with blown-out glass), exposure
    # pushed until 30 % of the pixels saturate: 0.299
    Limit("saturated", 0.274, False, "over_exposed", "over-exposed: lower the lamp or the exposure and capture again"),
    # real min 152.3 (mean grey level) and 214 (its 99th percentile: the white of glass or lumen); flagged below
    # 0.9 x the darkest real field. No single-field limit catches every darkening: a light field darkened by gamma
    # 2.5 looks like a well-exposed, more strongly stained one (docs/quality.md)
    Limit("brightness", 137.0, True, "under_exposed", UNDER_EXPOSED),
    Limit("white", 193.0, True, "under_exposed", UNDER_EXPOSED),
    # real min 0.418; the slides' own rule
    Limit("tissue", MIN_TISSUE, True, "mostly_glass", "mostly glass: move the stage onto tissue and capture again"),
    # mean HSV saturation of stained pixels: real min 22.5, a grey-scale image 0
    Limit("colour", 11.2, True, "no_stain_colour", "no stain colour (a grey-scale capture?): capture in colour"),
    # share of stained pixels in the H&E cone: real min 0.885, H&E re-coloured (hue turned 240 degrees) max 0.336
    Limit("stain", 0.61, True, "not_he",
          "not H&E colours: check the stain, the camera's white balance and that this is an H&E slide"),
)
MEASURES = tuple(dict.fromkeys(lim.measure for lim in LIMITS))


@dataclass
class FieldQuality:
    """A field's measures (MEASURES) and the flags of the limits it crosses, each with its advice."""

    measures: dict[str, float]
    flags: list[str] = field(default_factory=list)

    @classmethod
    def judge(cls, measures: dict[str, float], min_tissue: float | None = None) -> FieldQuality:
        """The flags of the LIMITS ``measures`` cross; ``min_tissue``, where given, is the tissue limit (a slide's
        --min-tissue, which is also its mask's rule)."""
        flags = [lim.flag for lim in LIMITS
                 if lim.crossed(measures[lim.measure], min_tissue if lim.measure == "tissue" else None)]
        return cls({k: round(v, 4) for k, v in measures.items()}, list(dict.fromkeys(flags)))

    def to_dict(self) -> dict:
        return {"measures": self.measures, "flags": self.flags}


def advice(flags: list[str]) -> list[str]:
    """What to do, once per flag, in the order of LIMITS."""
    return list(dict.fromkeys(lim.advice for lim in LIMITS if lim.flag in flags))


def background(bgr: np.ndarray) -> np.ndarray:
    """Glass: the slides' tissue mask and the field tissue measure."""
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    return (hsv[..., 2] >= BACKGROUND_VALUE) & (hsv[..., 1] <= BACKGROUND_SATURATION)


def _percentile(counts: np.ndarray, q: float) -> int:
    """The q-th percentile of uint8 values from their histogram (exact for integers, without a sort)."""
    return int(np.searchsorted(np.cumsum(counts), q / 100 * counts.sum()))


def measure(field_px: np.ndarray) -> dict[str, float]:
    """The measures of one field's pixels, BGR uint8, every STEP-th pixel of every STEP-th row of it (the stain
    measures on every second of those)."""
    grey = cv2.cvtColor(field_px, cv2.COLOR_BGR2GRAY)
    # Focus: how much a further blur of sigma 0.7 takes from the Laplacian's energy (Crete-Roffet et al., "The blur
    # effect", SPIE 6492, 2007: re-blurring a sharp image changes it much, a blurred one little). A ratio: the same
    # for faint and strong stains.
    sharp = cv2.Laplacian(grey, cv2.CV_32F).var()
    reblurred = cv2.Laplacian(cv2.GaussianBlur(grey, (0, 0), 0.7), cv2.CV_32F).var()
    hsv = cv2.cvtColor(field_px, cv2.COLOR_BGR2HSV)
    n = grey.size
    glass = cv2.countNonZero(cv2.inRange(hsv, (0, 0, BACKGROUND_VALUE), (180, BACKGROUND_SATURATION, 255)))
    # Stain: optical density against the field's own white (its 99th percentile per channel: glass, or the
    # lightest tissue), so that a tinted white balance is not taken for a stain; a table per channel.
    px = np.ascontiguousarray(field_px[::2, ::2])
    tables = np.empty((256, 1, 3), np.float32)
    for c in range(3):
        white = max(_percentile(cv2.calcHist([px], [c], None, [256], [0, 256]).ravel(), 99), 1)
        tables[:, 0, c] = -np.log10(np.clip((np.arange(256) + 1) / (white + 1), 1e-3, 1.0))
    od = cv2.LUT(px, tables).reshape(-1, 3)[:, ::-1]  # BGR in, the stain vectors' RGB order out
    density = np.sqrt(np.einsum("ij,ij->i", od, od))
    stained = density > STAINED_OD
    if stained.any():
        amounts = od[stained] @ _TO_STAINS
        slack = -CONE_SLACK * density[stained]
        stain = float(((amounts[:, 0] > slack) & (amounts[:, 1] > slack)).mean())
        colour = float(hsv[::2, ::2, 1].reshape(-1)[stained].mean())
    else:  # nothing stained: no stain colour, and nothing to judge the stains by (tissue flags such a field)
        stain, colour = 1.0, 0.0
    return {"focus": float(sharp / max(reblurred, 1e-6)),
            "saturated": cv2.countNonZero(cv2.inRange(field_px, (250, 250, 250), (255, 255, 255))) / n,
            "brightness": float(cv2.mean(grey)[0]),
            "white": float(_percentile(cv2.calcHist([grey], [0], None, [256], [0, 256]).ravel(), 99)),
            "tissue": 1.0 - glass / n,
            "colour": colour,
            "stain": stain}


def assess(sparse: np.ndarray, plan: FieldPlan, field_size: tuple[int, int],
           min_tissue: float | None = None) -> list[FieldQuality]:
    """Every field of an image, from ``sparse``: the decoded image's every STEP-th pixel of every STEP-th row
    (``min_tissue``: the tissue limit, where the caller has its own)."""
    fh, fw = (s // STEP for s in field_size)
    return [FieldQuality.judge(measure(sparse[y // STEP:y // STEP + fh, x // STEP:x // STEP + fw]), min_tissue)
            for y, x in plan.field_origins]
