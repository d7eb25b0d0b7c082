"""The Triton client and server, attacked (issue 37, points 1 and 6).

The client (--backend triton) against a hostile server: a KServe v2 HTTP server written here that describes the
model as our servers do and then answers what a rogue or broken server would (outputs of the wrong shape,
probabilities outside [0, 1], an error that echoes the request's headers), over plain HTTP and over TLS with a
certificate from a private CA made in the test with openssl. The real client (tritonclient, geventhttpclient's TLS)
and the real pipeline run against it; only the server is ours, because no real Triton answers (n, 2) on purpose.

The server (python -m runtime.triton_server) against its own operator's mistakes and a service manager's SIGTERM,
on the real PyTriton server (.venv-triton), on 127.0.0.1 and free ports."""
from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import numpy as np
import pytest

from runtime.model.model_dir import ModelDir
from runtime.model.served import Served
from tests.conftest import run_module

pytest.importorskip("tritonclient.http", reason="tritonclient not installed (setup.sh installs the triton extra)")

MODEL = "breakhis_fp32"


class Rogue(ThreadingHTTPServer):
    """KServe v2 over HTTP on 127.0.0.1 (a free port): the model's description from ``model_dir``, as
    runtime.triton_server gives it, then for each inference request of n fields what ``answer(n)`` says: a list of
    outputs (name, shape, values), or an (HTTP status, message) error. ``seen``: the headers of every request."""

    daemon_threads = True

    def __init__(self, model_dir: Path, context: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        model = ModelDir.open(model_dir)
        self.manifest = model.manifest
        variant = model.variant("fp32")
        params = Served(model.manifest, "fp32", 0.0, variant.file, model.manifest.files[variant.file]).parameters()
        self.config = {"name": MODEL, "max_batch_size": 8, "parameters": {k: {"string_value": v}
                                                                            for k, v in params.items()}}
        self.metadata = {"name": MODEL, "versions": ["1"], "platform": "python",
                         "inputs": [{"name": self.manifest.input_name, "datatype": "FP32",
                                     "shape": [-1, *model.contract.field_shape]}],
                         "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, 1]}
                                     for o in self.manifest.output_names]}
        self.answer: Any = self.good
        self.seen: list[dict[str, str]] = []
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)
        self.url = f"{'https' if context else 'http'}://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @staticmethod
    def good(n: int) -> list[tuple[str, list[int], list[float]]]:
        p = np.linspace(0.1, 0.9, n)
        return [("logit", [n, 1], list(np.log(p / (1 - p)))), ("probability", [n, 1], list(p))]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Rogue

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.seen.append(dict(self.headers))
        path = self.path.rstrip("/")
        if path in ("/v2/health/live", f"/v2/models/{MODEL}/ready"):
            self._send(200, {})
        elif path == f"/v2/models/{MODEL}/config":
            self._send(200, self.server.config)
        elif path == f"/v2/models/{MODEL}":
            self._send(200, self.server.metadata)
        else:
            self._send(400, {"error": f"no model at {path}"})

    def do_POST(self) -> None:
        self.server.seen.append(dict(self.headers))
        body = self.rfile.read(int(self.headers["Content-Length"]))
        json_len = int(self.headers.get("Inference-Header-Content-Length") or len(body))
        n = json.loads(body[:json_len])["inputs"][0]["shape"][0]
        answer = self.server.answer(n)
        if isinstance(answer, tuple):
            self._send(answer[0], {"error": answer[1]})
            return
        self._send(200, {"model_name": MODEL, "model_version": "1",
                         "outputs": [{"name": name, "datatype": "FP32", "shape": shape, "data": [float(v) for v in data]}
                                     for name, shape, data in answer]})


def _classify(url: str, images: list[Path], **kw: Any) -> list:
    from runtime.backends.triton import TritonTarget
    from runtime.pipeline.classifier import Classifier

    with Classifier(None, backend="triton", triton=TritonTarget(url, retries=0, **kw), precision="fp32") as clf:
        return clf.classify(images)


