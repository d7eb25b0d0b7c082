"""Field quality before a verdict: each field's focus, exposure, tissue and stain as numbers, each with a limit
derived on one set of real BreakHis images and judged on another (docs/quality.md), and a flag with what to do where
a limit is crossed ("out of focus: re-focus and capture again"). Focus is measured tile by tile on the tissue,
brightness on the tissue's pixels, the stain on the stained ones (clipping still counts glass: docs/quality.md says
why). Computed in the decode workers on every second pixel of every second row of the field as decoded (the host's
pixels; a JPEG decoded on the GPU brings back only those rows). ``--qc flag`` marks the verdict, ``withhold`` gives
a flagged field no label, ``off`` skips it."""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from runtime.model.geometry import FieldPlan
from runtime.model.stain_reference import StainReference
from runtime.pipeline.stain import HE as _HE  # noqa: F401  (benchmarks/quality_limits.py's DAB test uses it)
from runtime.pipeline.stain import TO_STAINS, drift, percentile_u8, profile, stained_density

QC_MODES = ("flag", "withhold", "off")  # --qc
STEP = 2  # the measures read every STEP-th pixel of every STEP-th row: the limits below were derived so

# Glass: bright and colourless (HSV value >= 220, saturation <= 15). The slides' tissue mask and the field tissue
# measure are the same rule; a slide classifies a field with at least MIN_TISSUE tissue.
BACKGROUND_VALUE, BACKGROUND_SATURATION, MIN_TISSUE = 220, 15, 0.25

# Focus, tile by tile (HistoQC's blur module in spirit): the field's grey level in TILE x TILE tiles (of the pixels
# read: 56 x 56 pixels of the image, 8 x 12 tiles in the model's field); a tile counts where at least half of it
# is tissue and it has structure above the noise. Its sharpness is the energy of the finest band (the grey level
# less its Gaussian blur of sigma 0.7: the detail the model's first 3 x 3 convolutions see) over the energy of the
# next band (blur 0.7 less blur 1.4), each less the camera noise's share: a blur takes far more from the first than
# from the second, and the ratio is the same for faint and strong stains. The noise is Immerkaer's estimate (CVIU
# 64(2), 1996) in the quietest tenth of the tiles; its energy in each band is its variance times the band's gain.
TILE = 28
BANDS = (0.7, 1.4)
FLAT = 2.0  # a tile's coarse-band energy (grey levels squared) below which it has no structure to judge
# ... or below NOISE_MARGIN times the noise's energy: the field's sharpest tiles (its focus) are those above it in the
# fine band (where a blur leaves little but noise); the blurred share counts every tile above it in the coarse band
# itself, so that a tilted slide's blurred half still counts under camera noise (docs/quality.md).
NOISE_MARGIN = 4.0
RELATIVE = 0.5  # a tile is blurred where its sharpness is below this share of the field's sharpest (90th pct)

# Stain (runtime/pipeline/stain.py): a stained pixel's optical density, in Ruifrok and Johnston's H&E basis, has
# non-negative haematoxylin and eosin amounts where its colour is a mixture of the two stains; a neutral grey density
# has an eosin amount of -0.15 x its density, outside the slack below.
CONE_SLACK = 0.1  # a stain amount down to -0.1 x the pixel's density still counts as non-negative (stain variation)
CLIPPED = 250  # a channel at or above this is clipped
BROWN_RATIO, BROWN_RED = 0.8, 1.05  # blue density above these x the green and x the red: a brown (DAB-like) pixel


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
NOT_HE = "not H&E colours: check the stain, the camera's white balance and that this is an H&E slide"
# The limits, derived by benchmarks/quality_limits.py on the derivation patients' 100X images and their degradations
# and judged on the held-out patients' (docs/quality.md; benchmarks/results/quality-limits.json has every number,
# and tests/test_quality.py fails where the two differ). Each limit lies between the worst real field and the
# mildest degradation that must be flagged (the midpoint; geometric for the focus ratio).
LIMITS = (
    Limit("focus", 0.519, True, "out_of_focus", "out of focus: re-focus and capture again"),
    Limit("blurred", 0.197, False, "part_out_of_focus",
          "part of the field is out of focus (a tilted slide?): level the slide, re-focus and capture again"),
    Limit("saturated", 0.274, False, "over_exposed", "over-exposed: lower the lamp or the exposure and capture again"),
    Limit("brightness", 134.0, True, "under_exposed", UNDER_EXPOSED),
    Limit("white", 196.0, True, "under_exposed", UNDER_EXPOSED),
    Limit("tissue", MIN_TISSUE, True, "mostly_glass",
          "mostly white (glass, or fat or lumen, which the check cannot tell from glass): move the stage onto tissue "
          "and capture again"),
    Limit("colour", 12.2, True, "no_stain_colour", "no stain colour (a grey-scale capture?): capture in colour"),
    Limit("stain", 0.356, True, "not_he", NOT_HE),
    Limit("blocky", 0.182, False, "low_resolution",
          "blocky pixels (digital zoom, or a lower-resolution capture blown up?): capture at the camera's full "
          "resolution at 100X"),
    Limit("brown", 0.705, False, "ihc_stain",
          "brown DAB stain (an immunohistochemistry slide?): this model reads H&E slides only"),
    Limit("stain_drift", 1.1, False, "stain_drift",
          "stain differs from the model's training images: its verdict may be unreliable here"),
)
MEASURES = tuple(dict.fromkeys(lim.measure for lim in LIMITS))
OUT_OF_FOCUS = "out_of_focus"
STAIN_DRIFT = "stain_drift"  # the one measure taken only against a model's stain reference (runtime/pipeline/stain.py)
FIELD_MEASURES = tuple(m for m in MEASURES if m != STAIN_DRIFT)  # what every field has


