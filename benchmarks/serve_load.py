"""python -m benchmarks.serve_load: the server under a mixed load, measured (not tested): N clients sending normal
images (one field each) while H clients send the most expensive images the server accepts (--max-fields fields).
Reports the small requests' latency p50/p95/max, the heavy ones', status counts (503s are the queue doing its
job) and the server's peak RSS, with the server started here on a free localhost port.

examples:
  python -m benchmarks.serve_load --clients 16 --requests 25 --heavy-clients 4 --json benchmarks/results/serve.json
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import psutil

from benchmarks import write_json
from runtime.model.paths import REPO, sample_images


def _post(url: str, data: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/v1/classify", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return status, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: as runtime.classify)")
    ap.add_argument("--clients", type=int, default=16, help="clients sending normal images (default 16)")
    ap.add_argument("--requests", type=int, default=25, help="requests per normal client (default 25)")
    ap.add_argument("--heavy-clients", type=int, default=4, help="clients sending the largest images (default 4)")
    ap.add_argument("--heavy-requests", type=int, default=3, help="requests per heavy client (default 3)")
    ap.add_argument("--max-fields", type=int, default=32, help="the server's --max-fields (default 32)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    from runtime.model.paths import default_model_dir

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--model", str(args.model or default_model_dir()),
                               "--port", str(port), "--max-fields", str(args.max_fields)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.25)
    img = cv2.imread(str(next(iter(sorted(sample_images().glob("*.png"))))))
    small = cv2.imencode(".png", img)[1].tobytes()
    rows = int(np.floor(np.sqrt(args.max_fields)))  # the largest image within --max-fields: rows x cols fields
    cols = args.max_fields // rows
    heavy = cv2.imencode(".png", cv2.resize(img, (672 * cols, 448 * rows)))[1].tobytes()
    proc, peak, stop = psutil.Process(server.pid), [0], threading.Event()

    def watch_memory() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.1)

    results: dict[str, list[tuple[int, float]]] = {"small": [], "heavy": []}

    def client(kind: str, data: bytes, n: int) -> None:
        for _ in range(n):
            results[kind].append(_post(url, data))

    threads = [threading.Thread(target=client, args=("small", small, args.requests)) for _ in range(args.clients)]
    threads += [threading.Thread(target=client, args=("heavy", heavy, args.heavy_requests))
                for _ in range(args.heavy_clients)]
    rss0 = proc.memory_info().rss
    mem = threading.Thread(target=watch_memory)
    mem.start()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    mem.join()
    server.terminate()
    server.wait(timeout=60)
    out: dict = {"clients": args.clients, "requests": args.requests, "heavy_clients": args.heavy_clients,
                 "heavy_fields": rows * cols, "wall_s": wall, "rss_start_mb": rss0 / 2**20,
                 "rss_peak_mb": peak[0] / 2**20}
    for kind, rs in results.items():
        ok = np.array([dt for st, dt in rs if st == 200]) * 1e3
        out[kind] = {"statuses": {str(s): sum(st == s for st, _ in rs) for s in sorted({st for st, _ in rs})},
                     **({"p50_ms": float(np.median(ok)), "p95_ms": float(np.percentile(ok, 95)),
                         "max_ms": float(ok.max())} if len(ok) else {})}
    print(json.dumps(out, indent=2))
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
