"""python -m benchmarks.stain_limits: where the stain-drift limit (runtime/pipeline/quality.py, LIMITS) comes from,
and what it catches. The model's stain reference (its model directory) is measured against every real 100X image and
every re-staining of it (benchmarks/stain_shift.py); which re-stained copies change the model's label comes from
``python -m benchmarks.evaluate --stain --json`` (its every image's probability). The limit is derived on the images
of the model's training patients (the reference's own) and judged on those of its held-out patients: real fields must
almost never be flagged, re-stained copies whose label changed should mostly be. ``--probe`` also tries a
verdict-stability probe (the field classified again under small stain changes, only near the threshold) and times
it.

  python -m benchmarks.evaluate --images ../shared/data/breakhis-100x --stain --json benchmarks/results/stain-cpu.json
  python -m benchmarks.stain_limits --evaluation benchmarks/results/stain-cpu.json --probe \\
      --json benchmarks/results/stain-limits.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_json
from benchmarks.quality_limits import FIELD, read
from benchmarks.stain_shift import RESTAININGS, restain
from runtime.model.model_dir import ModelDir
from runtime.model.paths import default_model_dir, sample_images
from runtime.model.stain_reference import StainReference
from runtime.pipeline.quality import LIMITS, STAIN_DRIFT, STEP, FieldQuality, measure
from runtime.pipeline.stain import DRIFT_MEASURES

# Re-stainings any stain check must flag, whatever a model does with them: another lab's stain far from ours (the
# haematoxylin or eosin amount at 0.4 or 2.5 times). Where no label-changing re-staining lies beyond every real
# field, the limit lies between the worst real field and the mildest of these, where that does.
GROSS = {"h0.4": (0.4, 1.0), "h2.5": (2.5, 1.0), "e0.4": (1.0, 0.4), "e2.5": (1.0, 2.5)}
PROBE = ((0.8, 1.0), (1.25, 1.0), (1.0, 0.8), (1.0, 1.25))  # the probe's stain changes: (h, e) factors
BAND = 0.25  # the probe runs only on fields whose probability is within this of the threshold


def first_field(bgr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(bgr[:FIELD[0], :FIELD[1]])


def drift_of(bgr: np.ndarray, reference: StainReference) -> dict[str, float]:
    """The first field's measures, stain drift included, as the runtime reads the field."""
    return measure(np.ascontiguousarray(first_field(bgr)[::STEP, ::STEP]), reference)


def derive(real: list[float], changed: list[float], gross: dict[str, list[float]]) -> dict[str, Any]:
    """The limit between the worst real field and the mildest label-changing re-staining, where that lies beyond
    every real field (their midpoint); else between the worst real field and the mildest gross re-staining, where
    that does; else 1.1 x the worst real field (quality_limits.py's rule where nothing lies beyond every real field).
    3 significant digits."""
    worst = max(real)
    mild_changed = min(changed) if changed else None
    mild_gross = {k: min(v) for k, v in gross.items()}
    if mild_changed is not None and mild_changed > worst:
        bound, rule = (worst + mild_changed) / 2, "midpoint of the worst real field and the mildest label change"
    elif min(mild_gross.values()) > worst:
        bound, rule = (worst + min(mild_gross.values())) / 2, \
            "midpoint of the worst real field and the mildest gross re-staining"
    else:
        bound, rule = 1.1 * worst, "1.1 x the worst real field (no re-staining lies beyond every real field)"
    return {"bound": float(f"{bound:.3g}"), "rule": rule, "worst_real": round(worst, 4),
            "mildest_label_change": None if mild_changed is None else round(mild_changed, 4),
            "label_changes_within_real_range": sum(c <= worst for c in changed), "label_changes": len(changed),
            "mildest_gross": {k: round(v, 4) for k, v in mild_gross.items()}}


