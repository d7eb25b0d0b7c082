"""Field quality before a verdict (runtime/pipeline/quality.py): the limits are the ones benchmarks/quality_limits.py
derives on the derivation patients and writes to benchmarks/results/quality-limits.json; on the held-out patients no
real field is flagged and every degradation a limit is made for is; no real 100X image is flagged through the
classifier's own decode stage; every measure is a finite number whatever the field; --qc flag marks the verdict,
withhold takes flagged fields out of it, off skips the check; the outputs carry the measures."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from benchmarks.quality_limits import DEGRADATIONS, FIELD, derive, field_measures, read, split
from runtime.io.inputs import ImageInput
from runtime.pipeline.classifier import Classifier
from runtime.pipeline.quality import FIELD_MEASURES, LIMITS, MEASURES, FieldQuality, advice, measure
from tests.conftest import REPO, run_module

# judged on the held-out patients: each flagged as made for; and sharp fields under noise or JPEG 50 never flagged
HELD_OUT = ("blur_2", "blur_2_noise", "blur_3", "half_blur", "over", "dark_gain", "glass", "grey", "not_he", "grey_od",
            "ihc", "pixelated_3", "pixelated_4")
FIT = ("noise", "jpeg_50")
# a tilted slide under camera noise: its criterion, stated before it was judged (docs/quality.md): flagged on at least
# 90 % of the held-out fields (noise lifts some blurred tiles' fine band; before 2026-12-07's change, 1 of 22)
MOSTLY = {"half_blur_noise": 0.9}
HELD_OUT_ALL = HELD_OUT + FIT + tuple(MOSTLY)


@pytest.fixture(scope="module")
def clf(model_dir):
    with Classifier(model_dir, backend="cpu", precision="fp32") as c:
        yield c


@pytest.fixture(scope="module")
def measured(shared_data):
    """The measures of every real 100X image and of each degradation of it, by set (derivation, held-out)."""
    folder = shared_data / "breakhis-100x"
    derivation, held_out = sets = split(folder / "MANIFEST.csv")
    images = {n: read(folder / n) for s in sets for n in s}
    real = {n: field_measures(b) for n, b in images.items()}
    degraded: dict[str, dict[str, dict[str, float]]] = {k: {} for k in DEGRADATIONS}
    for k, d in DEGRADATIONS.items():
        for n in (derivation if d.derives else []) + (held_out if k in HELD_OUT_ALL else []):
            degraded[k][n] = field_measures(d.apply(images[n]))
    return sets, real, degraded


def test_no_real_100x_image_is_flagged(clf, images_100x):
    """Through the classifier's own decode-and-plan stage (what every path runs): every field of every real 100X
    image passes every limit, with every measure a finite number."""
    for path in images_100x:
        prepared = clf.prepare(str(path))
        assert prepared.quality is not None and len(prepared.quality) == prepared.n_fields
        for q in prepared.quality:
            assert set(q.measures) == set(MEASURES) and all(np.isfinite(v) for v in q.measures.values())
            assert q.flags == [], f"{path.name}: {q.flags} {q.measures}"


def test_the_split_is_by_patient_with_both_classes_in_each(shared_data):
    with open(shared_data / "breakhis-100x" / "MANIFEST.csv") as f:
        rows = {r["filename"]: r for r in csv.DictReader(f)}
    derivation, held_out = split(shared_data / "breakhis-100x" / "MANIFEST.csv")
    assert sorted(derivation + held_out) == sorted(rows) and not set(derivation) & set(held_out)
    patients = [{rows[n]["patient"] for n in s} for s in (derivation, held_out)]
    assert not patients[0] & patients[1]
    assert all({rows[n]["label"] for n in s} == {"benign", "malignant"} for s in (derivation, held_out))


def test_the_limits_are_derived_on_the_derivation_set_and_committed(measured):
    """The limits in the code are what the derivation gives on the derivation patients alone, and what the
    committed benchmark result says: one source."""
    (derivation, _), real, degraded = measured
    rows = derive([real[n] for n in derivation],
                  {k: [degraded[k][n] for n in derivation] for k, d in DEGRADATIONS.items() if d.derives})
    code = [(lim.measure, lim.bound, lim.below, lim.flag) for lim in LIMITS if lim.measure in FIELD_MEASURES]
    assert [(r["measure"], r["bound"], r["below"], r["flag"]) for r in rows] == code
    committed = json.loads((REPO / "benchmarks" / "results" / "quality-limits.json").read_text())
    assert [(r["measure"], r["bound"], r["below"], r["flag"]) for r in committed["limits"]] == code
    assert committed["derivation"] == derivation


def test_on_held_out_patients_no_real_field_is_flagged_and_every_degradation_is(measured):
    """Judged on the patients the limits were not derived on: no real field flagged; every field blurred (sigma 2,
    also under camera noise), half blurred (a tilted slide), over-exposed, dimmed, mostly glass, grey-scale, turned
    off H&E in hue or given a neutral grey density is flagged with the flag made for it, and its advice; camera noise
    and JPEG at quality 50 on a sharp field raise no flag."""
    (_, held_out), real, degraded = measured
    assert [n for n in held_out if FieldQuality.judge(real[n]).flags] == []
    for kind in HELD_OUT:
        flag = DEGRADATIONS[kind].flag
        for n in held_out:
            q = FieldQuality.judge(degraded[kind][n])
            assert flag in q.flags and advice(q.flags), f"{n} {kind}: {q.measures}"
    for kind in FIT:
        assert [n for n in held_out if FieldQuality.judge(degraded[kind][n]).flags] == [], kind
    for kind, share in MOSTLY.items():
        flagged = [n for n in held_out if DEGRADATIONS[kind].flag in FieldQuality.judge(degraded[kind][n]).flags]
        assert len(flagged) >= share * len(held_out), (kind, len(flagged))


def test_a_whole_field_out_of_focus_is_told_from_a_tilted_one(measured):
    """Blurred all over: out of focus, not 'part of the field'; half blurred: part of the field, not all of it."""
    (_, held_out), _, degraded = measured
    for n in held_out:
        assert "part_out_of_focus" not in FieldQuality.judge(degraded["blur_3"][n]).flags
        assert "out_of_focus" not in FieldQuality.judge(degraded["half_blur"][n]).flags


@pytest.mark.parametrize("name,px", [
    ("glass", np.full((224, 336, 3), 242, np.uint8)), ("white", np.full((224, 336, 3), 255, np.uint8)),
    ("black", np.zeros((224, 336, 3), np.uint8)), ("pink", np.full((224, 336, 3), (200, 150, 230), np.uint8)),
    ("tiny", np.full((5, 7, 3), 128, np.uint8)),
    ("noise", np.random.default_rng(0).integers(0, 256, (224, 336, 3), dtype=np.uint8))])
def test_every_measure_is_finite_whatever_the_field(name, px):
    """All glass, all white, all black, a single colour, a field smaller than a tile, pure noise: every measure a
    finite number, and a field without any detail on tissue is flagged."""
    q = FieldQuality.judge(measure(px))
    assert set(q.measures) == set(FIELD_MEASURES) and all(np.isfinite(v) for v in q.measures.values()), q.measures
    if name in ("glass", "white", "black", "pink", "tiny"):
        assert q.flags, f"{name}: {q.measures}"


def _two_fields(path) -> np.ndarray:
    """A real field beside the same field out of focus: a 2-field image."""
    field = read(path)[:FIELD[0], :FIELD[1]]
    return np.ascontiguousarray(np.hstack([field, cv2.GaussianBlur(field, (0, 0), 3.0)]))


def test_flag_marks_withhold_drops_and_off_skips(model_dir, images_100x):
    """flag: both fields labelled, the blurred one flagged, the image's advice says to re-focus; withhold: the
    blurred field gets no label, and the verdict is the sharp field's where that is Malignant, else there is none
    (tests/test_withhold.py shows both on the trained model); an image whose only field is flagged gets no verdict,
    said why; off: no measures at all."""
    img = ImageInput("two.png", array=_two_fields(images_100x[30]))
    blurred = ImageInput("blurred.png", array=np.ascontiguousarray(_two_fields(images_100x[30])[:, FIELD[1]:]))
    with Classifier(model_dir, backend="cpu") as c:
        flagged, lone = c.classify([img, blurred])
    assert [f.flags for f in flagged.fields] == [[], ["out_of_focus"]] and flagged.label is not None
    assert flagged.advice == ["out of focus: re-focus and capture again"] and lone.error is None
    with Classifier(model_dir, backend="cpu", qc="withhold") as c:
        kept, none = c.classify([img, blurred])
    assert kept.fields[1].label is None and kept.fields[0].label is not None
    if kept.fields[0].label == "Malignant":
        assert kept.probability == kept.fields[0].probability and kept.label == "Malignant"
    else:
        assert kept.label is None and "no verdict: 1 of 2 fields withheld" in kept.error
    assert none.label is None and "no verdict: 1 of 1 field withheld by the quality check" in none.error
    assert "re-focus" in none.error and "blurred.png" in none.error
    with Classifier(model_dir, backend="cpu", qc="off") as c:
        (off,) = c.classify([img])
    assert all(f.quality is None and f.flags == [] for f in off.fields) and off.advice == []
    assert "quality" not in off.timings_ms and [f.probability for f in off.fields] == \
        [f.probability for f in flagged.fields]


def test_the_cli_says_what_to_do_and_its_json_carries_the_measures(model_dir, images_100x, tmp_path):
    path = tmp_path / "dark.png"
    cv2.imwrite(str(path), (cv2.imread(str(images_100x[3])) * 0.6).astype(np.uint8))
    proc = run_module("runtime.classify", str(path), str(images_100x[3]), "--model", str(model_dir),
                      "--backend", "cpu", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "QUALITY: under-exposed: raise the lamp or the exposure and capture again" in proc.stdout
    assert proc.stdout.count("QUALITY:") == 1
    proc = run_module("runtime.classify", str(path), "--model", str(model_dir), "--backend", "cpu", "--json",
                      "--qc", "withhold", "--no-progress")
    assert proc.returncode == 1  # no verdict for it: said, and counted as not classified
    (res,) = json.loads(proc.stdout)
    assert res["label"] is None and res["fields"][0]["flags"] == ["under_exposed"]
    assert set(res["fields"][0]["quality"]) == set(MEASURES) and "under-exposed" in res["error"]


def test_slide_outputs_carry_the_measures_and_mark_flagged_fields(model_dir, images_100x, tmp_path):
    """A mosaic with one field out of focus: that field is flagged in the CSV, the GeoJSON and the counts, and
    outlined in amber on the overlay; with withhold it is left out of the slide's verdict."""
    from benchmarks.synthetic_slide import write_mosaic
    from runtime.apps.slide import main

    blurred = tmp_path / "blurred.png"
    cv2.imwrite(str(blurred), cv2.GaussianBlur(cv2.imread(str(images_100x[40])), (0, 0), 3.0))
    path = tmp_path / "mosaic.tif"
    write_mosaic(path, [[images_100x[5], blurred]], levels=1)
    for qc in ("flag", "withhold"):
        out = tmp_path / qc
        assert main([str(path), "--out", str(out), "--model", str(model_dir), "--backend", "cpu", "--qc", qc,
                     "--no-progress"]) in (0, 1)
        (table,) = out.glob("*.csv")
        stem = table.name.removesuffix(".csv")
        rows = list(csv.DictReader(table.read_text().splitlines()))
        assert [r["qc_flags"] for r in rows] == ["", "out_of_focus"] and all(r["qc_focus"] for r in rows)
        result = json.loads((out / f"{stem}.json").read_text())
        assert result["counts"]["flagged"] == 1 and result["counts"]["withheld"] == (qc == "withhold")
        feats = json.loads((out / f"{stem}.geojson").read_text())["features"]
        if qc == "flag":
            assert [f["properties"]["qc_flags"] for f in feats] == [[], ["out_of_focus"]]
            assert "qc_focus" in feats[0]["properties"]["measurements"]
            overlay = cv2.imread(str(out / f"{stem}.overlay.png"))
            amber = np.all(np.abs(overlay.astype(int) - (0, 160, 224)) < 8, axis=2)
            assert amber[:, overlay.shape[1] // 2:].sum() > 20 and amber[:, :overlay.shape[1] // 2 - 2].sum() == 0
        else:
            assert [r["status"] for r in rows] == ["classified", "withheld"]
            assert feats[1]["properties"]["classification"]["name"] == "withheld"  # seen in QuPath, in grey
            if rows[0]["label"] == "Malignant":
                assert result["aggregate"]["value"] == pytest.approx(float(rows[0]["probability"]), abs=1e-6)
            else:  # a withheld field blocks a Benign verdict
                assert result["aggregate"]["label"] is None and result["aggregate"]["withheld"] == 1
