"""Withholding can only withhold (--qc withhold): a field the quality check flags may block a Benign verdict, never
a Malignant one. On the trained model, with mosaics of the shared images: a malignant field the check flags (a
grey-scale capture of SOB_M_MC-14-10147-100-007, which the model still calls Malignant) beside a clean benign field
gets no verdict, said why, everywhere (Python, CLI, API, watch records, slides, cohorts), where the old rule called it
Benign; a clean malignant field beside a flagged benign one stays Malignant. And one tissue rule for slides: their
--min-tissue is the quality check's tissue limit."""
from __future__ import annotations

import csv
import json
import time

import cv2
import numpy as np
import pytest

from benchmarks.quality_limits import FIELD
from runtime.io.inputs import ImageInput
from runtime.pipeline.classifier import Classifier
from tests.conftest import run_module
from tests.test_serve import multipart, post, start_server

MALIGNANT = "SOB_M_MC-14-10147-100-007.png"  # trained model, FP32: 0.993; its grey-scale copy 0.996
BENIGN = "SOB_B_A-14-22549G-100-026.png"  # 0.028; its grey-scale copy 0.011


def _field(shared_data, name: str, grey: bool = False) -> np.ndarray:
    bgr = cv2.imread(str(shared_data / "breakhis-100x" / name))[:FIELD[0], :FIELD[1]]
    return cv2.cvtColor(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR) if grey else bgr


@pytest.fixture(scope="module")
def mosaics(shared_data, tmp_path_factory) -> dict[str, object]:
    """hidden: the flagged malignant field beside the clean benign one; kept: the clean malignant field beside the
    flagged benign one. Each as an array and as a PNG (and the single fields as PNGs, for the slides)."""
    folder = tmp_path_factory.mktemp("withhold")
    out: dict[str, object] = {"folder": folder}
    for name, left, right in (("hidden", (MALIGNANT, True), (BENIGN, False)),
                              ("kept", (MALIGNANT, False), (BENIGN, True))):
        img = np.ascontiguousarray(np.hstack([_field(shared_data, *left), _field(shared_data, *right)]))
        cv2.imwrite(str(folder / f"{name}.png"), img)
        out[name] = img
    for tag, (name, grey) in {"m_grey": (MALIGNANT, True), "m": (MALIGNANT, False), "b": (BENIGN, False),
                              "b_grey": (BENIGN, True)}.items():
        cv2.imwrite(str(folder / f"{tag}.png"), _field(shared_data, name, grey))
    return out


@pytest.fixture(scope="module")
def withholding(trained_dir):
    """The trained model at FP32 (labels are its own) with --qc withhold, shared by the tests below."""
    with Classifier(trained_dir, backend="cpu", precision="fp32", qc="withhold") as clf:
        yield clf


@pytest.fixture(scope="module")
def results(mosaics, withholding):
    """Both mosaics, classified with --qc withhold (each field keeps its probability: what --qc flag would count)."""
    images = [ImageInput("hidden.png", array=mosaics["hidden"]), ImageInput("kept.png", array=mosaics["kept"])]
    return dict(zip(("hidden", "kept"), withholding.classify(images)))


def test_a_withheld_field_never_turns_a_malignant_image_benign(results):
    held = results["hidden"]
    # the premise: the flagged field is one the model calls Malignant (what --qc flag would say), the clean one Benign
    assert held.fields[0].flags and not held.fields[1].flags
    assert held.fields[0].probability > 0.5 > held.fields[1].probability
    # withhold: the flagged field gets no label, and the clean Benign one cannot give the image a Benign verdict
    assert held.label is None and held.probability is None and held.withheld == 1
    assert [f.label for f in held.fields] == [None, "Benign"]
    assert "no verdict: 1 of 2 fields withheld by the quality check" in held.error
    assert "no stain colour" in held.error and "hidden.png" in held.error
    # the measures and flags stay in the result, and the record of the withheld field's probability with them
    d = held.to_dict()
    assert d["withheld"] == 1 and d["fields"][0]["flags"] and d["fields"][0]["quality"]


def test_a_counted_malignant_field_keeps_the_verdict(results):
    held = results["kept"]
    assert not held.fields[0].flags and held.fields[1].flags and held.fields[0].label == "Malignant"
    assert held.error is None and held.label == "Malignant" and held.withheld == 1
    assert held.probability == held.fields[0].probability and held.advice


