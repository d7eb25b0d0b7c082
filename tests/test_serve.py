"""The HTTP server for real, on a random free localhost port: API, bad uploads, concurrency, and the page in
headless Chromium."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from tests.conftest import REPO, run_module
from tests.test_imageio import _png_bomb

pytest.importorskip("fastapi", reason="fastapi not installed (setup.sh installs the serve extra)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *extra: str, scheme: str = "http", context=None, backend: str = "cpu",
                 code: str | None = None, **popen) -> tuple[subprocess.Popen, str]:
    """``python -m runtime.serve`` (or ``python -c code``) on a free loopback port, once /healthz answers (over
    ``context`` for HTTPS); ``popen``: Popen's arguments (env, preexec_fn)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, *(("-c", code) if code else ("-m", "runtime.serve")), "--model",
                             str(model_dir), "--port", str(port), "--backend", backend, *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    url = f"{scheme}://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1, context=context)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read()}")
            time.sleep(0.25)
    proc.kill()
    pytest.fail("server did not answer /healthz in 30 s")


@pytest.fixture(scope="module")
def server(model_dir):
    proc, url = start_server(model_dir, "--max-upload-mb", "2")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def post(url, data: bytes, ctype="application/octet-stream", path="/v1/classify"):
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    b = "----breakhis-test-boundary"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def test_model_and_health(server):
    m = json.loads(urllib.request.urlopen(server + "/v1/model").read())
    assert m["trained"] is False and m["contract"]["grid"] == [2, 3] and m["backend"] == "onnxruntime-cpu-fp32"
    assert "UNTRAINED" in m["warning"]


def test_classify_matches_the_cli(server, model_dir, images_100x):
    img = images_100x[3]
    cli = json.loads(run_module("runtime.classify", "--no-progress", "--json", "--model", str(model_dir),
                                "--backend", "cpu", str(img)).stdout)[0]
    status, raw = post(server, img.read_bytes())
    body, ctype = multipart(img.name, img.read_bytes())
    status2, form = post(server, body, ctype)
    assert status == status2 == 200
    for out in (raw, form):
        assert out["probability"] == cli["probability"] and out["label"] == cli["label"]
        assert set(out) >= {"path", "label", "probability", "fields", "timings_ms", "model", "error"}
    assert form["path"] == img.name


@pytest.mark.parametrize("kind,status,reason", [
    ("empty", 400, "empty file"), ("text", 422, "not a PNG, JPEG, TIFF or BMP"),
    ("truncated", 422, "truncated or corrupt"), ("small", 422, "at least 672x448"),
    ("huge", 413, "above the limit"), ("too_big", 413, "above the limit of 2,097,152"),
    ("no_file_field", 400, "no file field"),
])
def test_bad_uploads_get_4xx_with_reason(server, images_100x, kind, status, reason):
    good = images_100x[0].read_bytes()
    _, png = cv2.imencode(".png", np.zeros((300, 400, 3), np.uint8))
    data = {"empty": b"", "text": b"hello", "truncated": good[:4000], "small": png.tobytes(),
            "huge": _png_bomb(100_000, 100_000), "too_big": b"\x00" * (3 << 20), "no_file_field": b""}[kind]
    if kind == "no_file_field":
        b = "----x"
        got = post(server, f"--{b}\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nv\r\n--{b}--\r\n".encode(),
                   f"multipart/form-data; boundary={b}")
    else:
        got = post(server, data)
    assert got[0] == status and reason in got[1]["error"], got


def test_conversions_reported(server, images_100x):
    img = cv2.imread(str(images_100x[0]))
    _, gray = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    status, out = post(server, gray.tobytes())
    assert status == 200 and out["conversions"] == ["grayscale -> BGR (channel replicated)"]


def test_concurrent_clients_get_the_cli_answers(server, images_100x):
    """8 clients x 4 requests at once: no errors, every answer identical to a sequential request."""
    imgs = images_100x[:4]
    want = {p.name: post(server, p.read_bytes())[1]["probability"] for p in imgs}
    got, errors = [], []

    def client():
        for p in imgs:
            status, out = post(server, p.read_bytes())
            (got if status == 200 else errors).append((p.name, out.get("probability"), status))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(got) == 32
    assert all(prob == want[name] for name, prob, _ in got)
    metrics = json.loads(urllib.request.urlopen(server + "/metrics").read())
    assert metrics["requests"]["200"] >= 32 and metrics["latency_ms"]["p50"] > 0


def test_views_for_the_page(server, images_100x):
    status, out = post(server, images_100x[0].read_bytes(), path="/v1/classify?views=1")
    assert status == 200 and len(out["views"]["patches"]) == 6 and len(out["views"]["preprocessed"]) == 6
    assert all(v.startswith("data:image/jpeg;base64,") for v in out["views"]["patches"])


