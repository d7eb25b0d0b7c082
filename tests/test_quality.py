"""Field quality before a verdict (runtime/pipeline/quality.py): no flag on any real image at hand; every field
degraded as a microscope degrades it is flagged with what to do; --qc flag marks the verdict, withhold takes flagged
fields out of it, off skips the check; the outputs carry the measures. The degradations are benchmarks/
quality_limits.py's, the ones the limits were derived from."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from benchmarks.quality_limits import DEGRADATIONS, FIELD, field_measures
from runtime.io.inputs import ImageInput, image_files
from runtime.pipeline.classifier import Classifier
from runtime.pipeline.quality import LIMITS, MEASURES, FieldQuality, advice
from tests.conftest import run_module

FLAG_OF = {lim.measure: lim.flag for lim in LIMITS}


@pytest.fixture(scope="module")
def real_images(shared_data):
    """Every real image at hand: the 48 BreakHis 100X images and the 10 at other magnifications."""
    paths = [p for f in ("breakhis-100x", "breakhis-other") for p in image_files(shared_data / f)]
    assert len(paths) == 58
    return paths


@pytest.fixture(scope="module")
def clf(model_dir):
    with Classifier(model_dir, backend="cpu", precision="fp32") as c:
        yield c


def test_no_real_image_is_flagged(clf, real_images):
    """Through the classifier's own decode-and-plan stage (what every path runs): every field of every real image
    passes every limit, with every measure a finite number."""
    for path in real_images:
        prepared = clf.prepare(str(path))
        assert prepared.quality is not None and len(prepared.quality) == prepared.n_fields
        for q in prepared.quality:
            assert set(q.measures) == set(MEASURES) and all(np.isfinite(v) for v in q.measures.values())
            assert q.flags == [], f"{path.name}: {q.flags} {q.measures}"


@pytest.mark.parametrize("kind", [k for k in DEGRADATIONS if k != "dark_gamma"])
def test_every_degraded_real_image_is_flagged_with_what_to_do(real_images, kind):
    """Each degradation of each real image crosses the limit of the measure made for it (blur sigma 2 px,
    exposure until 30 % saturate, the lamp at 0.7, 80 % glass, grey-scale, colours turned off H&E)."""
    _, degrade, measure = DEGRADATIONS[kind]
    for path in real_images:
        q = FieldQuality.judge(field_measures(degrade(cv2.imread(str(path)))))
        assert FLAG_OF[measure] in q.flags, f"{path.name} {kind}: {q.measures}"
        assert advice(q.flags)


def test_darkening_by_gamma_is_flagged_where_a_field_can_tell(real_images):
    """Gamma 2.5 darkens a light field into one that looks like a well-exposed, more strongly stained field: no
    single-field measure can tell those apart (docs/quality.md). Every field of at most the median real brightness
    is flagged once darkened so."""
    _, darken, _ = DEGRADATIONS["dark_gamma"]
    bright = {p: field_measures(cv2.imread(str(p)))["brightness"] for p in real_images}
    median = float(np.median(list(bright.values())))
    for path in (p for p in real_images if bright[p] <= median):
        q = FieldQuality.judge(field_measures(darken(cv2.imread(str(path)))))
        assert "under_exposed" in q.flags, f"{path.name}: {q.measures}"


def _two_fields(path) -> np.ndarray:
    """A real field beside the same field out of focus: a 2-field image."""
    field = cv2.imread(str(path))[:FIELD[0], :FIELD[1]]
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
        rows = list(csv.DictReader(open(table)))
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
            assert [r["status"] for r in rows] == ["classified", "withheld"] and len(feats) == 1
            if rows[0]["label"] == "Malignant":
                assert result["aggregate"]["value"] == pytest.approx(float(rows[0]["probability"]), abs=1e-6)
            else:  # a withheld field blocks a Benign verdict
                assert result["aggregate"]["label"] is None and result["aggregate"]["withheld"] == 1