def test_the_cli_says_no_verdict_and_exits_1(trained_dir, mosaics, capsys):
    from runtime.apps.classify import main

    folder = mosaics["folder"]
    assert main([str(folder / "hidden.png"), str(folder / "kept.png"), "--model", str(trained_dir), "--backend", "cpu",
                 "--precision", "fp32", "--qc", "withhold", "--no-progress"]) == 1
    printed = capsys.readouterr()
    assert "0 failed, 1 without a verdict (fields withheld by the quality check)" in printed.out
    hidden_line = next(line for line in printed.out.splitlines() if line.startswith("hidden.png"))
    assert "NO VERDICT" in hidden_line and "Benign" not in hidden_line
    assert "hidden.png: no verdict: 1 of 2 fields withheld" in printed.err


def test_the_api_keeps_measures_and_flags_in_its_422(trained_dir, mosaics):
    proc, url = start_server(trained_dir, "--precision", "fp32", "--qc", "withhold")
    try:
        body, ctype = multipart("hidden.png", (mosaics["folder"] / "hidden.png").read_bytes())
        status, out = post(url, body, ctype)
        assert status == 422 and "no verdict: 1 of 2 fields withheld" in out["error"]
        assert out["label"] is None and out["withheld"] == 1
        assert out["fields"][0]["flags"] and out["fields"][0]["quality"] and out["advice"]
        body, ctype = multipart("kept.png", (mosaics["folder"] / "kept.png").read_bytes())
        status, out = post(url, body, ctype)
        assert status == 200 and out["label"] == "Malignant" and out["withheld"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_watch_records_say_no_verdict(withholding, mosaics, tmp_path):
    from runtime.watchfolder.watcher import Watcher

    folder = tmp_path / "captures"
    folder.mkdir()
    (folder / "hidden.png").write_bytes((mosaics["folder"] / "hidden.png").read_bytes())
    out = tmp_path / "results.jsonl"
    w = Watcher(folder, out, withholding, settle=0.0)
    for _ in range(40):
        if w.poll():
            break
        time.sleep(0.1)
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["label"] is None and rec["withheld"] == 1 and "no verdict: 1 of 2 fields withheld" in rec["error"]
    assert rec["fields"][0]["flags"]


def _slide(folder, layout, name):
    from benchmarks.synthetic_slide import write_mosaic

    path = folder / f"{name}.tif"
    write_mosaic(path, [[folder / f"{t}.png" for t in layout]], levels=1)
    return path


def test_slides_and_cohorts_withhold_only(trained_dir, mosaics, tmp_path, capsys):
    """A slide's region verdict follows the same rule: the flagged malignant field beside a clean benign one gives
    no verdict (CSV, GeoJSON, JSON, summary, exit code 1), and its cohort row has its own status."""
    from runtime.apps.slide import main

    folder = mosaics["folder"]
    hidden, kept = _slide(folder, ("m_grey", "b"), "hidden-slide"), _slide(folder, ("m", "b_grey"), "kept-slide")
    common = ["--model", str(trained_dir), "--backend", "cpu", "--precision", "fp32", "--no-progress"]
    out = tmp_path / "withhold"
    assert main([str(hidden), str(kept), "--out", str(out), *common, "--qc", "withhold"]) == 1
    printed = capsys.readouterr().out
    assert "hidden-slide.tif: no verdict: 1 of 2 fields withheld" in printed and "1 withheld" in printed
    assert "kept-slide.tif: Malignant" in printed
    (table,) = out.glob("hidden-slide.tif.*.csv")
    stem = table.name.removesuffix(".csv")
    assert [r["status"] for r in csv.DictReader(open(table))] == ["withheld", "classified"]
    result = json.loads((out / f"{stem}.json").read_text())
    assert result["aggregate"]["label"] is None and result["aggregate"]["withheld"] == 1
    assert result["aggregate"]["value"] is None and "no verdict" in result["aggregate"]["note"]
    feats = json.loads((out / f"{stem}.geojson").read_text())["features"]
    assert [f["properties"]["classification"]["name"] for f in feats] == ["withheld", "Benign"]
    (kept_json,) = out.glob("kept-slide.tif.*[0-9a-f].json")
    assert json.loads(kept_json.read_text())["aggregate"]["label"] == "Malignant"

    cohort = tmp_path / "cohort"
    proc = run_module("runtime.cohort", str(hidden), "--out", str(cohort), *common, "--qc", "withhold")
    assert proc.returncode == 1, proc.stderr
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(cohort / "cohort.csv"))}
    assert rows["hidden-slide.tif"]["status"] == "no verdict" and rows["hidden-slide.tif"]["verdict"] == ""
    assert "no verdict" in rows["hidden-slide.tif"]["error"]
    assert json.loads((cohort / "run.json").read_text())["no_verdict"] == 1