def _answer(name: str, shape_of: Any, values_of: Any) -> Any:
    """An answer whose output ``name`` has shape ``shape_of(n)`` and values ``values_of(n)``, the other output good."""
    def answer(n: int) -> list:
        return [(o, shape_of(n), values_of(n)) if o == name else (o, s, v) for o, s, v in Rogue.good(n)]
    return answer


BAD_ANSWERS = {
    "two values per field": (_answer("probability", lambda n: [n, 2], lambda n: [0.5] * 2 * n), "shape (3, 2)"),
    "a short answer": (_answer("probability", lambda n: [n - 1], lambda n: [0.5] * (n - 1)), "shape (2,)"),
    "a long answer": (_answer("logit", lambda n: [n + 1, 1], lambda n: [0.0] * (n + 1)), "shape (4, 1)"),
    "above 1": (_answer("probability", lambda n: [n, 1], lambda n: [0.5] * (n - 1) + [1.5]), "e.g. 1.5"),
    "below 0": (_answer("probability", lambda n: [n], lambda n: [-0.25] + [0.5] * (n - 1)), "e.g. -0.25"),
    "not a number": (_answer("probability", lambda n: [n, 1], lambda n: [float("nan")] * n), "e.g. nan"),
    "no probability": (lambda n: [o for o in Rogue.good(n) if o[0] != "probability"], "no output 'probability'"),
}


@pytest.mark.parametrize("case", BAD_ANSWERS)
def test_an_answer_that_is_not_n_probabilities_is_the_batchs_error(model_dir, images_100x, case):
    answer, said = BAD_ANSWERS[case]
    with Rogue(model_dir) as rogue:
        good = _classify(rogue.url, images_100x[:3])  # the same server answering well: labels (the control)
        assert [r.error for r in good] == [None] * 3 and all(r.label for r in good)
        rogue.answer = answer
        bad = _classify(rogue.url, images_100x[:3])
    assert all(r.label is None and r.error for r in bad), [(r.label, r.error) for r in bad]
    assert all(said in r.error and f"Triton at {rogue.url}, model {MODEL}" in r.error for r in bad), bad[0].error


def test_header_values_and_url_credentials_never_appear(model_dir, images_100x, tmp_path):
    """A server that echoes every request header in its errors; secrets in a header file and in the URL."""
    bearer, key, password = "bearer-secret-0123456789", "key-secret-0123456789", "pass-secret-0123456789"
    headers = tmp_path / "headers"
    headers.write_text(f"# for the gateway\nAuthorization: Bearer {bearer}\n\nX-Api-Key: {key}\n")
    headers.chmod(0o600)
    image = str(images_100x[0])
    with Rogue(model_dir) as rogue:
        rogue.answer = lambda n: (400, "refused: " + json.dumps(rogue.seen[-1]))
        proc = run_module("runtime.classify", "--json", "--no-progress", "--triton-retries", "0", "--triton-url",
                          rogue.url, "--triton-header-file", str(headers), image)
        assert rogue.seen and rogue.seen[-1]["Authorization"] == f"Bearer {bearer}"
        assert rogue.seen[-1]["X-Api-Key"] == key
        out = json.loads(proc.stdout)
        assert "refused: " in out[0]["error"] and "***" in out[0]["error"], out[0]["error"]
        assert bearer not in proc.stdout + proc.stderr and key not in proc.stdout + proc.stderr

        rogue.seen.clear()  # credentials in the URL: sent as Basic authentication, named nowhere
        rogue.answer = Rogue.good
        with_password = rogue.url.replace("http://", f"http://lab-user:{password}@")
        proc = run_module("runtime.classify", "--json", "--no-progress", "--triton-url", with_password, image)
        out = json.loads(proc.stdout)
        assert out[0]["label"] and out[0]["model"]["backend"].endswith(f"at {rogue.url})"), out[0]
        assert password not in proc.stdout + proc.stderr
        sent = base64.b64decode(rogue.seen[-1]["Authorization"].removeprefix("Basic "))
        assert sent == f"lab-user:{password}".encode()

        rogue.answer = lambda n: (400, "refused: " + json.dumps(rogue.seen[-1]))
        proc = run_module("runtime.classify", "--json", "--no-progress", "--triton-retries", "0", "--triton-url",
                          with_password, image)
        assert "refused: " in json.loads(proc.stdout)[0]["error"] and password not in proc.stdout + proc.stderr
        assert base64.b64encode(f"lab-user:{password}".encode()).decode() not in proc.stdout + proc.stderr


