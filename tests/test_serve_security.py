"""Our server on a network: bearer tokens (401 without or with a wrong one, on every route but /healthz; the page
asks for it in Chromium), HTTPS with a certificate made here, plain HTTP to the TLS port refused, and no network
binding without a token."""
from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest

from runtime.serving import auth
from tests.test_serve import chromium_driver, multipart, start_server

pytest.importorskip("fastapi", reason="fastapi not installed (setup.sh installs the serve extra)")

TOKEN = "lab-bench-3-0123456789abcdef"


def get(url: str, token: str | None = None, context=None, data: bytes | None = None,
        ctype: str = "") -> tuple[int, bytes]:
    headers = ({"Authorization": f"Bearer {token}"} if token else {}) | ({"Content-Type": ctype} if ctype else {})
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# the lab's microscopes\n{TOKEN}\nanother-token-for-bench-4-xyz\n")
    path.chmod(0o644)  # readable by every local user: warned about, not refused (runtime/serving/auth.py says why)
    return path


@pytest.fixture(scope="module")
def secured_proc(model_dir, token_file):
    proc, url = start_server(model_dir, "--token-file", str(token_file))
    yield proc, url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def secured(secured_proc):
    return secured_proc[1]


def test_a_token_file_readable_by_others_is_warned_about(secured_proc, token_file):
    proc, _ = secured_proc
    said = []
    while not said or not said[-1].startswith("serving"):
        said.append(proc.stdout.readline())
    assert f"WARNING: {token_file}: the token file is readable by every local user (mode 644)" in "".join(said)
    assert TOKEN not in "".join(said)


def test_every_route_but_healthz_needs_a_token(secured, images_100x):
    assert get(secured + "/healthz")[0] == 200
    body, ctype = multipart(images_100x[0].name, images_100x[0].read_bytes())
    for path, data in (("/v1/model", None), ("/metrics", None), ("/v1/slide/nope", None), ("/v1/classify", body)):
        for token in (None, "wrong-token-of-the-right-length", TOKEN[:-1]):
            status, answer = get(secured + path, token, data=data, ctype=ctype if data else "")
            assert status == 401, (path, token, status)
            assert "Bearer" in json.loads(answer)["error"]
    status, answer = get(secured + "/v1/model", TOKEN)
    assert status == 200 and json.loads(answer)["contract"]["grid"] == [2, 3]
    assert get(secured + "/v1/model", "another-token-for-bench-4-xyz")[0] == 200  # every token of the file
    status, answer = get(secured + "/v1/classify", TOKEN, data=body, ctype=ctype)
    assert status == 200 and json.loads(answer)["label"] in ("Benign", "Malignant")
    status, page = get(secured + "/")  # the page comes, with 401, and asks for the token
    assert status == 401 and b'id="auth"' in page
    assert get(secured + "/", TOKEN)[0] == 200


def test_page_asks_for_the_token_once_and_classifies(secured, images_100x, tmp_path):
    driver = chromium_driver(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(secured + "/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "auth").is_displayed())
        driver.find_element(By.ID, "auth-token").send_keys("not-the-token-at-all-0000")
        driver.find_element(By.ID, "auth-go").click()
        WebDriverWait(driver, 30).until(lambda d: "refused" in d.find_element(By.ID, "auth-error").text)
        field = driver.find_element(By.ID, "auth-token")
        field.clear()
        field.send_keys(TOKEN)
        driver.find_element(By.ID, "auth-go").click()
        WebDriverWait(driver, 30).until(lambda d: "backend" in d.find_element(By.ID, "model").text)
        assert not driver.find_element(By.ID, "auth").is_displayed()
        driver.find_element(By.ID, "file").send_keys(str(images_100x[0]))
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "verdict").is_displayed())
        assert "p(malignant)" in driver.find_element(By.ID, "verdict").text
        driver.refresh()  # kept for the tab: not asked again
        WebDriverWait(driver, 30).until(lambda d: "backend" in d.find_element(By.ID, "model").text)
        assert not driver.find_element(By.ID, "auth").is_displayed()
    finally:
        driver.quit()