def test_min_tissue_is_the_quality_checks_tissue_limit_too(withholding, mosaics):
    """A field with about 18 % tissue: background at the default --min-tissue (0.25); classified with
    --min-tissue 0.1, and then not flagged mostly glass (the old check flagged it against its own 0.25)."""
    from runtime.slides.classify import classify_slide

    sparse = cv2.imread(str(mosaics["folder"] / "b.png"))
    sparse[:, int(FIELD[1] * 0.18):] = 242  # clean glass beyond the left 18 %
    cv2.imwrite(str(mosaics["folder"] / "sparse.png"), sparse)
    path = _slide(mosaics["folder"], ("sparse", "b"), "sparse-slide")
    default = classify_slide(withholding, path)
    low = classify_slide(withholding, path, min_tissue=0.1)
    assert [f.status for f in default.fields] == ["background", "classified"]
    assert 0.1 < low.fields[0].tissue < 0.25 and low.fields[0].quality["tissue"] > 0.1
    assert [f.status for f in low.fields] == ["classified", "classified"]
    assert "mostly_glass" not in low.fields[0].flags and low.aggregate["label"] is not None
    assert "classified when tissue >= 0.1" in low.tissue_rule


def test_a_field_left_out_never_lets_a_region_be_benign_whatever_the_rule():
    """The region rule itself, by hand: fields withheld or unread (a damaged tile) take a verdict away, never give
    one; the note says what the counted fields gave under the rule in use; a counted Malignant verdict stands."""
    from runtime.slides.aggregate import aggregate_verdict
    from runtime.slides.fields import SlideField

    labels = ("Benign", "Malignant")
    held = [SlideField(0, 1, 0, 0, 672, 448, 1.0, "withheld", 0.9, flags=["out_of_focus"])]
    for rule in ("max", "topk", "mean", "fraction"):
        a = aggregate_verdict([0.2, 0.3], rule, 2, 0.5, labels, held)
        assert a["label"] is None and a["value"] is None and a["withheld"] == 1
        assert f"with the fields left out at their lowest, {rule} = " in a["note"]
        assert "1 of 3 fields withheld" in a["note"]
        u = aggregate_verdict([0.2, 0.3], rule, 2, 0.5, labels, unread=1)
        assert u["label"] is None and "1 of 3 fields could not be read" in u["note"]
        assert aggregate_verdict([0.2, 0.9], "max", 2, 0.5, labels, held, unread=1)["label"] == "Malignant"
    assert aggregate_verdict([], "max", 2, 0.5, labels, unread=2)["note"].startswith(
        "no verdict: 2 of 2 fields could not be read; no field was counted")
    assert aggregate_verdict([0.2], "max", 2, 0.5, labels)["label"] == "Benign"  # nothing left out: as before


def test_leaving_benign_fields_out_never_makes_a_region_malignant():
    """Withholding only takes a verdict away under every rule: [0.9, 0.1, 0.1, 0.1] counted is Benign by mean, top-2
    and fraction; with the three 0.1 fields withheld, the counted field alone would say Malignant, so the region gets
    no verdict; where the positive label holds with the left-out fields at 0, it stands (and says so)."""
    from runtime.slides.aggregate import aggregate_verdict
    from runtime.slides.fields import SlideField

    labels = ("Benign", "Malignant")
    held = [SlideField(0, c, 0, 0, 672, 448, 1.0, "withheld", 0.1, flags=["out_of_focus"]) for c in (1, 2, 3)]
    for rule in ("topk", "mean", "fraction"):
        assert aggregate_verdict([0.9, 0.1, 0.1, 0.1], rule, 2, 0.5, labels)["label"] == "Benign"
        a = aggregate_verdict([0.9], rule, 2, 0.5, labels, held)
        assert a["label"] is None and "no verdict" in a["note"], (rule, a)
    kept = aggregate_verdict([0.9, 0.95, 0.99], "mean", 2, 0.5, labels, held[:1])  # (0.9+0.95+0.99+0)/4 > 0.5
    assert kept["label"] == "Malignant" and "counted at 0" in kept["note"]