def test_header_options_name_the_header_never_its_value(tmp_path, capsys):
    from runtime.apps.classify import main

    secret = "secret-value-0123456789"
    bad_file = tmp_path / "headers"
    bad_file.write_text(f"X-Ok: fine\nAuthorization Bearer {secret}\n")
    for args, said in ((["--triton-header", f"Authorization: Bearer {secret}"], "--triton-header number 1 is not"),
                       (["--triton-header", "X-Ok=1", "--triton-header", f"X-Key={secret}\r\nX-Evil=1"],
                        "header X-Key: its value is empty or holds a line break"),
                       (["--triton-header", f"Bad Name={secret}"], "'Bad Name': not a valid header name"),
                       (["--triton-header-file", str(bad_file)], f"{bad_file}:2: not a 'Name: value' line"),
                       (["--triton-header-file", str(tmp_path / "none")], "cannot read the header file")):
        with pytest.raises(SystemExit) as e:
            main(["--triton-url", "http://127.0.0.1:9", *args, "x.png"])
        assert said in str(e.value) and secret not in str(e.value), str(e.value)
    readable = tmp_path / "readable"
    readable.write_text(f"X-Key: {secret}\n")
    readable.chmod(0o644)
    assert main(["--triton-url", "http://127.0.0.1:9", "--triton-header-file", str(readable), "x.png"]) != 0
    err = capsys.readouterr().err
    assert f"WARNING: {readable}: the header file is readable by every local user (mode 644)" in err
    assert secret not in err


