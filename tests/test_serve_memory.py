"""The server's memory under many maximal uploads at once, for real on a free localhost port: at most --max-uploads
uploads are held, so the growth stays within the bound docs/user-guide.md states, whatever the number of clients.

Each upload is maximal: --max-upload-mb bytes of a PNG of noise (it does not compress) with as many pixels as fit,
within --max-pixels, so that the server holds the upload and decodes the whole image before it refuses it (413: more
fields than the one a request may ask for here). The bound (written before the test was run): per upload held, the body as it
streams in (1x the limit), the joined bytes (1x) and the decoded image (3 bytes a pixel, about 1x), so 3x the limit;
with --max-uploads N the growth above the idle server is at most N x 3 x limit, plus the same again for what the
allocator has not yet returned (N x 6 x limit in all). Without the bound every client's upload is held at once.

The default is a short run (12 clients, 8 MB uploads, 2 held); BREAKHIS_SERVE_MEMORY=CLIENTSxMB runs the documented
figure (30x50: 30 clients, 50 MB each, the default 4 held) and prints it, with the model directory
BREAKHIS_SERVE_MEMORY_MODEL where it is set (the trained model: its own memory is part of the idle figure)."""
from __future__ import annotations

import os
import threading
import time
import urllib.request

import numpy as np
import psutil
import pytest

from tests.test_serve import post, start_server

pytest.importorskip("fastapi", reason="fastapi not installed (setup.sh installs the serve extra)")


def _noise_png(limit: int) -> bytes:
    import cv2

    side = min(int((limit / 3.02) ** 0.5), 4000)  # noise: about 3 bytes a pixel; 4000^2 is --max-pixels
    rng = np.random.default_rng(0)
    while True:
        data = cv2.imencode(".png", rng.integers(0, 256, (side, side, 3), np.uint8))[1].tobytes()
        if len(data) <= limit:
            return data
        side -= 16


def test_memory_is_bounded_by_the_uploads_held(model_dir):
    clients, mb = (int(v) for v in os.environ.get("BREAKHIS_SERVE_MEMORY", "12x8").split("x"))
    held = 4 if mb == 50 else 2
    limit = mb << 20
    png = _noise_png(limit)
    model_dir = os.environ.get("BREAKHIS_SERVE_MEMORY_MODEL", model_dir)
    proc, url = start_server(model_dir, "--max-upload-mb", str(mb), "--max-uploads", str(held), "--max-fields", "1")
    try:
        server = psutil.Process(proc.pid)
        for _ in range(3):  # warm: the first requests load what the server keeps
            urllib.request.urlopen(url + "/v1/model").read()
        post(url, png)
        idle = server.memory_info().rss
        peak, codes, done = [idle], [], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], server.memory_info().rss)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        threads = [threading.Thread(target=lambda: codes.append(post(url, png)[0])) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        sampler.join()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    grown = (peak[0] - idle) / 2**20
    bound = held * 6 * mb
    print(f"\n{clients} clients x {len(png) / 2**20:.1f} MB uploads, {held} held: RSS idle {idle / 2**20:.0f} MB, "
          f"peak {peak[0] / 2**20:.0f} MB (+{grown:.0f} MB; bound +{bound} MB); answers {sorted(set(codes))}")
    assert len(codes) == clients and set(codes) <= {413, 503}, codes
    assert grown <= bound, f"grew by {grown:.0f} MB, above the bound of {bound} MB"
