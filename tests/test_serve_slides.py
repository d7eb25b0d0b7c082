"""Slide jobs of the real server, bounded before any work: a scale out of range (asked for or stated by the file)
and a slide of too many fields get 413 before planning; a start that cannot store its upload frees its slot and its
folder; SIGTERM removes the uploads of running jobs; folders of killed runs are removed at start. Each server here
has a temp folder of its own (TMPDIR), so that what it leaves behind is seen, and nobody else's is touched."""
from __future__ import annotations

import json
import os
import resource
import signal
import time
import urllib.request

import pytest

from benchmarks.synthetic_slide import write_mosaic
from runtime.serving.slide_jobs import PREFIX, STALE_AGE_S
from tests.test_serve import multipart, post, start_server
from tests.test_serve_limits import SLOW_SERVER

pytest.importorskip("fastapi", reason="fastapi not installed (setup.sh installs the serve extra)")


def _tmp_env(tmp_path):
    folder = tmp_path / "server-tmp"
    folder.mkdir()
    return folder, {**os.environ, "TMPDIR": str(folder)}


def _jobs(folder):
    return sorted(p.name for p in folder.glob(PREFIX + "*"))


def _wait(url, job, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = json.loads(urllib.request.urlopen(url + job["status"], timeout=30).read())
        if state["state"] != "running":
            return state
        time.sleep(0.2)
    pytest.fail(f"job still running after {timeout} s")


@pytest.fixture(scope="module")
def mosaic(images_100x, tmp_path_factory):
    """2x2 fields at the model's 100X (AppMag stated), two of them tissue."""
    path = tmp_path_factory.mktemp("slides") / "mosaic.tif"
    write_mosaic(path, [[images_100x[3], None], [None, images_100x[44]]], levels=2)
    return path.read_bytes()


def test_scales_out_of_range_and_too_many_fields_get_413_before_any_work(model_dir, images_100x, mosaic, tmp_path):
    folder, env = _tmp_env(tmp_path)
    tiny = tmp_path / "tiny-appmag.tif"  # the file itself states 1X: 0.01x the model's scale
    write_mosaic(tiny, [[images_100x[3]]], levels=1, magnification=1.0)
    proc, url = start_server(model_dir, "--max-slide-fields", "3", env=env)
    try:
        png = images_100x[0].read_bytes()
        for query in ("magnification=0.01", "magnification=24", "magnification=401", "magnification=1e9"):
            status, out = post(url, png, path=f"/v1/slide?{query}")  # a parameter out of its range
            assert status == 400 and "magnification must be within 25..400" in out["error"], (query, out)
        status, out = post(url, *multipart(tiny.name, tiny.read_bytes()), path="/v1/slide")
        assert status == 413 and "(1X, " in out["error"] and "0.01x the model's" in out["error"], out
        # a BreakHis name stating 1X: the same rule for the scale a file name states
        body, ctype = multipart("SOB_B_A-14-22549AB-1-001.png", png)
        status, out = post(url, body, ctype, path="/v1/slide")
        assert status == 413 and "SOB_B_A-14-22549AB-1-001.png" in out["error"], out
        # 4 fields at the model's scale, above a limit of 3
        status, out = post(url, *multipart("mosaic.tif", mosaic), path="/v1/slide")
        assert status == 413 and "4 fields at 1x the model's scale" in out["error"] and "limit of 3" in out["error"]
        assert _jobs(folder) == []  # nothing was kept of the refused uploads
        status, job = post(url, *multipart("mosaic.tif", mosaic), path="/v1/slide?magnification=400")  # 4x: in range
        assert status == 202, job
        assert _wait(url, job)["state"] == "done"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert _jobs(folder) == []


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))  # a disk that is full after 2 MiB per file


def test_a_start_that_cannot_store_its_upload_frees_its_slot_and_folder(model_dir, images_100x, mosaic, tmp_path):
    folder, env = _tmp_env(tmp_path)
    big = images_100x[0].read_bytes() * 8  # about 4 MB: beyond what the server may write
    assert len(big) > 2 << 20 > len(mosaic)
    proc, url = start_server(model_dir, env=env, preexec_fn=_limit_file_size)
    try:
        for _ in range(2):  # the slot is free again each time
            status, out = post(url, big, path="/v1/slide")
            assert status == 503 and "the upload could not be stored" in out["error"], out
            assert _jobs(folder) == []
        status, job = post(url, *multipart("mosaic.tif", mosaic), path="/v1/slide")
        assert status == 202, job
        assert _wait(url, job)["state"] == "done"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sigterm_removes_running_uploads_and_a_start_removes_stale_ones(model_dir, mosaic, tmp_path):
    folder, env = _tmp_env(tmp_path)
    dead = folder / f"{PREFIX}999999999-abc"  # above any pid: its server is gone
    alive = folder / f"{PREFIX}{os.getpid()}-def"  # this test's pid: a server that still runs
    old, new = folder / f"{PREFIX}old", folder / f"{PREFIX}new"  # named by earlier versions, without a pid
    for d in (dead, alive, old, new):
        d.mkdir()
        (d / "slide.tif").write_bytes(b"patient data")
    os.utime(old, (time.time() - STALE_AGE_S - 60,) * 2)
    code = SLOW_SERVER.replace("SECONDS", "3.0")  # each field takes 3 s: the job is still running at SIGTERM
    proc, url = start_server(model_dir, code=code, env=env)
    try:
        assert _jobs(folder) == sorted([alive.name, new.name])
        status, job = post(url, *multipart("mosaic.tif", mosaic), path="/v1/slide")
        assert status == 202, job
        running = [n for n in _jobs(folder) if n not in (alive.name, new.name)]
        assert len(running) == 1 and running[0].startswith(f"{PREFIX}{proc.pid}-")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _jobs(folder) == sorted([alive.name, new.name])
