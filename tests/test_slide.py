"""Slides and mosaics: a synthetic pyramidal BigTIFF made of real shared fields and blank glass is classified with
memory bounded by a chunk of fields (not by the slide), blank fields are skipped, every tissue field gives the same
answer as the same pixels given as an image, the GeoJSON tiles the tissue fields in level-0 pixels and round-trips,
and images whose BreakHis name states another magnification are flagged."""
from __future__ import annotations

import json
import os
import stat
import threading
import tracemalloc
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks.synthetic_slide import FIELD, write_mosaic
from runtime.io.scale import Scale, resample_factor
from runtime.io.slide_source import open_source
from runtime.model.manifest import Contract, sha256_file
from runtime.model.model_dir import ModelDir
from runtime.pipeline.classifier import Classifier
from runtime.slides.aggregate import AGGREGATES, aggregate_verdict
from runtime.slides.classify import Cancelled, classify_slide
from runtime.slides.overlay import LEGEND
from tests.conftest import run_module

FH, FW = FIELD


@pytest.fixture(scope="module")
def clf(model_dir):
    with Classifier(model_dir, backend="cpu", precision="fp32", batch_size=1) as c:
        yield c


@pytest.fixture(scope="module")
def mosaic(images_100x, tmp_path_factory):
    """3 x 4 fields: 7 real fields, 5 of blank glass."""
    layout = [[images_100x[0], None, images_100x[30], None],
              [None, images_100x[5], images_100x[40], images_100x[12]],
              [images_100x[47], None, None, images_100x[21]]]
    path = tmp_path_factory.mktemp("slides") / "mosaic.tif"
    write_mosaic(path, layout, levels=3)
    return path, layout


