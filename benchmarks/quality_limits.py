"""python -m benchmarks.quality_limits: where the field-quality limits (runtime/pipeline/quality.py) come from, and
how they fare on images they were not derived on. The real BreakHis 100X images are split by patient into a
derivation set and a held-out set (both classes in each); every measure is taken on the derivation images and on
the same images degraded as a microscope degrades them, and each limit is put between the worst real value and the
mildest degradation it must flag. The held-out images, real and degraded, then give the false-flag rate and the
detection of every degradation. The images at other magnifications are not 100X: reported apart, never derived on.

  python -m benchmarks.quality_limits --json benchmarks/results/quality-limits.json --cost models/breakhis-scratch-v1
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks import write_json
from runtime.io.inputs import image_files
from runtime.model.paths import shared_dir
from runtime.pipeline.quality import _HE, FIELD_MEASURES, LIMITS, STEP, FieldQuality, measure

FIELD = (448, 672)  # the model's field (2 x 3 patches of 224)
DAB = np.array([0.268, 0.570, 0.776])  # Ruifrok & Johnston's DAB optical-density vector (RGB)


def split(manifest: Path) -> tuple[list[str], list[str]]:
    """(derivation, held-out) file names: within each class, the patients in order of their id, alternately to
    the derivation set (the 1st, 3rd, ...) and to the held-out set (the 2nd, 4th, ...); a patient's images stay
    together."""
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    sets: tuple[list[str], list[str]] = ([], [])
    for label in sorted({r["label"] for r in rows}):
        patients = sorted({r["patient"] for r in rows if r["label"] == label})
        for r in rows:
            if r["label"] == label:
                sets[patients.index(r["patient"]) % 2].append(r["filename"])
    return sets


def blur(sigma: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda b: cv2.GaussianBlur(b, (0, 0), sigma)


def noisy(b: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """Camera noise: Gaussian, sigma 4 grey levels, the same draw for every image (seed 0)."""
    noise = np.random.default_rng(0).normal(0.0, sigma, b.shape)
    return np.clip(b + noise, 0, 255).astype(np.uint8)


def half_blurred(b: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """A tilted slide: the field's left half out of focus (Gaussian blur sigma 3 px), the right half sharp."""
    out = b.copy()
    out[:, :FIELD[1] // 2] = cv2.GaussianBlur(b, (0, 0), sigma)[:, :FIELD[1] // 2]
    return out


def exposed(bgr: np.ndarray, saturated: float = 0.30) -> np.ndarray:
    """Exposure (a linear gain) pushed until at least ``saturated`` of the field's pixels are white in every
    channel (>= 250)."""
    darkest = bgr[:FIELD[0], :FIELD[1]].min(axis=2).astype(np.float32)  # white in every channel: its darkest is
    gain = 1.0
    while (darkest * gain >= 250).mean() < saturated:
        gain += 0.02
    return np.clip(bgr.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def hue_turned(bgr: np.ndarray, degrees: int = 240) -> np.ndarray:
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + degrees // 2) % 180
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)


def _restained(bgr: np.ndarray, recolour: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """The image's optical density (against each channel's 99th percentile, as the measure reads it) split into
    haematoxylin and eosin amounts (least squares), ``recolour(amounts, od)`` -> a new optical density, and back."""
    rgb = bgr[..., ::-1].reshape(-1, 3).astype(np.float64)
    white = np.percentile(rgb, 99, axis=0) + 1
    od = -np.log10(np.clip((rgb + 1) / white, 1e-3, 1.0))
    amounts = od @ np.linalg.pinv(_HE)
    out = white * 10 ** -recolour(amounts, od) - 1
    return np.clip(out, 0, 255).astype(np.uint8).reshape(bgr.shape)[..., ::-1].copy()


def ihc(bgr: np.ndarray) -> np.ndarray:
    """Immunohistochemistry, strongly positive: a haematoxylin counterstain, with half of the haematoxylin's density
    (positive nuclei) and all of the eosin's (least-squares split, negative parts dropped) turned DAB brown."""
    dab = DAB / np.linalg.norm(DAB)

    def recolour(a: np.ndarray, od: np.ndarray) -> np.ndarray:
        h, e = np.maximum(a[:, :1], 0), np.maximum(a[:, 1:2], 0)
        return 0.5 * h * _HE[0] + (0.5 * h + e) * dab
    return _restained(bgr, recolour)


def grey_od(bgr: np.ndarray) -> np.ndarray:
    """The same optical density in every channel (a neutral grey absorber of the same density)."""
    return _restained(bgr, lambda a, od: np.repeat(np.linalg.norm(od, axis=1, keepdims=True) / np.sqrt(3), 3, 1))


def vignetted(bgr: np.ndarray, corner: float = 0.6) -> np.ndarray:
    """Uneven illumination: brightness falling with the square of the distance from the field's centre, to
    ``corner`` at its corners."""
    h, w = FIELD
    y, x = np.mgrid[:bgr.shape[0], :bgr.shape[1]]
    r2 = ((y - h / 2) / (h / 2)) ** 2 + ((x - w / 2) / (w / 2)) ** 2
    gain = 1 - (1 - corner) * np.clip(r2 / 2, 0, 1)
    return np.clip(bgr * gain[..., None], 0, 255).astype(np.uint8)


def pixelated(factor: int) -> Callable[[np.ndarray], np.ndarray]:
    """A lower resolution shown blown up: shrunk ``factor`` x (area) and enlarged back by nearest neighbour (a
    camera's digital zoom, a low-resolution capture)."""
    def apply(b: np.ndarray) -> np.ndarray:
        h, w = b.shape[:2]
        small = cv2.resize(b, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    return apply


def jpeg(bgr: np.ndarray, quality: int = 50) -> np.ndarray:
    return np.asarray(cv2.imdecode(cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_COLOR))


def read(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path))
    if bgr is None:
        raise SystemExit(f"{path}: not a readable image")
    return bgr


def glass_over(bgr: np.ndarray, share: float, value: int) -> np.ndarray:
    """The field's left ``share`` replaced by clean glass of grey level ``value``."""
    out = bgr.copy()
    out[:, :int(FIELD[1] * share)] = value
    return out


@dataclass(frozen=True)
class Degradation:
    what: str
    apply: Callable[[np.ndarray], np.ndarray]
    flag: str | None  # the flag it must raise; None: a field still fit to classify, which must raise none
    derives: str | None = None  # the measure whose limit its mildest value sets


DEGRADATIONS: dict[str, Degradation] = {
    "blur_1": Degradation("Gaussian blur sigma 1 px (graded blur: reported)", blur(1.0), None),
    "blur_1.5": Degradation("Gaussian blur sigma 1.5 px (graded blur)", blur(1.5), "out_of_focus"),
    "blur_2": Degradation("out of focus: Gaussian blur sigma 2 px at 100X", blur(2.0), "out_of_focus", "focus"),
    "blur_3": Degradation("Gaussian blur sigma 3 px", blur(3.0), "out_of_focus"),
    "blur_2_noise": Degradation("blur sigma 2 under camera noise (sigma 4)", lambda b: noisy(blur(2.0)(b)),
                                "out_of_focus", "focus"),
    "half_blur": Degradation("a tilted slide: the left half blurred (sigma 3)", half_blurred, "part_out_of_focus",
                             "blurred"),
    "half_blur_noise": Degradation("the left half blurred (sigma 3) under noise (sigma 4)",
                                   lambda b: noisy(half_blurred(b)), "part_out_of_focus"),
    "noise": Degradation("camera noise sigma 4 on a sharp field", noisy, None),
    "over": Degradation("over-exposed: gain until 30 % of pixels saturate", exposed, "over_exposed", "saturated"),
    "over_gain": Degradation("over-exposed: exposure (gain) x 1.5", lambda b: np.clip(b * 1.5, 0, 255).astype(np.uint8),
                             "over_exposed"),
    "dark_gain": Degradation("under-exposed: lamp at 0.7 (gain 0.7)", lambda b: (b * 0.7).astype(np.uint8),
                             "under_exposed", "white"),
    "dark_gamma": Degradation("darkened by gamma 2.5", lambda b: (255 * (b / 255.0) ** 2.5).astype(np.uint8),
                              "under_exposed"),
    "vignetting": Degradation("vignetting: corners at 0.6 of the centre's light (reported)", vignetted, None),
    "glass": Degradation("mostly glass: 80 % of the field", lambda b: glass_over(b, 0.8, 242), "mostly_glass"),
    "glass_clipped": Degradation("well exposed, 50 % of the field clipped white glass (255)",
                                 lambda b: glass_over(b, 0.5, 255), None),
    "grey": Degradation("grey-scale capture", lambda b: cv2.cvtColor(cv2.cvtColor(b, cv2.COLOR_BGR2GRAY),
                                                                    cv2.COLOR_GRAY2BGR), "no_stain_colour", "colour"),
    "not_he": Degradation("colours turned 240 degrees in hue", hue_turned, "not_he", "stain"),
    "ihc": Degradation("IHC: DAB brown with a haematoxylin counterstain", ihc, "ihc_stain", "brown"),
    "grey_od": Degradation("a neutral grey optical density", grey_od, "not_he", "stain"),
    "jpeg_50": Degradation("JPEG at quality 50", jpeg, None),
    "pixelated_3": Degradation("a 3x lower resolution blown up by nearest neighbour", pixelated(3), "low_resolution",
                               "blocky"),
    "pixelated_4": Degradation("a 4x lower resolution blown up by nearest neighbour (digital zoom)", pixelated(4),
                               "low_resolution", "blocky"),
}


def field_measures(bgr: np.ndarray) -> dict[str, float]:
    """The measures of an image's first field, as the runtime reads it."""
    return measure(np.ascontiguousarray(bgr[:FIELD[0], :FIELD[1]][::STEP, ::STEP]))


def flags(m: dict[str, float]) -> list[str]:
    return FieldQuality.judge(m).flags


def derive(real: list[dict[str, float]], degraded: dict[str, list[dict[str, float]]]) -> list[dict]:
    """Each limit between the worst real value and the mildest value of the degradations that derive it: their
    midpoint (geometric for the focus ratio), 3 significant digits. Where no degradation lies beyond every real
    field, 0.9 x the worst real value (below) or 1.1 x (above). The tissue limit is the slides' rule, not derived;
    stain drift's, against a model's stain reference, is benchmarks/stain_limits.py's."""
    rows = []
    for lim in (lim for lim in LIMITS if lim.measure in FIELD_MEASURES):
        worst = min(r[lim.measure] for r in real) if lim.below else max(r[lim.measure] for r in real)
        sources = [n for n, d in DEGRADATIONS.items() if d.derives == lim.measure]
        mild = {n: (max if lim.below else min)(m[lim.measure] for m in degraded[n]) for n in sources}
        mildest = (max if lim.below else min)(mild.values()) if mild else None
        separable = mildest is not None and (mildest < worst if lim.below else mildest > worst)
        if lim.measure == "tissue":
            bound, rule = lim.bound, "the slides' --min-tissue default"
        elif mildest is not None and separable:
            bound = float(np.sqrt(worst * mildest)) if lim.measure == "focus" else (worst + mildest) / 2
            rule = "midpoint"
        else:
            bound, rule = worst * (0.9 if lim.below else 1.1), "0.9 x / 1.1 x the worst real value"
        rows.append({"measure": lim.measure, "bound": float(f"{bound:.3g}"), "below": lim.below, "flag": lim.flag,
                     "rule": rule, "worst_real": round(worst, 4), "mildest_degraded": {k: round(v, 4) for k, v in
                                                                                       mild.items()}})
    return rows


def cost(model: Path, paths: list[Path], repeats: int = 5) -> dict:
    """The check's time per image (``assess`` on the image's every STEP-th pixel and row, as the decode workers run
    it) against a whole ``Classifier(model, backend="cpu").classify`` of the same image, medians."""
    from runtime.model.geometry import plan_fields
    from runtime.pipeline.classifier import Classifier
    from runtime.pipeline.quality import assess

    images = [read(p) for p in paths]
    with Classifier(model, backend="cpu") as clf:
        clf.classify([str(paths[0])])  # warm-up
        whole = []
        for p in paths:
            t0 = time.perf_counter()
            clf.classify([str(p)])
            whole.append(time.perf_counter() - t0)
        c = clf.contract
    check = []
    for _ in range(repeats):
        for b in images:
            t0 = time.perf_counter()
            assess(b[::STEP, ::STEP], plan_fields(b.shape[0], b.shape[1], c), c.field_size)
            check.append(time.perf_counter() - t0)
    q, w = float(np.median(check)) * 1e3, float(np.median(whole)) * 1e3
    return {"images": len(paths), "quality_ms": round(q, 2), "classify_ms": round(w, 1), "ratio": round(q / w, 5)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=shared_dir() / "data",
                    help="the folder with breakhis-100x (MANIFEST.csv) and breakhis-other")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cost", type=Path, default=None, metavar="MODEL",
                    help="also time the check against a whole classify with this model on the CPU (8 images)")
    args = ap.parse_args(argv)
    derivation, held_out = split(args.data / "breakhis-100x" / "MANIFEST.csv")
    images = {n: read(args.data / "breakhis-100x" / n) for n in derivation + held_out}
    real = {n: field_measures(b) for n, b in images.items()}
    degraded = {k: {n: field_measures(d.apply(b)) for n, b in images.items()} for k, d in DEGRADATIONS.items()}
    rows = derive([real[n] for n in derivation], {k: [v[n] for n in derivation] for k, v in degraded.items()})
    code = {(lim.measure, lim.flag): lim.bound for lim in LIMITS if lim.measure in FIELD_MEASURES}
    stale = [r for r in rows if code[(r["measure"], r["flag"])] != r["bound"]]

    def judged(names: list[str]) -> dict:
        out: dict[str, Any] = {"real_flagged": [n for n in names if flags(real[n])], "degraded": {}}
        for k, d in DEGRADATIONS.items():
            got = [flags(degraded[k][n]) for n in names]
            hit = sum(d.flag in f for f in got) if d.flag else sum(bool(f) for f in got)
            out["degraded"][k] = {"what": d.what, "expected": d.flag, "images": len(names),
                                  "flagged" if d.flag else "any_flag": hit,
                                  "flags": {x: sum(x in f for f in got) for x in sorted({x for f in got for x in f})}}
        return out

    other = {p.name: flags(field_measures(read(p))) for p in image_files(args.data / "breakhis-other")}
    split_rule = "by patient: within each class, patients in id order alternately to derivation and held-out"
    result: dict[str, Any] = {"split": split_rule, "derivation": derivation, "held_out": held_out, "step": STEP, "limits": rows,
              "derivation_set": judged(derivation), "held_out_set": judged(held_out),
              "other_magnifications_flagged": {n: f for n, f in other.items() if f}}
    print(f"{len(derivation)} derivation images, {len(held_out)} held-out (by patient); measures on every {STEP}nd "
          f"pixel of every {STEP}nd row of the first field")
    print(f"{'measure':11s} {'limit':>9s} {'worst real':>11s}  mildest degraded (derivation set)")
    for r in rows:
        mild = ", ".join(f"{n} {v:.4g}" for n, v in r["mildest_degraded"].items())
        print(f"{r['measure']:11s} {'<' if r['below'] else '>'}{r['bound']:8.4g} {r['worst_real']:11.4g}  {mild}"
              f"  ({r['rule']})")
    for name, part in (("derivation", result["derivation_set"]), ("held-out", result["held_out_set"])):
        print(f"{name}: real images flagged: {len(part['real_flagged'])} {part['real_flagged']}")
        for k, d in part["degraded"].items():
            n = d.get("flagged", d.get("any_flag"))
            print(f"  {k:16s} {n:3d} of {d['images']} {'flagged ' + d['expected'] if d['expected'] else 'any flag'}"
                  f"  {' '.join(f'{x} {c}' for x, c in d['flags'].items())}")
    print(f"other magnifications flagged: {result['other_magnifications_flagged']}")
    for r in stale:
        print(f"LIMITS in runtime/pipeline/quality.py differ: {r['measure']} {code[(r['measure'], r['flag'])]} "
              f"-> {r['bound']}")
    if args.cost is not None:
        result["cost"] = cost(args.cost, [args.data / "breakhis-100x" / n for n in held_out[:8]])
        print(f"cost per image: quality {result['cost']['quality_ms']} ms, classify {result['cost']['classify_ms']} ms "
              f"({100 * result['cost']['ratio']:.2f} %)")
    write_json(args.json, result)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
