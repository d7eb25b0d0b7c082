"""The server under hostile or heavy use, for real on a free localhost port: chunked uploads beyond the limit,
images beyond the per-request limits, a full queue, clients that leave, small requests behind large ones, foreign
Host headers and cross-origin POSTs, graceful SIGTERM, and formats a browser cannot show."""
from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import cv2
import numpy as np
import psutil
import pytest

from tests.conftest import REPO
from tests.test_serve import _free_port, post

pytest.importorskip("fastapi", reason="fastapi not installed (setup.sh installs the serve extra)")


# The real server, whose inference takes a stated time per field (the model's arithmetic replaced by a wait after
# it, as the full model on a slow CPU would take): these tests are about queueing, refusals and fairness, which need
# work to be waiting, on any machine. The order of events is what they check, never how long anything took.
SLOW_SERVER = ("import sys, time\n"
               "from runtime.backends import ort\n"
               "run = ort.OrtBackend.run\n"
               "ort.OrtBackend.run = lambda self, fields: (time.sleep(SECONDS * len(fields)), run(self, fields))[1]\n"
               "from runtime.serve import main\n"
               "sys.exit(main(sys.argv[1:]))\n")


def start(model_dir, *extra, seconds_per_field=0.4):
    port = _free_port()
    code = SLOW_SERVER.replace("SECONDS", repr(seconds_per_field))
    proc = subprocess.Popen([sys.executable, "-c", code, "--model", str(model_dir), "--port", str(port),
                             "--backend", "cpu", "--max-upload-mb", "2", *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            return proc, url, port
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read()}")
            time.sleep(0.25)
    pytest.fail("server did not start")


@pytest.fixture(scope="module")
def limited(model_dir):
    """Small limits so that the tests stay short: 4 fields per request, 6 fields waiting in all."""
    proc, url, port = start(model_dir, "--max-fields", "4", "--max-pending", "6")
    yield url, port, proc
    proc.terminate()
    proc.wait(timeout=30)


def _png(img):
    return cv2.imencode(".png", img)[1].tobytes()


@pytest.fixture(scope="module")
def images(images_100x):
    one = cv2.imread(str(images_100x[0]))
    four = cv2.resize(one, (1344, 896))  # 2x2 fields
    six = cv2.resize(one, (2016, 896))  # 2x3 fields
    return {"one": _png(one), "four": _png(four), "six": _png(six)}


def _metrics(url):
    return json.loads(urllib.request.urlopen(url + "/metrics").read())


def test_chunked_upload_beyond_the_limit_is_refused_while_streaming(limited):
    _, port, proc = limited
    rss0 = psutil.Process(proc.pid).memory_info().rss
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", "/v1/classify")
    conn.putheader("Transfer-Encoding", "chunked")  # no Content-Length to check up front
    conn.endheaders()
    chunk, sent = b"\0" * (1 << 20), 0
    try:
        for _ in range(300):  # 300 MB, as an attacker would
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += 1
        conn.send(b"0\r\n\r\n")
        status = conn.getresponse().status
    except (BrokenPipeError, ConnectionResetError):
        status = None  # the server answered and closed while we were still sending
    finally:
        conn.close()
    assert status in (413, None)
    grown = (psutil.Process(proc.pid).memory_info().rss - rss0) / 2**20
    assert grown < 100, f"server grew by {grown:.0f} MB for a refused upload"


def test_images_beyond_the_request_limits_get_413(limited, images):
    url, _, _ = limited
    status, out = post(url, images["six"])
    assert status == 413 and "6 fields is above this server's limit of 4" in out["error"]


def test_full_queue_gets_503_with_retry_after_and_a_small_request_is_not_starved(limited, images):
    url, _, _ = limited
    done: dict[str, float] = {}
    codes: dict[str, int] = {}

    def send(key, data):
        codes[key] = post(url, data)[0]
        done[key] = time.monotonic()

    first = threading.Thread(target=send, args=("big1", images["four"]))
    first.start()
    time.sleep(0.5)
    req = urllib.request.Request(url + "/v1/classify", data=images["four"], method="POST")
    try:
        urllib.request.urlopen(req, timeout=60)
        pytest.fail("a second 4-field image fitted into a 6-field queue")
    except urllib.error.HTTPError as e:
        assert e.code == 503 and int(e.headers["Retry-After"]) > 0
    small = threading.Thread(target=send, args=("small", images["one"]))
    small.start()
    first.join()
    small.join()
    assert codes == {"big1": 200, "small": 200}


def test_work_of_a_client_that_left_is_dropped_and_not_an_error(limited, images):
    url, port, _ = limited
    before = _metrics(url)
    busy = threading.Thread(target=post, args=(url, images["four"]))
    busy.start()
    time.sleep(0.5)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/classify", body=images["one"])
    time.sleep(0.5)
    conn.close()  # leaves while its image waits behind the busy one
    busy.join()
    deadline = time.monotonic() + 30
    while _metrics(url)["queue"]["dropped"] <= before["queue"]["dropped"] and time.monotonic() < deadline:
        time.sleep(0.2)
    after = _metrics(url)
    assert after["queue"]["dropped"] > before["queue"]["dropped"]
    assert after["requests"].get("500", 0) == before["requests"].get("500", 0)
    assert after["requests"].get("499", 0) > before["requests"].get("499", 0)


def test_foreign_host_and_cross_origin_posts_are_refused(limited, images):
    url, _, _ = limited
    for host in ("evil.example", "evil.example:80", "127.0.0.2"):
        req = urllib.request.Request(url + "/v1/model", headers={"Host": host})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 421
    page = urllib.request.urlopen(url + "/").read().decode()
    token = page.split('<meta name="breakhis-page-token" content="')[1].split('"')[0]
    assert len(token) > 10
    for origin, tok in (("http://evil.example", token), (url, "wrong"), (url, None)):
        headers = {"Origin": origin, **({"X-Breakhis-Token": tok} if tok else {})}
        req = urllib.request.Request(url + "/v1/classify", data=images["one"], headers=headers, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 403
    req = urllib.request.Request(url + "/v1/classify", data=images["one"], method="POST",
                                 headers={"Origin": url, "X-Breakhis-Token": token})
    assert urllib.request.urlopen(req, timeout=60).status == 200  # the page itself


def test_tiff_upload_comes_back_displayable(limited, images_100x):
    from PIL import Image

    url, _, _ = limited
    import io

    buf = io.BytesIO()
    Image.open(images_100x[0]).convert("RGB").save(buf, "TIFF")
    status, out = post(url, buf.getvalue(), path="/v1/classify?views=1")
    assert status == 200 and out["views"]["scale"] == 1.0
    shown = cv2.imdecode(np.frombuffer(__import__("base64").b64decode(out["views"]["image"].split(",")[1]), np.uint8),
                         cv2.IMREAD_COLOR)
    assert shown.shape == (460, 700, 3)  # browsers cannot show TIFF: the page shows this JPEG of what was classified


def test_sigterm_while_classifying_exits_cleanly(model_dir, images):
    proc, url, _ = start(model_dir)
    answer = {}
    t = threading.Thread(target=lambda: answer.setdefault("r", post(url, images["four"])))
    t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    t.join(timeout=60)
    assert rc == 0, proc.stdout.read()
    assert time.monotonic() - t0 < 60
    assert answer["r"][0] == 200  # the request in progress was finished, not cut off


def test_a_small_request_overtakes_a_large_one_that_waits(model_dir, images):
    """Fairness: with a large image in progress and another large one waiting, a small request that arrives
    last is answered before the waiting large one (the worker takes waiting images smallest first)."""
    proc, url, _ = start(model_dir, "--max-fields", "4", "--max-pending", "12")
    done: list[str] = []
    try:
        def send(key, data):
            assert post(url, data)[0] == 200
            done.append(key)

        threads = []
        for key, data, pause in (("big1", images["four"], 0.5), ("big2", images["four"], 0.3),
                                 ("small", images["one"], 0.0)):
            threads.append(threading.Thread(target=send, args=(key, data)))
            threads[-1].start()
            time.sleep(pause)
        for t in threads:
            t.join()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert done == ["big1", "small", "big2"]


@pytest.fixture(scope="module")
def strict(model_dir):
    """Short time limits and few connections, so that slow clients are seen to be cut off."""
    proc, url, port = start(model_dir, "--header-timeout", "5", "--body-timeout", "5", "--max-connections", "4",
                            seconds_per_field=0.0)
    yield url, port
    proc.terminate()
    proc.wait(timeout=30)


def test_a_client_that_sends_its_headers_slowly_is_cut_off(strict):
    import socket

    _, port = strict
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed, end = False, time.monotonic() + 60  # the limit is 5 s; 60 only stops a test that would hang
        while not closed and time.monotonic() < end:
            try:
                s.sendall(b"X-Slow: 1\r\n")  # one header line every half second, for ever
                closed = s.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
        assert closed, "a connection whose headers never end was kept open"


def test_an_upload_that_stalls_gets_408(strict):
    _, port = strict
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest("POST", "/v1/classify")
        conn.putheader("Content-Length", "100000")
        conn.endheaders()
        conn.send(b"\0" * 1000)  # and nothing more
        answer = conn.getresponse()
        assert answer.status == 408 and "stalled" in json.loads(answer.read())["error"]
    finally:
        conn.close()


def test_connections_beyond_the_limit_get_503(strict):
    import socket

    url, port = strict
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/healthz", timeout=30)
        assert e.value.code == 503
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server sees them gone
        try:
            assert urllib.request.urlopen(url + "/healthz", timeout=30).status == 200
            break
        except urllib.error.HTTPError:
            time.sleep(0.2)
    else:
        pytest.fail("still 503 after the idle connections closed")