def probe(model: Path, fields: dict[str, np.ndarray], probabilities: dict[str, float], threshold: float) -> dict:
    """The verdict-stability probe on ``fields`` (name -> the field's pixels) whose probability is within BAND of the
    threshold: each classified again under every PROBE stain change (FP32, CPU); unstable where any changes its
    label. Its cost: the fields probed, the extra inferences, and their time against one field's."""
    from runtime.io.inputs import ImageInput
    from runtime.pipeline.classifier import Classifier

    near = [n for n in fields if abs(probabilities[n] - threshold) < BAND]
    unstable: dict[str, list[float | None]] = {}
    with Classifier(model, backend="cpu", precision="fp32", qc="off") as clf:
        clf.classify([ImageInput("warm-up", array=next(iter(fields.values())))])
        t0 = time.perf_counter()
        for n in near:
            copies = [ImageInput(f"{n}:{h}:{e}", array=restain(fields[n], h, e)) for h, e in PROBE]
            got = [r.probability for r in clf.classify(copies)]
            if any(p is None or (p > threshold) != (probabilities[n] > threshold) for p in got):
                unstable[n] = [None if p is None else round(p, 4) for p in got]
        seconds = time.perf_counter() - t0
    per_field = seconds / max(1, len(near) * len(PROBE))
    return {"band": BAND, "changes": [list(c) for c in PROBE], "fields": len(fields), "probed": len(near),
            "unstable": unstable, "extra_inferences_per_field": round(len(near) * len(PROBE) / len(fields), 3),
            "seconds_per_inference": round(per_field, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stain_limits", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evaluation", type=Path, required=True,
                    help="python -m benchmarks.evaluate --stain --json's report (the probabilities under re-staining)")
    ap.add_argument("--images", type=Path, default=sample_images(), help="the 100X images it was made on")
    ap.add_argument("--model", type=Path, default=None, help="the model directory (default: as runtime.classify)")
    ap.add_argument("--probe", action="store_true", help="also try the verdict-stability probe on the held-out set")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    model = ModelDir.open(args.model or default_model_dir())
    reference = model.stain_reference()
    if reference is None:
        print(f"{model}: records no stain reference: export it again", file=sys.stderr)
        return 2
    held = set(model.manifest.provenance.held_out_patients)
    report = json.loads(args.evaluation.read_text())
    (run,) = report["runs"].values()
    stain = run["stain"]
    threshold = float(report["threshold"])
    names = sorted(stain["none"]["images"])
    held_out = [n for n in names if n.rsplit("-", 2)[0] in held]
    derivation = [n for n in names if n not in held_out]
    assert sorted(derivation) == sorted(reference.images), "the reference is the training patients' images"
    images = {n: read(args.images / n) for n in names}
    order = {n: i for i, n in enumerate(names)}
    kinds = list(RESTAININGS)
    variants: dict[str, dict[str, np.ndarray]] = {"none": images}
    variants |= {k: {n: RESTAININGS[k][1](b, order[n]) for n, b in images.items()} for k in kinds}
    variants |= {k: {n: restain(b, h, e) for n, b in images.items()} for k, (h, e) in GROSS.items()}
    drift = {k: {n: drift_of(b, reference) for n, b in v.items()} for k, v in variants.items()}
    prob = {k: {n: stain[k]["images"][n]["probability"] for n in names} for k in ["none", *kinds]}
    changed = {n: [k for k in kinds if (prob[k][n] > threshold) != (prob["none"][n] > threshold)] for n in names}
    limit = derive([drift["none"][n][STAIN_DRIFT] for n in derivation],
                   [drift[k][n][STAIN_DRIFT] for n in derivation for k in changed[n]],
                   {k: [drift[k][n][STAIN_DRIFT] for n in derivation] for k in GROSS})
    code = next(lim.bound for lim in LIMITS if lim.measure == STAIN_DRIFT)

    def judged(members: list[str]) -> dict[str, Any]:
        flagged = {k: [n for n in members if FieldQuality.judge(drift[k][n]).flags] for k in drift}
        stain_flag = {k: [n for n in members if drift[k][n][STAIN_DRIFT] > code] for k in drift}
        ch = [(n, k) for n in members for k in changed[n]]
        return {"images": len(members), "real_flagged": flagged["none"], "real_flagged_stain": stain_flag["none"],
                "label_changed": len(ch), "label_changed_flagged_stain": [f"{n}:{k}" for n, k in ch
                                                                           if n in stain_flag[k]],
                "label_changed_flagged_any": [f"{n}:{k}" for n, k in ch if n in flagged[k]],
                "flagged_stain": {k: len(v) for k, v in stain_flag.items()},
                "drift": {k: {n: round(drift[k][n][STAIN_DRIFT], 4) for n in members} for k in drift}}

    result: dict[str, Any] = {
        "model": model.manifest.name, "reference": {"source": reference.source, "fields": reference.fields},
        "measures": list(DRIFT_MEASURES), "threshold": threshold,
        "split": "by the model's own split: derivation = its training patients' images (the stain reference's), "
                 "held-out = its held-out patients' images", "derivation": derivation, "held_out": held_out,
        "restainings": {k: w for k, (w, _) in RESTAININGS.items()}, "gross": {k: list(v) for k, v in GROSS.items()},
        "limit": limit, "code_limit": code, "derivation_set": judged(derivation), "held_out_set": judged(held_out),
        "label_changed": {n: v for n, v in changed.items() if v}}
    t0 = time.perf_counter()
    for b in images.values():
        measure(np.ascontiguousarray(first_field(b)[::STEP, ::STEP]))
    t1 = time.perf_counter()
    for b in images.values():
        measure(np.ascontiguousarray(first_field(b)[::STEP, ::STEP]), reference)
    t2 = time.perf_counter()
    result["cost_ms_per_field"] = {"without_drift": round((t1 - t0) / len(images) * 1e3, 2),
                                   "with_drift": round((t2 - t1) / len(images) * 1e3, 2)}
    if args.probe:
        fields = {f"{n}:{k}": first_field(variants[k][n]) for n in held_out for k in ["none", *kinds]}
        probs = {f"{n}:{k}": prob[k][n] for n in held_out for k in ["none", *kinds]}
        result["probe"] = probe(model.path, fields, probs, threshold)
        p = result["probe"]
        real_unstable = [n for n in held_out if f"{n}:none" in p["unstable"]]
        ch = [f"{n}:{k}" for n in held_out for k in changed[n]]
        p["real_flagged"], p["label_changed_flagged"] = real_unstable, [c for c in ch if c in p["unstable"]]
    print(f"stain drift ({', '.join(DRIFT_MEASURES)} against {model.manifest.name}'s reference, {reference.fields} "
          f"fields): limit {limit['bound']} ({limit['rule']}); worst real {limit['worst_real']}, mildest label change "
          f"{limit['mildest_label_change']} ({limit['label_changes_within_real_range']} of {limit['label_changes']} "
          f"label changes within the real range), mildest gross {limit['mildest_gross']}")
    for name, part in (("derivation", result["derivation_set"]), ("held-out", result["held_out_set"])):
        print(f"{name} ({part['images']} images): real flagged {len(part['real_flagged'])} (stain drift "
              f"{len(part['real_flagged_stain'])}); label changed {part['label_changed']}, flagged by stain drift "
              f"{len(part['label_changed_flagged_stain'])}, by any flag {len(part['label_changed_flagged_any'])}; "
              f"flagged by stain drift per re-staining {part['flagged_stain']}")
    print(f"cost per field: {result['cost_ms_per_field']}")
    if "probe" in result:
        p = result["probe"]
        print(f"probe (held-out, |p - {threshold}| < {BAND}, {len(PROBE)} stain changes): {p['probed']} of "
              f"{p['fields']} fields probed; real unstable {len(p['real_flagged'])} of {len(held_out)}; label-changed "
              f"unstable {len(p['label_changed_flagged'])} of {result['held_out_set']['label_changed']}; "
              f"{p['extra_inferences_per_field']} extra inferences per field at {p['seconds_per_inference']} s each")
    if limit["bound"] != code:
        print(f"LIMITS in runtime/pipeline/quality.py differ: stain_drift {code} -> {limit['bound']}")
    write_json(args.json, result)
    return 1 if limit["bound"] != code else 0


if __name__ == "__main__":
    sys.exit(main())
