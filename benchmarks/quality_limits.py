"""python -m benchmarks.quality_limits: where the field-quality limits (runtime/pipeline/quality.py) come from. Every
measure on every real image at hand and on the same images degraded as a microscope degrades them; the worst real
value, the mildest degraded value, and the limit between them. A limit that does not separate the two is said.

  python -m benchmarks.quality_limits --json benchmarks/results/quality-limits.json
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from benchmarks import write_json
from runtime.io.inputs import image_files
from runtime.model.paths import shared_dir
from runtime.pipeline.quality import LIMITS, MEASURES, STEP, measure

FIELD = (448, 672)  # the model's field (2 x 3 patches of 224)


def exposed(bgr: np.ndarray, saturated: float = 0.30) -> np.ndarray:
    """Exposure (a linear gain) pushed until at least ``saturated`` of the field's pixels are white in every
    channel (>= 250)."""
    gain = 1.0
    while True:
        out = np.clip(bgr.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        if (out[:FIELD[0], :FIELD[1]].min(axis=2) >= 250).mean() >= saturated:
            return out
        gain += 0.02


def hue_turned(bgr: np.ndarray, degrees: int) -> np.ndarray:
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + degrees // 2) % 180
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)


def mostly_glass(bgr: np.ndarray, glass: float = 0.8) -> np.ndarray:
    """The field's left ``glass`` share replaced by clean glass (the brightest real glass colour, 242 grey)."""
    out = bgr.copy()
    out[:, :int(FIELD[1] * glass)] = 242
    return out


# name -> (what a microscope does, the degradation, the measure whose limit must flag it)
DEGRADATIONS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray], str]] = {
    "blur": ("out of focus: Gaussian blur sigma 2 px at 100X", lambda b: cv2.GaussianBlur(b, (0, 0), 2.0), "focus"),
    "over": ("over-exposed: gain until 30 % of pixels saturate", exposed, "saturated"),
    "dark_gain": ("under-exposed: lamp at 0.7 (gain 0.7)", lambda b: (b * 0.7).astype(np.uint8), "white"),
    "dark_gamma": ("darkened by gamma 2.5", lambda b: (255 * (b / 255.0) ** 2.5).astype(np.uint8), "brightness"),
    "glass": ("mostly glass: 80 % of the field", mostly_glass, "tissue"),
    "grey": ("grey-scale capture", lambda b: cv2.cvtColor(cv2.cvtColor(b, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR),
             "colour"),
    "not_he": ("not H&E: colours turned 240 degrees in hue", lambda b: hue_turned(b, 240), "stain"),
}


def field_measures(bgr: np.ndarray) -> dict[str, float]:
    """The measures of an image's first field, as the runtime reads it."""
    return measure(bgr[:FIELD[0], :FIELD[1]][::STEP, ::STEP])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, nargs="*", default=None,
                    help="folders of real images (default: ../shared/data/breakhis-100x and breakhis-other)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    folders = args.images or [shared_dir() / "data" / "breakhis-100x", shared_dir() / "data" / "breakhis-other"]
    images = [cv2.imread(str(p)) for f in folders for p in image_files(f)]
    if not images:
        ap.error("no images")
    real = {m: [field_measures(b)[m] for b in images] for m in MEASURES}
    rows, degraded = [], {}
    for name, (what, fn, _) in DEGRADATIONS.items():
        got = [field_measures(fn(b)) for b in images]
        degraded[name] = {"what": what, **{m: [g[m] for g in got] for m in MEASURES},
                          "flagged": sum(any(lim.crossed(g[lim.measure]) for lim in LIMITS) for g in got)}
    for lim in LIMITS:
        worst_real = min(real[lim.measure]) if lim.below else max(real[lim.measure])
        targets = [n for n, (_, _, m) in DEGRADATIONS.items() if m == lim.measure]
        mild = [max(degraded[n][lim.measure]) if lim.below else min(degraded[n][lim.measure]) for n in targets]
        rows.append({"measure": lim.measure, "limit": lim.bound, "flagged_when": "below" if lim.below else "above",
                     "worst_real": worst_real, "mildest_degraded": dict(zip(targets, mild)),
                     "real_flagged": sum(lim.crossed(v) for v in real[lim.measure])})
    print(f"{len(images)} real images; a field's measures on every {STEP}nd pixel of every {STEP}nd row")
    print(f"{'measure':11s} {'limit':>8s} {'worst real':>11s}  mildest degraded (must be flagged)")
    for r in rows:
        mild = ", ".join(f"{n} {v:.4g}" for n, v in r["mildest_degraded"].items())
        print(f"{r['measure']:11s} {'<' if r['flagged_when'] == 'below' else '>'}{r['limit']:7.4g} "
              f"{r['worst_real']:11.4g}  {mild}  (real images flagged: {r['real_flagged']})")
    for name, d in degraded.items():
        print(f"{name:11s} {d['flagged']:3d} of {len(images)} flagged: {d['what']}")
    write_json(args.json, {"images": len(images), "step": STEP, "limits": rows,
                           "degraded_flagged": {n: d["flagged"] for n, d in degraded.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