@dataclass
class FieldQuality:
    """A field's measures (MEASURES) and the flags of the limits it crosses, each with its advice."""

    measures: dict[str, float]
    flags: list[str] = field(default_factory=list)

    @classmethod
    def judge(cls, measures: dict[str, float], min_tissue: float | None = None) -> FieldQuality:
        """The flags of the LIMITS ``measures`` cross (a measure not taken, like ``stain_drift`` without a stain
        reference, is not judged); ``min_tissue``, where given, is the tissue limit (a slide's --min-tissue, which is
        also its mask's rule)."""
        flags = [lim.flag for lim in LIMITS if lim.measure in measures and
                 lim.crossed(measures[lim.measure], min_tissue if lim.measure == "tissue" else None)]
        if OUT_OF_FOCUS in flags:  # blur lowers the densest stain amounts: the drift is the blur's, not the stain's
            flags = [f for f in flags if f != STAIN_DRIFT]
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


def _tiles(a: np.ndarray, t: int) -> np.ndarray:
    """The mean of ``a`` over t x t tiles (the remainder at the right and bottom left out)."""
    h, w = a.shape[0] // t * t, a.shape[1] // t * t
    return a[:h, :w].reshape(h // t, t, w // t, t).mean(axis=(1, 3))


def _band_gains() -> tuple[float, float]:
    """How much of white noise's variance passes each band: the sum of the squares of its kernel."""
    impulse = np.zeros((41, 41), np.float32)
    impulse[20, 20] = 1.0
    fine, coarse = (cv2.GaussianBlur(impulse, (0, 0), s) for s in BANDS)
    return float(((impulse - fine) ** 2).sum()), float(((fine - coarse) ** 2).sum())


_GAINS = _band_gains()
_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def _focus(grey: np.ndarray, tissue: np.ndarray) -> tuple[float, float]:
    """(the sharpness of the field's sharpest tissue tiles, the share of its tissue tiles with structure that are
    blurred)."""
    t = min(TILE, *grey.shape)
    g = grey.astype(np.float32)
    fine, coarse = (cv2.GaussianBlur(g, (0, 0), s) for s in BANDS)
    noise = _tiles(np.abs(cv2.filter2D(g, -1, _IMMERKAER, borderType=cv2.BORDER_REFLECT)), t)
    noise_var = float(np.percentile(noise, 10) * np.sqrt(np.pi / 2) / 6) ** 2
    e_fine = _tiles(cv2.multiply(g - fine, g - fine), t) - _GAINS[0] * noise_var
    e_coarse = _tiles(cv2.multiply(fine - coarse, fine - coarse), t) - _GAINS[1] * noise_var
    on_tissue = _tiles(tissue.astype(np.float32), t) >= 0.5
    structured = on_tissue & (e_coarse >= max(FLAT, NOISE_MARGIN * _GAINS[1] * noise_var))
    judged = on_tissue & (e_coarse >= max(FLAT, NOISE_MARGIN * _GAINS[0] * noise_var))
    if not judged.any():  # no structure on tissue anywhere: nothing in focus
        return 0.0, 0.0
    top = float(np.percentile(np.maximum(e_fine[judged], 0.0) / e_coarse[judged], 90))
    sharp = np.maximum(e_fine[structured], 0.0) / e_coarse[structured]
    return top, float((sharp < RELATIVE * top).mean())


def measure(field_px: np.ndarray, reference: StainReference | None = None) -> dict[str, float]:
    """The measures of one field's pixels, BGR uint8, every STEP-th pixel of every STEP-th row of it (the stain
    measures on every second of those); ``stain_drift`` only against a model's stain ``reference``. Finite for every
    input."""
    grey = cv2.cvtColor(field_px, cv2.COLOR_BGR2GRAY)
    hsv = cv2.cvtColor(field_px, cv2.COLOR_BGR2HSV)
    glass = cv2.inRange(hsv, (0, 0, BACKGROUND_VALUE), (180, BACKGROUND_SATURATION, 255))
    tissue = cv2.bitwise_not(glass)
    n, n_tissue = grey.size, cv2.countNonZero(tissue)
    focus, blurred = _focus(grey, tissue > 0)
    # Blocky: the share of tissue pixels equal, in every channel, to their right-hand neighbour (of the pixels read):
    # a camera's noise makes that rare; a lower resolution blown up by nearest neighbour repeats pixels.
    same = (field_px[:, 1:] == field_px[:, :-1]).all(axis=2) & (tissue[:, 1:] > 0)
    blocky = float(same.sum()) / max(1, int((tissue[:, 1:] > 0).sum()))
    # Exposure: the tissue's mean grey level; the share of the field white in every channel (>= CLIPPED), glass
    # included: clipping counted on tissue alone did not hold on the held-out patients (docs/quality.md); the
    # field's white (its 99th percentile grey level: glass, lumen or the lightest tissue), the lamp's.
    saturated = cv2.countNonZero(cv2.inRange(field_px, (CLIPPED,) * 3, (255,) * 3)) / n
    brightness = float(cv2.mean(grey, mask=tissue)[0]) if n_tissue else float(cv2.mean(grey)[0])
    # Stain: optical density against the field's own white (runtime/pipeline/stain.py).
    s_od, d, stained = stained_density(np.ascontiguousarray(field_px[::2, ::2]))
    amounts = s_od @ TO_STAINS
    stain_drift = {} if reference is None else {"stain_drift": drift(profile(amounts), reference)}
    if len(s_od):
        stain = float(((amounts[:, 0] > -CONE_SLACK * d) & (amounts[:, 1] > -CONE_SLACK * d)).mean())
        colour = float(hsv[::2, ::2, 1].reshape(-1)[stained].mean())
        # Brown: the share of stained pixels that absorb blue most: blue density above BROWN_RATIO x the green and
        # above the red. DAB, the brown of immunohistochemistry, does (blue : green : red 0.78 : 0.57 : 0.27); no
        # mixture of Ruifrok and Johnston's H and E does (blue/green 0.41 and 0.11), though BreakHis's real
        # haematoxylin often reaches 0.8; a neutral grey (equal densities) is not brown.
        brown = float(((s_od[:, 2] > BROWN_RATIO * s_od[:, 1]) & (s_od[:, 2] > BROWN_RED * s_od[:, 0])).mean())
    else:  # nothing stained: no stain colour, and nothing to judge the stains by (tissue flags such a field)
        stain, colour, brown = 1.0, 0.0, 0.0
    return {"focus": focus, "blurred": blurred, "saturated": saturated, "brightness": brightness,
            "white": float(percentile_u8(cv2.calcHist([grey], [0], None, [256], [0, 256]).ravel(), 99)),
            "tissue": 1.0 - (n - n_tissue) / n,
            "colour": colour, "stain": stain, "brown": brown, "blocky": blocky} | stain_drift


def assess(sparse: np.ndarray, plan: FieldPlan, field_size: tuple[int, int], min_tissue: float | None = None,
           reference: StainReference | None = None) -> list[FieldQuality]:
    """Every field of an image, from ``sparse``: the decoded image's every STEP-th pixel of every STEP-th row
    (``min_tissue``: the tissue limit, where the caller has its own; ``reference``: the model's stains, where its
    directory records them: without, no stain drift is measured)."""
    fh, fw = (s // STEP for s in field_size)
    return [FieldQuality.judge(measure(sparse[y // STEP:y // STEP + fh, x // STEP:x // STEP + fw], reference),
                               min_tissue) for y, x in plan.field_origins]
