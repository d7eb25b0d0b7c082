"""The page against hostile data, for real: labels are short plain text when a manifest is read (from a model
directory or a Triton server's parameter), every answer carries the security headers, and, were a hostile label to
get through anyway, the page in headless Chromium shows it as text and runs nothing of it."""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import pytest

from runtime.model.manifest import ModelError, sha256_file
from runtime.model.served import PREFIX, Served
from tests.conftest import run_module
from tests.test_serve import chromium_driver, start_server

pytest.importorskip("fastapi", reason="fastapi not installed (setup.sh installs the serve extra)")

HOSTILE = ("<b id=\"injected\">Benign</b>", "<img src=x onerror=\"document.title='pwned'\">")
# The server with the label check relaxed, standing for a manifest reader that let a hostile label through: what is
# under test here is the page's own defence (text, never HTML; the Content-Security-Policy), on its own.
RELAXED_SERVER = ("import sys\n"
                  "import runtime.model.manifest as m\n"
                  "m.LABEL_PUNCTUATION += '<>=\"/;:\\''\n"
                  "m.MAX_LABEL_CHARS = 200\n"
                  "from runtime.serve import main\n"
                  "sys.exit(main(sys.argv[1:]))\n")


@pytest.fixture(scope="module")
def hostile_dir(model_dir, tmp_path_factory):
    """The model with hostile labels, in its manifest and in its ONNX files' contract (as an export would write
    them: the runtime checks that the two agree), the files' digests updated."""
    onnx = pytest.importorskip("onnx")
    out = tmp_path_factory.mktemp("hostile") / "model"
    shutil.copytree(model_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["contract"]["labels"] = list(HOSTILE)
    for name in list(manifest["files"]):
        if name.endswith(".onnx"):
            model = onnx.load(out / name)
            for prop in model.metadata_props:
                if prop.key == "contract":
                    prop.value = json.dumps(json.loads(prop.value) | {"labels": list(HOSTILE)}, sort_keys=True)
            onnx.save(model, out / name)
            manifest["files"][name] = sha256_file(out / name)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_manifest_with_a_label_that_is_not_plain_text_is_refused(hostile_dir, model_dir):
    proc = run_module("runtime.serve", "--model", str(hostile_dir), "--backend", "cpu", "--port", "9")
    assert proc.returncode != 0 and "is not short plain text" in proc.stderr, proc.stderr
    manifest = (model_dir / "manifest.json").read_text()
    params = {PREFIX + "manifest": manifest, PREFIX + "precision": "fp32", PREFIX + "band": "0.0",
              PREFIX + "file": "model.onnx", PREFIX + "file_sha256": "0" * 64}
    assert Served.from_parameters(params, "http://triton:8000 breakhis").manifest.contract.labels[0]
    for labels in (HOSTILE, ["Benign", "x" * 41], ["Benign", " Malignant"], ["Benign", "Benign"], ["", "M"]):
        d = json.loads(manifest)
        d["contract"]["labels"] = labels
        with pytest.raises(ModelError, match="label"):  # as a Triton server's manifest parameter states it
            Served.from_parameters(params | {PREFIX + "manifest": json.dumps(d)}, "http://triton:8000 breakhis")


def _headers(url: str, **headers: str) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


def test_the_page_shows_a_hostile_label_as_text_and_runs_none_of_it(hostile_dir, images_100x, tmp_path):
    proc, url = start_server(hostile_dir, code=RELAXED_SERVER)
    try:
        for path, want, extra in (("/", 200, {}), ("/static/app.js", 200, {}), ("/v1/model", 200, {}),
                                  ("/nope", 404, {}), ("/healthz", 421, {"Host": "evil.example"})):
            status, headers = _headers(url + path, **extra)
            assert status == want, path
            csp = headers["content-security-policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
            assert headers["x-content-type-options"] == "nosniff"
        page = urllib.request.urlopen(url + "/").read().decode()
        assert "<script>" not in page and '<script src="/static/app.js"></script>' in page
        driver = chromium_driver(tmp_path)
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            driver.get(url + "/")
            WebDriverWait(driver, 30).until(lambda d: "backend" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "file").send_keys(str(images_100x[0]))
            WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "result").is_displayed())
            text = driver.find_element(By.ID, "fields").text
            assert HOSTILE[0] in text or HOSTILE[1] in text  # the label, as the text it is
            assert driver.execute_script("return document.querySelectorAll('#fields img, #injected').length") == 0
            assert driver.title == "BreakHis 100X classifier"  # nothing of it ran
            history = driver.find_element(By.ID, "history").text
            assert "<img" in history or "<b id" in history
            assert driver.execute_script("return document.querySelectorAll('#history img').length") == 0
        finally:
            driver.quit()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