def chromium_driver(tmp_path):
    """Headless Debian Chromium driven by Selenium; skips with the reason where it is not installed."""
    browser, driver = "/usr/bin/chromium", "/usr/bin/chromedriver"
    if not (os.path.exists(browser) and os.path.exists(driver)):
        pytest.skip("Chromium/ChromeDriver not installed (.ci/run installs Debian's chromium and chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,1800"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))


@pytest.fixture(scope="module")
def small_mosaic(images_100x, tmp_path_factory):
    from benchmarks.synthetic_slide import write_mosaic

    path = tmp_path_factory.mktemp("slide") / "mosaic.tif"
    write_mosaic(path, [[images_100x[3], None], [None, images_100x[44]]], levels=2)
    return path


def test_slide_api_runs_a_job_with_progress_and_every_output(server, small_mosaic):
    import base64

    body, ctype = multipart(small_mosaic.name, small_mosaic.read_bytes())
    status, job = post(server, body, ctype, path="/v1/slide?aggregate=mean")
    assert status == 202, job
    for _ in range(240):
        with urllib.request.urlopen(server + job["status"], timeout=30) as r:
            state = json.loads(r.read())
        assert state["done"] <= max(state["total"], 2)
        if state["state"] != "running":
            break
        time.sleep(0.25)
    assert state["state"] == "done", state
    out = state["result"]
    assert out["path"] == "mosaic.tif" and out["counts"]["classified"] == 2 and out["counts"]["background"] == 2
    assert out["aggregate"]["rule"] == "mean" and out["aggregate"]["label"] in ("Benign", "Malignant")
    assert len(out["geojson"]["features"]) == 2 and out["csv"].startswith("row,col,minx,miny")
    png = base64.b64decode(out["overlay_png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # an unknown rule is refused before the upload is read: a small body, so that the client is not still sending a
    # large one when the 400 comes (it would see a broken pipe, not the answer)
    small, small_type = multipart(small_mosaic.name, small_mosaic.read_bytes()[:1024])
    status, err = post(server, small, small_type, path="/v1/slide?aggregate=median")
    assert status == 400 and "aggregate" in json.dumps(err), err
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server + "/v1/slide/unknown", timeout=10)
    assert e.value.code == 404


def test_page_in_headless_chromium(server, images_100x, small_mosaic, tmp_path):
    driver = chromium_driver(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(server + "/")
        WebDriverWait(driver, 30).until(lambda d: "backend" in d.find_element(By.ID, "model").text)
        assert "UNTRAINED" in driver.find_element(By.ID, "warning").text
        driver.find_element(By.ID, "file").send_keys(f"{images_100x[1]}\n{images_100x[0]}")  # several at once
        WebDriverWait(driver, 240).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history tr")) == 3)
        history = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#history tr")[1:]]
        assert images_100x[1].name in history[0] and images_100x[0].name in history[1]
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "verdict").is_displayed())
        assert driver.find_element(By.ID, "download").is_displayed() and driver.find_element(By.ID, "print")
        verdict = driver.find_element(By.ID, "verdict").text
        assert ("Malignant" in verdict or "Benign" in verdict) and "p(malignant)" in verdict
        for row in ("patches", "preprocessed"):
            WebDriverWait(driver, 30).until(lambda d, row=row: d.execute_script(
                f"return [...document.querySelectorAll('#{row} img')].filter(i => i.naturalWidth > 0).length") == 6)
        assert driver.execute_script("return document.getElementById('canvas').width") == 700
        assert not driver.find_element(By.ID, "qc").is_displayed()  # sharp real fields: no quality banner
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        blurred = tmp_path / "out-of-focus.png"  # the quality check: the verdict stands, with what to do above it
        cv2.imwrite(str(blurred), cv2.GaussianBlur(cv2.imread(str(images_100x[2])), (0, 0), 3.0))
        driver.find_element(By.ID, "file").send_keys(str(blurred))
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "qc").is_displayed())
        assert driver.find_element(By.ID, "qc").text == "Quality check: out of focus: re-focus and capture again"
        WebDriverWait(driver, 30).until(lambda d: "out-of-focus.png" in d.find_element(By.ID, "status").text)
        assert driver.find_element(By.ID, "verdict").is_displayed()
        assert "out of focus" in driver.find_element(By.ID, "fields").text
        qc_shot = tmp_path / "page-qc.png"
        driver.save_screenshot(str(qc_shot))
        driver.find_element(By.ID, "slide-mode").click()  # a slide: progress, overlay, downloads
        driver.find_element(By.ID, "file").send_keys(str(small_mosaic))
        WebDriverWait(driver, 240).until(lambda d: d.execute_script(
            "const o = document.getElementById('overlay'); return !o.hidden && o.naturalWidth > 0"))
        assert "2 classified, 2 background" in driver.find_element(By.ID, "slide-summary").text
        assert driver.find_element(By.ID, "dl-geojson").is_displayed()
        slide_shot = tmp_path / "page-slide.png"
        driver.save_screenshot(str(slide_shot))
        rows = driver.find_elements(By.CSS_SELECTOR, "#history tr")
        assert len(rows) == 5 and "mosaic.tif" in rows[-1].text
        rows[1].find_element(By.TAG_NAME, "button").click()  # an image again: its own view, not the slide's
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "result").is_displayed())
        assert not driver.find_element(By.ID, "slide-result").is_displayed()
        assert not driver.find_element(By.ID, "qc").is_displayed()
        rows[-1].find_element(By.TAG_NAME, "button").click()  # and the slide again
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "overlay").is_displayed())
        assert not driver.find_element(By.ID, "result").is_displayed()
        if os.environ.get("BREAKHIS_SCREENSHOT_DIR"):
            for kept in (shot, qc_shot, slide_shot):
                shutil.copy(kept, os.environ["BREAKHIS_SCREENSHOT_DIR"])
    finally:
        driver.quit()