def _private_ca(tmp: Path) -> tuple[Path, ssl.SSLContext]:
    """(the CA's certificate, a server context with a certificate for 127.0.0.1 that CA signed), made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no private CA to test --triton-ca with")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=breakhis test CA")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "san.ext")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp / "server.pem", tmp / "server.key")
    return tmp / "ca.pem", context


def test_a_private_ca_is_trusted_only_when_given(model_dir, images_100x, tmp_path):
    from runtime.backends.triton import TritonUnavailable

    ca, context = _private_ca(tmp_path)
    with Rogue(model_dir, context) as rogue:
        with pytest.raises(TritonUnavailable, match="CERTIFICATE_VERIFY_FAILED"):  # the system's CAs: refused
            _classify(rogue.url, images_100x[:1])
        got = _classify(rogue.url, images_100x[:1], ca=str(ca))
        assert got[0].error is None and got[0].label and rogue.url.startswith("https://")
        (tmp_path / "other").mkdir()
        other_ca, _ = _private_ca(tmp_path / "other")
        with pytest.raises(TritonUnavailable, match="CERTIFICATE_VERIFY_FAILED"):  # another CA: refused
            _classify(rogue.url, images_100x[:1], ca=str(other_ca))
    with pytest.raises(TritonUnavailable, match="--triton-ca is for https:// and grpcs://"):
        _classify("http://127.0.0.1:9", images_100x[:1], ca=str(ca))


# --- python -m runtime.triton_server -------------------------------------------------------------------------------

def _refused(monkeypatch, capsys, tmp_path, *args: str) -> tuple[int, str]:
    """main(args) in this process, where PyTriton is not installed: a refusal comes before any start; what passes
    the checks reaches 'PyTriton is not installed here' (nothing can start)."""
    from runtime.apps import triton_server

    monkeypatch.setattr(triton_server, "TRITON_VENV", tmp_path / "no-venv")
    code = triton_server.main(list(args))
    return code, capsys.readouterr().err


def _token_file(tmp_path: Path, text: str, name: str = "token") -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def test_the_server_refuses_unusable_tokens_with_the_token_files_rules(monkeypatch, capsys, tmp_path):
    secret = "a-secret-that-is-long-enough-0123"
    for text, said in (("", "no token in the file"), ("  \n\t\n", "no token in the file"),
                       ("abc\n", "a token must be at least 16 printable characters"),
                       ("two words long enough here\n", "without spaces"),
                       (f"{secret}\n{secret}-2\n", "2 tokens: Triton takes one")):
        code, err = _refused(monkeypatch, capsys, tmp_path, "--access-token-file", _token_file(tmp_path, text))
        assert code == 2 and said in err and "Traceback" not in err, err
        assert secret not in err and "PyTriton is not installed" not in err  # refused before anything starts
    code, err = _refused(monkeypatch, capsys, tmp_path, "--access-token-file", _token_file(tmp_path, secret + "\n"))
    assert code == 2 and "PyTriton is not installed here" in err and secret not in err  # a good token passes


def test_the_server_binds_beyond_loopback_only_locked(monkeypatch, capsys, tmp_path):
    token = _token_file(tmp_path, "a-secret-that-is-long-enough-0123\n")
    for args in (["--host", "0.0.0.0"], ["--host", "192.0.2.7", "--restrict-inference"],
                 ["--host", "::", "--access-token-file", token]):
        code, err = _refused(monkeypatch, capsys, tmp_path, *args)
        assert code == 2 and f"refusing to bind {args[1]} without authentication" in err, (args, err)
        assert "--restrict-inference with --access-token-file" in err and "--insecure-no-auth" in err
    for args, open_, clear in ((["--host", "0.0.0.0", "--restrict-inference", "--access-token-file", token], 0, 1),
                               (["--host", "0.0.0.0", "--insecure-no-auth"], 1, 0), (["--host", "127.0.0.2"], 0, 0),
                               (["--host", "::1", "--access-token-file", token], 0, 0), (["--host", "localhost"], 0, 0)):
        code, err = _refused(monkeypatch, capsys, tmp_path, *args)
        assert "PyTriton is not installed here" in err and "refusing" not in err, (args, err)
        assert ("WARNING: binding to 0.0.0.0 with --insecure-no-auth" in err) == open_, (args, err)
        assert ("the access token crosses the network in clear text" in err) == clear, (args, err)


_ORPHAN = """
import subprocess, sys, time
from runtime.triton.server import adopt_orphans, end_descendants
adopt_orphans()
orphan = int(subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                            check=True).stdout)  # its parent, sh, has ended: an orphan, as a stub is after Triton
print(orphan, flush=True)
end_descendants(0.5)
print("returned", flush=True)
"""


def test_a_process_orphaned_by_its_parent_is_still_ended_by_the_server():
    """What the Triton server does at its stop (runtime/triton/server.py): a process it started whose own parent has
    ended (a python-backend stub after tritonserver) is re-parented to it and ended with the rest."""
    import os
    import sys

    proc = subprocess.run([sys.executable, "-c", _ORPHAN], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.split()[1:] == ["returned"], proc.stdout + proc.stderr
    orphan = int(proc.stdout.split()[0])
    try:
        stat = Path(f"/proc/{orphan}/stat").read_text()
        running = stat[stat.rindex(")") + 2] != "Z" and "sleep" in stat
    except OSError:
        running = False
    if running:
        os.kill(orphan, 9)
    assert not running, f"pid {orphan} (sleep 60) outlived the process that started it"


def test_sigterm_to_the_process_group_leaves_nothing_and_stale_runs_are_removed(model_dir, tmp_path):
    """Stopped as systemd (KillMode=control-group) and `timeout` stop a service: SIGTERM to every process of its
    group at once. Started without --access-token-file (the random token: in a 0600 file, never printed), with
    PyTriton's home holding what a killed run left and what is not ours to remove."""
    import os
    import re
    import signal
    import sys

    import tritonclient.http as client

    from tests.test_triton import REPO, _ports, _pytriton_missing, group, model_folders

    if _pytriton_missing():
        pytest.skip(_pytriton_missing())
    home = Path(tempfile.mkdtemp(prefix="bh-", dir="/tmp"))  # short: PyTriton's sockets live below it (108 bytes)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    stale, alive, unmarked = home / "breakhis-triton-killed", home / "breakhis-triton-alive", home / "breakhis-triton-x"
    stale_model = tmp_path / "folderAb12Cd"  # a model folder as Triton names them, recorded by the killed run
    stale_shm = Path(f"/dev/shm/pytrtion{dead.pid}-0123abcd-test")
    for folder in (stale / "pytriton", alive, unmarked, stale_model / "1"):
        folder.mkdir(parents=True)
    (stale / "breakhis-triton.json").write_text(json.dumps({"pid": dead.pid, "shm_prefix": f"pytrtion{dead.pid}-0123abcd",
                                                            "folders": [str(stale_model)]}))
    (alive / "breakhis-triton.json").write_text(json.dumps({"pid": os.getpid(), "shm_prefix": "", "folders": []}))
    stale_shm.write_bytes(b"left by a killed run")
    http, grpc, metrics = _ports(3)
    log = tmp_path / "server.log"
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.triton_server", "--model", str(model_dir), "--backend", "cpu",
                 "--precision", "fp32", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
                 str(metrics), "--exit-timeout", "2"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTRITON_HOME": str(home)}, start_new_session=True)
        try:
            said = None
            for _ in range(240):
                said = re.search(r"access token: a random one in (\S+) .*; workspace (\S+)", log.read_text())
                if said or proc.poll() is not None:
                    break
                threading.Event().wait(0.25)
            assert said, log.read_text()[-3000:]
            token_file, workspace = Path(said[1]), Path(said[2])
            token = token_file.read_text().strip()
            assert token_file.stat().st_mode & 0o777 == 0o600 and len(token) >= 32 and token not in log.read_text()
            triton = client.InferenceServerClient(f"127.0.0.1:{http}")
            assert triton.get_inference_statistics(headers={"triton-access-token": token})  # the token in use
            with pytest.raises(Exception, match="triton-access-token"):
                triton.get_inference_statistics()
            running, folders = group(proc.pid), model_folders(proc.pid)
            shm = [n for n in os.listdir("/dev/shm") if n.startswith(f"pytrtion{proc.pid}-")]
            assert len(running) >= 3 and folders and shm and workspace.is_dir()  # Triton, its stub, PyTriton's
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
            survivors = [f"pid {p}" for p in group(proc.pid)]  # counted before this test's own cleanup ends them
        finally:
            if proc.poll() is None or group(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        left = survivors + [
            str(p) for p in [workspace, token_file, *folders, *(Path("/dev/shm") / n for n in shm)] if p.exists()]
        assert left == [], (left, log.read_text()[-3000:])
        assert not stale.exists() and not stale_model.exists() and not stale_shm.exists()  # the killed run's
        assert alive.exists() and unmarked.exists()  # a running process's, and one without a marker: not touched
        text = log.read_text()
        assert f"note: removed what killed runs left: {stale_shm}, {stale_model}, {stale}" in text
        assert "Traceback" not in text and token not in text
    finally:
        stale_shm.unlink(missing_ok=True)
        shutil.rmtree(home, ignore_errors=True)