def test_https_with_a_self_signed_certificate(model_dir, token_file, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl (the command) is not installed: the test makes its certificate with it")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    context = ssl.create_default_context(cafile=str(cert))
    proc, url = start_server(model_dir, "--token-file", str(token_file), "--tls-cert", str(cert), "--tls-key",
                             str(key), scheme="https", context=context)
    try:
        status, answer = get(url + "/v1/model", TOKEN, context=context)
        assert status == 200 and json.loads(answer)["name"]
        assert get(url + "/v1/model", None, context=context)[0] == 401
        with pytest.raises(OSError):  # plain HTTP to the TLS port: no answer is given
            urllib.request.urlopen(url.replace("https:", "http:") + "/healthz", timeout=10)
        with pytest.raises(urllib.error.URLError):  # a client that does not trust the certificate stops
            urllib.request.urlopen(url + "/healthz", timeout=10)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_network_binding_needs_a_token(tmp_path, capsys):
    from runtime.apps.serve import main  # each refusal comes before the model is opened

    assert main(["--host", "0.0.0.0", "--port", "9"]) != 0
    err = capsys.readouterr().err
    assert "refusing to bind 0.0.0.0 without authentication" in err and "--token-file" in err
    short = tmp_path / "short"
    short.write_text("abc\n")
    assert main(["--token-file", str(short)]) != 0
    assert f"{short}:1: a token must be at least 16" in capsys.readouterr().err
    bad = tmp_path / "key.pem"
    bad.write_text("not a key")
    bad.chmod(0o644)  # readable by every local user: refused before it is even read
    assert main(["--tls-cert", str(bad), "--tls-key", str(bad)]) != 0
    assert f"{bad}: the private key is readable by every local user (mode 644)" in capsys.readouterr().err
    bad.chmod(0o640)  # owner and group (Debian's ssl-cert convention): read, and refused as no key
    assert main(["--tls-cert", str(bad), "--tls-key", str(bad)]) != 0
    assert "not a usable certificate and private key" in capsys.readouterr().err


def test_tokens_are_compared_whole():
    tokens = (TOKEN.encode(), b"x" * 20)
    assert auth.allows(tokens, TOKEN.encode()) and auth.allows(tokens, b"x" * 20)
    for wrong in (None, b"", TOKEN.encode()[:-1], TOKEN.encode() + b"!", b"x" * 19):
        assert not auth.allows(tokens, wrong)
    assert auth.bearer("Bearer  abc ") == b"abc" and auth.bearer("Basic abc") is None and auth.bearer(None) is None


def test_tokens_of_any_length_are_compared_as_digests():
    assert auth.allows((b"a" * 16, b"b" * 200), b"b" * 200) and not auth.allows((b"a" * 16,), b"a" * 200)
    assert not auth.allows((b"a" * 16,), b"a" * 15 + b"\0")


def test_plain_http_beyond_loopback_with_tokens_is_warned_about():
    warning = auth.plain_http_warning("0.0.0.0", local=False, has_tokens=True, tls=False)
    assert warning is not None and "clear text" in warning and "--tls-cert" in warning
    assert auth.plain_http_warning("0.0.0.0", local=False, has_tokens=True, tls=True) is None
    assert auth.plain_http_warning("127.0.0.1", local=True, has_tokens=True, tls=False) is None


def test_allowed_host_is_enforced_on_wildcard_binds():
    from runtime.serving.guard import allowed_hosts, host_allowed

    for bind in ("0.0.0.0", "::"):
        hosts = allowed_hosts(bind, ["Microscope-3.lab"])
        assert {"microscope-3.lab", "localhost", "127.0.0.1", "::1"} <= hosts
        assert not host_allowed("evil.example", hosts, wildcard=True)  # a rebinding attacker's name
        assert not host_allowed("0.0.0.0", hosts, wildcard=False) and "0.0.0.0" not in hosts
        assert host_allowed("microscope-3.lab", hosts, wildcard=True)
        assert host_allowed("192.168.4.20", hosts, wildcard=True)  # an address dialled directly: no DNS in it
        assert host_allowed("fe80::1", hosts, wildcard=True)
    assert not host_allowed("192.168.4.20", allowed_hosts("127.0.0.1", []), wildcard=False)


def _raw(port: int, head: str) -> tuple[int, bytes]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode("latin-1"))
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


@pytest.mark.parametrize("header", ["Host: [::1", "Host: 127.0.0.1:99999", "Host: 127.0.0.1/x", "Host: a b",
                                    "Host: user@127.0.0.1", "Origin: http://[x", "Origin: http://127.0.0.1:port"])
def test_malformed_host_or_origin_is_400_and_websockets_are_not_served(secured, header):
    port = int(secured.rsplit(":", 1)[1])
    host = "" if header.startswith("Host") else f"Host: 127.0.0.1:{port}\r\n"
    status, answer = _raw(port, f"POST /v1/classify HTTP/1.1\r\n{host}{header}\r\nContent-Length: 0\r\n"
                                "Connection: close\r\n\r\n")
    assert status == 400 and b"malformed Host or Origin header" in answer, answer[:300]
    status, answer = _raw(port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                "Sec-WebSocket-Version: 13\r\n\r\n")
    assert status == 401  # an ordinary request, refused without a token: never switched to a websocket


def test_the_guard_refuses_websockets_and_other_scopes():
    import asyncio

    from runtime.serving.guard import Guard

    reached = []

    async def app(scope, receive, send):  # what a route that accepts websockets would do
        reached.append(scope["type"])
        await send({"type": "websocket.accept"})

    guard = Guard(app, {"127.0.0.1"}, False, "page-token", "", lambda *_: None, (TOKEN.encode(),))
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "headers": [(b"host", b"127.0.0.1")]}
    asyncio.run(guard(scope, receive, send))
    assert reached == [] and sent == [{"type": "websocket.close", "code": 1008}]
    with pytest.raises(RuntimeError, match="unsupported ASGI scope"):
        asyncio.run(guard({"type": "webtransport", "path": "/"}, receive, send))
    assert reached == []


def test_a_refused_upload_is_not_read_to_its_end(secured):
    import socket

    port = int(secured.rsplit(":", 1)[1])
    total, sent = 50 << 20, 0  # the server's upload limit: before, a refusal read up to twice that
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {total}\r\n"
                  "Content-Type: application/octet-stream\r\n\r\n".encode())
        chunk = b"\0" * (64 << 10)
        try:
            while sent < total:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:  # answered and closed (reset), or no longer read (the send waits, then times out)
            pass
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:
            pass
    # what the server read: at most REFUSAL_DRAIN (1 MiB); what was sent beyond it sat in the two sockets' buffers
    # (a few MB on loopback), never the whole upload
    assert sent < 16 << 20, f"{sent / 2**20:.0f} MB of a refused upload were taken"
    assert answer.startswith(b"HTTP/1.1 401") or answer == b"", answer[:100]
