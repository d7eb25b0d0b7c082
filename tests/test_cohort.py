"""Cohorts (runtime/cohorts/) on the real engine: a local Ray cluster (2 CPUs, no dashboard) against the
single-process run, an actor killed mid-run, a run killed with SIGKILL and started again, the resume keys, and the
outputs pathology tools read (GeoJSON ids, the OME-TIFF probability map, the table as CSV and Parquet)."""
from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from benchmarks.synthetic_slide import write_mosaic
from runtime.apps.cohort import main
from tests.conftest import REPO

ray = pytest.importorskip("ray", reason="Ray is not installed (setup.sh installs the cluster extra)")


@pytest.fixture(scope="module")
def cohort(images_100x, tmp_path_factory):
    """Six 2 x 2-field mosaics of shared images and glass (one of them under the same name in another folder), and a
    damaged file."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "a").mkdir()
    (root / "b").mkdir()
    for i in range(5):
        write_mosaic(root / "a" / f"m{i}.tif", [[images_100x[i], None], [images_100x[i + 10], images_100x[i + 20]]],
                     levels=2, tile=256)
    write_mosaic(root / "b" / "m0.tif", [[images_100x[30], images_100x[31]], [None, None]], levels=2, tile=256)
    (root / "a" / "damaged.tif").write_bytes(b"II*\x00" + os.urandom(200))
    return root


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _run(model_dir, out, *inputs, extra=()):
    return main([*map(str, inputs), "--out", str(out), "--model", str(model_dir), "--backend", "cpu",
                 "--no-progress", "--mpp", "0.5", *extra])


def _rows(out):
    with open(out / "cohort.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_one_process_writes_every_output_a_row_each_and_the_run(model_dir, cohort, tmp_path):
    import pyarrow.parquet as pq
    import tifffile

    out = tmp_path / "out"
    assert _run(model_dir, out, cohort / "a", cohort / "b") == 1  # the damaged file is an error, the rest done
    rows = _rows(out)
    assert len(rows) == 7 and len({r["outputs"] for r in rows}) == 7  # two m0.tif, two stems
    bad = next(r for r in rows if r["path"].endswith("damaged.tif"))
    assert bad["status"] == "error" and "not a readable TIFF" in bad["error"]
    good = [r for r in rows if r is not bad]
    assert all(r["status"] == "classified" and 0 <= float(r["probability"]) <= 1 for r in good)
    assert pq.read_table(out / "cohort.parquet").column("path").to_pylist() == [r["path"] for r in rows]
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["name"] and run["options"]["mpp"] == 0.5 and run["classified"] == 7 and run["errors"] == 1
    assert all(r["model"].startswith(f"{run['model']['name']}@") for r in _rows(out) if r["status"] != "error")
    assert {"python", "numpy", "onnxruntime", "ray"} <= set(run["versions"]) and run["started"] <= run["finished"]
    stem = out / "slides" / good[0]["outputs"]
    ids = [f["id"] for f in json.loads(Path(f"{stem}.geojson").read_text())["features"]]
    assert len(ids) == 3 and len(set(ids)) == 3 and all(uuid.UUID(i) for i in ids)
    other = out / "slides" / next(r["outputs"] for r in good if r["path"].endswith("b/m0.tif"))
    assert not set(ids) & {f["id"] for f in json.loads(Path(f"{other}.geojson").read_text())["features"]}
    with tifffile.TiffFile(f"{stem}.probability.ome.tif") as t:
        assert t.is_ome and t.series[0].shape == (2, 2)
        assert 'PhysicalSizeX="336.0"' in t.ome_metadata  # 0.5 um x 672 px per field
    assert not Path(f"{stem}.geojson.gz").exists()  # only with --geojson-gz (the Ray test asks for it)
    header = Path(f"{stem}.csv").read_text().splitlines()[0].split(",")
    assert {"minx", "miny", "width", "height", "probability"} <= set(header)


def test_resume_skips_what_is_done_and_redoes_what_changed(model_dir, cohort, images_100x, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("m1.tif", "m2.tif", "m3.tif"):
        (folder / name).write_bytes((cohort / "a" / name).read_bytes())
    out = tmp_path / "out"
    assert _run(model_dir, out, folder) == 0
    first = {r["path"]: r for r in _rows(out)}
    write_mosaic(folder / "m2.tif", [[images_100x[40], images_100x[41]], [None, None]], levels=2, tile=256)
    assert _run(model_dir, out, folder) == 0  # the same name with new bytes is classified again
    again = {r["path"]: r for r in _rows(out)}
    assert [again[p]["resumed"] for p in sorted(again)] == ["True", "False", "True"]
    assert again[str(folder / "m2.tif")]["sha256"] != first[str(folder / "m2.tif")]["sha256"]
    assert again[str(folder / "m1.tif")]["probability"] == first[str(folder / "m1.tif")]["probability"]
    assert _run(model_dir, out, folder, extra=("--aggregate", "topk", "--top-k", "2")) == 0  # other options
    assert all(r["resumed"] == "False" and r["rule"] == "topk" for r in _rows(out))
    assert _run(model_dir, out, folder, extra=("--aggregate", "topk", "--top-k", "2", "--precision", "fp16")) == 0
    assert all(r["resumed"] == "False" for r in _rows(out))  # another variant of the model: classified again
    assert _run(model_dir, out, folder, extra=("--aggregate", "topk", "--top-k", "2", "--precision", "fp16")) == 0
    assert all(r["resumed"] == "True" for r in _rows(out))


def test_a_run_killed_with_sigkill_is_finished_by_the_next_one(model_dir, cohort, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "runtime.cohort", str(cohort / "a"), str(cohort / "b"), "--out", str(out),
           "--model", str(model_dir), "--backend", "cpu", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list((out / "slides").glob("*.result.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "slides").glob("*.result.json")))
    assert done_before >= 1
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # the damaged file
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == sorted({r["path"] for r in rows}) and len(rows) == 7
    assert sum(r["resumed"] == "True" for r in rows) == done_before
    assert "skipped (done before)" in proc.stderr


def test_ray_gives_the_same_table_and_loses_no_slide_when_an_actor_is_killed(model_dir, cohort, tmp_path,
                                                                             local_ray):
    ref = tmp_path / "ref"
    _run(model_dir, ref, cohort / "a", cohort / "b")
    want = {r["path"]: r["probability"] for r in _rows(ref)}
    out = tmp_path / "ray"
    code: list[int] = []
    extra = ("--ray", "local", "--actors", "2", "--cpus-per-actor", "1", "--geojson-gz")
    worker = threading.Thread(target=lambda: code.append(_run(model_dir, out, cohort / "a", cohort / "b",
                                                              extra=extra)))
    worker.start()
    deadline = time.monotonic() + 120
    while not list((out / "slides").glob("*.result.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "breakhis-cohort" in a["name"]]
    ray.kill(ray.get_actor(names[0]))  # mid-run: other slides are still queued or in flight
    worker.join(timeout=300)
    assert code == [1]
    rows = _rows(out)
    assert len(rows) == 7 and len({r["path"] for r in rows}) == 7  # every slide exactly once
    assert {r["path"]: r["probability"] for r in rows} == want  # the same probabilities on the same backend
    run = json.loads((out / "run.json").read_text())
    assert run["ray"]["actors"] == 2 and run["ray"]["worker_restarts"] >= 1
    stem = out / "slides" / next(r["outputs"] for r in rows if r["status"] != "error")
    assert gzip.decompress(Path(f"{stem}.geojson.gz").read_bytes()) == Path(f"{stem}.geojson").read_bytes()


def test_without_ray_the_flag_says_how_to_install_it(model_dir, cohort, tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from runtime.apps.cohort import main\n"
            f"sys.exit(main([{str(cohort / 'a')!r}, '--out', {str(tmp_path)!r}, '--ray', 'local']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pip install -e '.[cluster]'" in proc.stderr
    assert not (tmp_path / "cohort.csv").exists()


def test_a_dicom_slide_gives_the_fields_and_probabilities_of_the_tiff_it_came_from(model_dir, images_100x, tmp_path):
    """A DICOM WSI made here from a JPEG-tiled pyramidal TIFF (wsidicomizer, JPEG lossless: the same pixels), read
    through wsidicom with its scale from the DICOM pixel spacing."""
    dicomizer = pytest.importorskip("wsidicomizer", reason="wsidicomizer is not installed (the dev extra has it)")
    from wsidicom import WsiDicom
    from wsidicom.codec import JpegLosslessSettings

    tif = tmp_path / "scan.tif"
    write_mosaic(tif, [[images_100x[5], None], [images_100x[15], images_100x[25]]], levels=2, tile=256, mpp=0.5,
                 compression="jpeg")
    dcm = tmp_path / "scan-dicom"
    dcm.mkdir()
    try:
        with dicomizer.WsiDicomizer.open(tif, encoding=JpegLosslessSettings()) as wsi:
            wsi.save(dcm)
    except (ImportError, OSError, RuntimeError) as e:  # e.g. no libturbojpeg on this machine
        pytest.skip(f"wsidicomizer cannot convert here: {e}")
    with WsiDicom.open(dcm) as wsi:
        assert len(wsi.levels) == 2 and wsi.mpp.width == pytest.approx(0.5)
    out = tmp_path / "out"
    assert main([str(tif), str(dcm), "--out", str(out), "--model", str(model_dir), "--backend", "cpu",
                 "--no-progress"]) == 0
    a, b = _rows(out)
    assert (b["path"], b["scale_source"], float(b["mpp"])) == (str(dcm), "DICOM pixel spacing", 0.5)
    assert (a["classified"], a["background"], a["probability"]) == (b["classified"], b["background"], b["probability"])
    fields = [json.loads((out / "slides" / f"{r['outputs']}.json").read_text())["fields"] for r in (a, b)]
    assert fields[0] == fields[1] and sum(f["status"] == "classified" for f in fields[0]) == 3
    from runtime.apps.slide import main as slide_main

    assert slide_main([str(dcm), "--out", str(tmp_path / "one"), "--model", str(model_dir), "--backend", "cpu",
                       "--no-progress"]) == 0  # the slide CLI takes the folder too, named by its instances' hashes
    assert json.loads((tmp_path / "one" / f"{b['outputs']}.json").read_text())["fields"] == fields[1]


def test_bands_of_a_slide_on_two_actors_give_the_whole_slides_result(model_dir, cohort, tmp_path, local_ray):
    """--band-rows 1: every 2-row mosaic is two units, classified by whichever actor is free, and joined again."""
    import cv2
    import numpy as np

    whole, banded = tmp_path / "whole", tmp_path / "banded"
    _run(model_dir, whole, cohort / "a")
    _run(model_dir, banded, cohort / "a", extra=("--ray", "local", "--actors", "2", "--cpus-per-actor", "1",
                                                 "--band-rows", "1"))
    keep = ("path", "probability", "fields", "classified", "background", "errors", "status")
    assert [{k: r[k] for k in keep} for r in _rows(banded)] == [{k: r[k] for k in keep} for r in _rows(whole)]
    for r in _rows(whole):
        if r["status"] == "error":
            continue
        a, b = (out / "slides" / r["outputs"] for out in (whole, banded))
        fields = [json.loads(Path(f"{x}.json").read_text())["fields"] for x in (a, b)]
        assert fields[0] == fields[1]
        assert Path(f"{b}.geojson").read_text() == Path(f"{a}.geojson").read_text()
        assert np.array_equal(cv2.imread(f"{b}.overlay.png"), cv2.imread(f"{a}.overlay.png"))
    assert json.loads((banded / "run.json").read_text())["band_rows"] == 1


def test_a_ray_actors_death_is_told_by_the_error_inside_it():
    """An actor that raised while starting carries the traceback in Ray's message: the cohort says its last error
    line (here the re-checks' reference that cannot run), not only ActorDiedError."""
    from runtime.cohorts.pools import why_died

    died = RuntimeError("The actor died because of an error raised in its creation task, ray::SlideWorker.__init__()\n"
                        "Traceback (most recent call last):\n  File \"pools.py\", line 24, in __init__\n"
                        "runtime.model.manifest.ModelError: the fp32 reference of the re-checks answered one field "
                        "with [nan]: it cannot re-check; export the model again, or give up the re-checks with "
                        "--recheck off")
    assert why_died(died).startswith("runtime.model.manifest.ModelError: the fp32 reference") and \
        why_died(died).endswith("--recheck off")
    assert why_died(ConnectionError("")) == "ConnectionError"