def test_every_output_carries_the_classifiers_warnings(server, model_dir, shared_data, tmp_path):
    """A BreakHis 400X image: the magnification warning the classifier adds reaches the CLI, the API (and so the
    page, which shows the API's warnings) and the watch folder's record alike."""
    img = next(p for p in sorted((shared_data / "breakhis-other").glob("*.png")) if "-400-" in p.name)
    cli = json.loads(run_module("runtime.classify", "--no-progress", "--json", "--model", str(model_dir),
                                "--backend", "cpu", str(img)).stdout)[0]
    assert any("says 400X" in w for w in cli["warnings"]), cli["warnings"]
    body, ctype = multipart(img.name, img.read_bytes())
    status, api = post(server, body, ctype)
    assert status == 200 and api["warnings"] == cli["warnings"]
    inbox, out = tmp_path / "inbox", tmp_path / "out.jsonl"
    inbox.mkdir()
    shutil.copy(img, inbox / img.name)
    proc = run_module("runtime.watch", str(inbox), "--out", str(out), "--model", str(model_dir), "--backend", "cpu",
                      "--interval", "0.1", "--settle", "0.3", "--exit-when-idle", "1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["warnings"] == cli["warnings"]


def _slide_job(server, name, data, timeout=120):
    body, ctype = multipart(name, data)
    status, job = post(server, body, ctype, path="/v1/slide")
    assert status == 202, job
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with urllib.request.urlopen(server + job["status"], timeout=30) as r:
            state = json.loads(r.read())
        if state["state"] != "running":
            return state
        time.sleep(0.1)
    pytest.fail(f"slide job still running after {timeout} s: {state}")


def test_hostile_slide_uploads_end_in_a_clear_state(server, small_mosaic, tmp_path):
    import tifffile

    claim = tmp_path / "claim.tif"  # about 100 KB claiming 250,000 x 200,000 pixels (50 billion)
    with tifffile.TiffWriter(claim, bigtiff=True) as tw:
        tw.write(iter([np.full((4096, 4096, 3), 242, np.uint8)] + [None] * (62 * 49 - 1)), shape=(200_000, 250_000, 3),
                 dtype=np.uint8, tile=(4096, 4096), photometric="rgb", compression="zlib")
    assert claim.stat().st_size < 1e6
    state = _slide_job(server, "claim.tif", claim.read_bytes())
    assert state["state"] == "error" and "above the limit" in state["error"] and "claim.tif" in state["error"]
    state = _slide_job(server, "cut.svs", small_mosaic.read_bytes()[:20_000])
    assert state["state"] == "error" and "cut.svs" in state["error"] and "internal error" not in state["error"]
    state = _slide_job(server, "sl\U0001f52cide \u00e9.tif", small_mosaic.read_bytes())  # odd characters in the name
    assert state["state"] == "done" and state["result"]["path"] == "sl\U0001f52cide \u00e9.tif"
    req = urllib.request.Request(server + "/v1/slide/nope", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 404


def test_the_server_opens_its_rechecks_reference_at_start(model_dir):
    """A long-running service: at a tier that re-checks borderline fields (FP16 here), the app opens the FP32
    reference of the re-checks when it is made, before any request, instead of on the first borderline image."""
    from runtime.apps.serve import create_app
    from runtime.pipeline.classifier import Classifier

    clf = Classifier(model_dir, backend="cpu", precision="fp16")
    try:
        assert clf.recheck is not None and clf.recheck.reference is None  # a classifier alone opens it on first need
        app = create_app(clf)
        assert clf.recheck.reference is not None and clf.recheck.fields == 0
        app.state.service.batcher.stop()
    finally:
        clf.close()