def test_the_synthetic_slide_is_a_pyramid_with_its_scale(mosaic):
    path, layout = mosaic
    src = open_source(path)
    try:
        assert src.sizes == [(4 * FW, 3 * FH), (2 * FW, 3 * FH // 2), (FW, 3 * FH // 4)]
        assert src.scale == Scale(100.0, None, "SVS description")
        assert np.array_equal(src.read(0, 0, 0, FW, FH), cv2.imread(str(layout[0][0]))[:FH, :FW])
    finally:
        src.close()


def test_blank_fields_are_skipped_and_tissue_fields_equal_the_same_pixels_as_an_image(clf, mosaic):
    path, layout = mosaic
    res = classify_slide(clf, path)
    assert res.counts == {"fields": 12, "classified": 7, "background": 5, "errors": 0, "rechecked": 0,
                          "flagged": 0, "withheld": 0}
    assert res.scale["factor"] == 1.0 and res.scale["level"] == 0 and not res.warnings
    direct = {str(p): r for p, r in zip(_cells(layout), clf.classify([p for p in _cells(layout)]))}
    for f in res.fields:
        p = layout[f.row][f.col]
        assert (f.x, f.y, f.width, f.height) == (f.col * FW, f.row * FH, FW, FH)
        if p is None:
            assert f.status == "background" and f.probability is None and f.tissue < 0.25
        else:  # the 700x460 image has exactly this one field: the same pixels, the same answer
            assert f.status == "classified" and f.probability == direct[str(p)].probability, (f, p)
            assert f.label == direct[str(p)].label
    assert res.aggregate["rule"] == "max"
    assert res.aggregate["value"] == max(r.probability for r in direct.values())


def test_geojson_tiles_the_tissue_fields_in_level0_pixels_and_round_trips(clf, mosaic, tmp_path):
    path, layout = mosaic
    res = classify_slide(clf, path, overlay=tmp_path / "o.png")
    gj = json.loads(json.dumps(res.geojson()))
    assert gj == res.geojson() and gj["type"] == "FeatureCollection"
    boxes = set()
    for feat in gj["features"]:
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        (ring,) = feat["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        xs, ys = {x for x, _ in ring}, {y for _, y in ring}
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        assert (x1 - x0, y1 - y0) == (FW, FH) and 0 <= x0 and x1 <= 4 * FW and y1 <= 3 * FH
        props = feat["properties"]
        assert props["classification"]["name"] in ("Benign", "Malignant")
        assert 0.0 <= props["measurements"]["probability"] <= 1.0
        boxes.add((x0, y0))
    assert boxes == {(c * FW, r * FH) for r, row in enumerate(layout) for c, p in enumerate(row) if p is not None}
    lines = res.csv().splitlines()
    assert lines[0].startswith("row,col,minx,miny,width,height") and len(lines) == 13
    overlay = cv2.imread(str(tmp_path / "o.png"))
    assert overlay is not None and max(overlay.shape[:2]) <= 1024


def test_a_large_sparse_slide_is_classified_in_bounded_memory(clf, images_100x, tmp_path):
    """A 40 x 40-field slide: 26,880 x 17,920 pixels, 1.4 GB as RGB; 4 tissue fields. Python-side allocations
    (numpy, tile decoding) stay far below the slide's size: the thumbnail, one chunk, one batch."""
    layout: list[list] = [[None] * 40 for _ in range(40)]
    for (r, c), p in zip([(0, 0), (13, 27), (39, 39), (20, 3)], images_100x):
        layout[r][c] = p
    path = tmp_path / "large.tif"
    w, h = write_mosaic(path, layout, levels=6, tile=1024)
    assert w * h * 3 > 1.4e9
    tracemalloc.start()
    try:
        res = classify_slide(clf, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.counts["classified"] == 4 and res.counts["background"] == 1596
    assert peak < 120e6, f"peak Python allocation {peak / 1e6:.0f} MB"


def test_other_magnifications_are_flagged_in_every_output(clf, model_dir, shared_data):
    others = sorted((shared_data / "breakhis-other").glob("*.png"))
    assert len(others) == 10
    for r in clf.classify(others):
        assert r.error is None and any("the file name says" in w and "100X" in w for w in r.warnings), r.warnings
    (same,) = clf.classify([sorted((shared_data / "breakhis-100x").glob("*.png"))[0]])
    assert not any("file name says" in w for w in same.warnings)
    forty = next(p for p in others if "-40-" in p.name)
    proc = run_module("runtime.classify", "--no-progress", "--model", str(model_dir), "--backend", "cpu",
                      "--precision", "fp32", str(forty))
    assert proc.returncode == 0 and "WARNING" in proc.stdout and "says 40X" in proc.stdout
    res = classify_slide(clf, forty)  # as a region: resampled to the model's scale, and said so
    assert res.scale["factor"] == pytest.approx(0.4) and any("upsampled 2.5x" in w for w in res.warnings)


def test_scale_rules():
    c = Contract(224, 224, (2, 3), "BGR", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.5, ("B", "M"), magnification=100.0)
    assert resample_factor(Scale(200.0, None, "flag"), c)[0] == 2.0
    assert resample_factor(Scale(100.0, None, "flag"), c) == (1.0, [])
    f, warn = resample_factor(Scale(), c)
    assert f == 1.0 and "scale unknown" in warn[0]
    f, warn = resample_factor(Scale(None, 0.25, "OME-XML"), c)  # microns per pixel, but the model states none
    assert f == 1.0 and "only in microns per pixel" in warn[0]
    with_mpp = replace(c, mpp=0.5)
    assert resample_factor(Scale(40.0, 0.25, "OME-XML"), with_mpp)[0] == 2.0  # microns per pixel win


def test_aggregation_rules_by_hand():
    p = [0.1, 0.9, 0.4, 0.7]
    got = {r: aggregate_verdict(p, r, 2, 0.5, ("Benign", "Malignant")) for r in AGGREGATES}
    assert got["max"]["value"] == 0.9 and got["max"]["label"] == "Malignant"
    assert got["topk"]["value"] == pytest.approx(0.8) and got["topk"]["k"] == 2
    assert got["mean"]["value"] == pytest.approx(0.525) and got["mean"]["label"] == "Malignant"
    assert got["fraction"]["value"] == 0.5 and got["fraction"]["label"] == "Benign"
    assert all(g["rule"] == r and g["meaning"] for r, g in got.items())
    assert aggregate_verdict([], "max", 3, 0.5, ("B", "M"))["label"] is None


def test_slide_cli_writes_every_output(model_dir, mosaic, tmp_path):
    """The slide CLI's outputs, their modes, legend and model tags, on the narrow model: the outputs are under test,
    not the model's answers (a slide's fields give the same answers as the same pixels given as images:
    test_blank_fields_are_skipped_and_tissue_fields_equal_the_same_pixels_as_an_image)."""
    path, _ = mosaic
    name = ModelDir.open(model_dir).manifest.name
    proc = run_module("runtime.slide", "--model", str(model_dir), "--backend", "cpu", "--no-progress",
                      "--aggregate", "topk", "--out", str(tmp_path), str(path))
    assert proc.returncode == 0, proc.stderr
    assert "topk" in proc.stdout and "7 classified, 5 background" in proc.stdout
    stem = f"mosaic.tif.{sha256_file(path)[:12]}"
    for suffix in (".geojson", ".csv", ".overlay.png", ".json", ".probability.ome.tif"):
        assert (tmp_path / f"{stem}{suffix}").is_file()
    assert f"wrote {tmp_path / stem}.geojson" in proc.stdout
    umask = os.umask(0o022)
    os.umask(umask)
    assert {oct(stat.S_IMODE((tmp_path / f"{stem}{suffix}").stat().st_mode)) for suffix in (
        ".geojson", ".csv", ".overlay.png", ".json", ".probability.ome.tif")} == {oct(0o666 & ~umask)}
    # the overlay's legend: the colour scale from green (p 0) to blue (p 1) under the thumbnail, and the verdict
    overlay = cv2.imread(str(tmp_path / f"{stem}.overlay.png"))
    strip = overlay[-LEGEND:]
    assert (strip[6:20, 8] == (0, 200, 0)).all() and (strip[6:20, 167] == (255, 60, 0)).all()
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert saved["aggregate"]["rule"] == "topk" and saved["model"]["name"] == name
    # every output names the model that made it (name@sha256 and precision) and carries the region's warnings
    tag = f"{name}@{saved['model']['sha256'][:12]} {saved['model']['precision']}"
    rows = (tmp_path / f"{stem}.csv").read_text().splitlines()
    assert rows[0].endswith(",model") and all(r.endswith(tag) for r in rows[1:])
    geo = json.loads((tmp_path / f"{stem}.geojson").read_text())["breakhis"]
    assert geo["model"] == tag and geo["warnings"] == saved["warnings"] and geo["aggregate"] == saved["aggregate"]
    assert saved["sha256"] == sha256_file(path)
    proc = run_module("runtime.slide", "--no-progress", "--out", str(tmp_path), str(tmp_path / "missing.tif"))
    assert proc.returncode == 1 and "missing.tif" in proc.stderr


def _cells(layout):
    return [p for row in layout for p in row if p is not None]


def test_a_single_level_image_gives_its_thumbnail_block_by_block(images_100x, tmp_path):
    layout = [[images_100x[i], None, images_100x[i + 1], images_100x[i + 2]] for i in (0, 10, 20, 30)]
    path = tmp_path / "flat.tif"
    write_mosaic(path, layout, levels=1)  # 2,688 x 1,792: two blocks by one, no pyramid to fall back on
    src = open_source(path)
    try:
        thumb, down = src.thumbnail(max_side=1000)
        whole = cv2.resize(src.read(0, 0, 0, 4 * FW, 4 * FH), (thumb.shape[1], thumb.shape[0]),
                           interpolation=cv2.INTER_AREA)
    finally:
        src.close()
    assert thumb.shape == (667, 1000, 3) and down == pytest.approx(2.688)
    assert np.abs(thumb.astype(int) - whole).mean() < 2.0


def test_openslide_reads_the_same_pixels_where_installed(mosaic, monkeypatch):
    from runtime.io.decode import ImageError
    from runtime.io.slide_source import OpenSlideSource

    path, layout = mosaic
    try:
        import openslide  # noqa: F401
    except ImportError:
        pytest.skip("OpenSlide not installed (setup.sh installs the openslide extra)")
    src = OpenSlideSource(path)  # OpenSlide reads a generic tiled TIFF too: compare it with the tifffile reader
    try:
        assert src.sizes[0] == (4 * FW, 3 * FH)
        assert np.array_equal(src.read(0, FW, FH, FW, FH), cv2.imread(str(layout[1][1]))[:FH, :FW])
    finally:
        src.close()
    monkeypatch.setitem(__import__("sys").modules, "openslide", None)  # as on a machine without the extra
    with pytest.raises(ImageError, match="needs OpenSlide"):
        open_source(path.with_suffix(".ndpi"))


def test_two_inputs_of_one_name_from_two_folders_keep_their_own_outputs(model_dir, images_100x, tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for folder, img in ((a, images_100x[1]), (b, images_100x[2])):
        folder.mkdir()
        write_mosaic(folder / "scan.tif", [[img]], levels=1)
    proc = run_module("runtime.slide", "--model", str(model_dir), "--backend", "cpu", "--no-progress", "--json",
                      "--out", str(out), str(a / "scan.tif"), str(b / "scan.tif"))
    assert proc.returncode == 0, proc.stderr
    first, second = json.loads(proc.stdout)
    assert first["fields"][0]["probability"] != second["fields"][0]["probability"]
    for res, src in ((first, a / "scan.tif"), (second, b / "scan.tif")):
        stem = out / f"scan.tif.{sha256_file(src)[:12]}"
        assert json.loads(Path(f"{stem}.json").read_text())["fields"] == res["fields"]  # each kept its own
    assert len(list(out.iterdir())) == 10  # 5 outputs each: GeoJSON, CSV, JSON, overlay, probability map
    proc = run_module("runtime.slide", "--model", str(model_dir), "--backend", "cpu", "--no-progress", "--jsonl",
                      "--out", str(out), str(a / "scan.tif"), str(b / "scan.tif"))
    assert proc.returncode == 0 and [json.loads(line)["fields"] for line in proc.stdout.splitlines()] == \
        [first["fields"], second["fields"]]  # one line per slide, as runtime.classify --jsonl


def test_a_cancelled_slide_stops_while_planning(clf, mosaic, monkeypatch):
    """The server's DELETE sets the job's event: planning checks it (before the thumbnail, and row by row), so a
    cancelled job classifies no field, however many its slide plans."""
    path, _ = mosaic
    calls = []
    monkeypatch.setattr(clf, "classify", lambda items: calls.append(items) or [])
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(Cancelled):
        classify_slide(clf, path, cancelled=cancelled)
    assert calls == []
