"""python -m benchmarks.serve_compare: one model, one machine, one run: the local classifier, this project's server
(runtime.serve, HTTP uploads) and Triton (runtime.triton_server through PyTriton, clients with --backend triton),
each with 1 and 8 concurrent clients sending one-field 100X images. Reports fields per second and the per-request
latency p50/p99 (measured, not tested).

- local: one Classifier in this process; the clients' requests take turns on it (one process on the microscope's
  box serving its callers).
- serve: each client posts the image file; decoding, preprocessing and inference happen in the server.
- triton: each client decodes and preprocesses (CPU) and sends the fields (3.6 MB each at FP32); Triton batches
  across clients. Server and clients share this machine's cores, as they would not in a lab.

examples:
  python -m benchmarks.serve_compare --requests 8 --json benchmarks/results/serve-compare.json
"""
from __future__ import annotations

import argparse
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import write_json
from runtime.model.paths import REPO, default_model_dir, sample_images

CLIENTS = (1, 8)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(module: str, *args: str) -> subprocess.Popen:
    """A server of this project, as a user starts it, quiet."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def measured(proc: subprocess.Popen, ready: Callable[[], bool], open_client: Callable[[], Callable[[Path], None]],
             images: list[Path], requests: int) -> list[dict]:
    """Once the server ``proc`` is ready: a warm-up request, then the load at each number of clients; the server is
    stopped whatever happens."""
    try:
        _wait(ready, proc, str(proc.args[2]))  # type: ignore[index]
        open_client()(images[0])
        return [load(c, requests, images, open_client) for c in CLIENTS]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _wait(ready: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    for _ in range(480):
        try:
            if ready():
                return
        except Exception:  # not listening yet
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}")
        time.sleep(0.25)
    raise RuntimeError(f"{what} did not start in 2 minutes")


def run_clients(clients: int, client: Callable[[int], None], start: threading.Barrier) -> float:
    """``client(k)`` on ``clients`` threads, released together through ``start`` (a barrier of clients + 1), all
    waited for; the time they were released at."""
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return t0


def load(clients: int, requests: int, images: list[Path], open_client: Callable[[], Callable[[Path], None]]) -> dict:
    """``clients`` threads, each its own client, sending ``requests`` images one after another."""
    latencies: list[float] = []
    start = threading.Barrier(clients + 1)
    lock = threading.Lock()

    def client(k: int) -> None:
        send = open_client()
        start.wait()
        for i in range(requests):
            t0 = time.perf_counter()
            send(images[(k * requests + i) % len(images)])
            with lock:
                latencies.append(time.perf_counter() - t0)

    t0 = run_clients(clients, client, start)
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1e3
    return {"clients": clients, "fields": len(latencies), "fields_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: as runtime.classify)")
    ap.add_argument("--images", type=Path, default=None, help="folder of one-field images (default: the 100X samples)")
    ap.add_argument("--requests", type=int, default=8, help="requests per client (default 8)")
    ap.add_argument("--precision", default="auto", help="the precision every path runs (default auto)")
    ap.add_argument("--triton-max-batch", type=int, default=None,
                    help="the largest batch Triton forms (runtime.triton_server --max-batch; default: its default, 8)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    from runtime.backends.triton import TritonTarget
    from runtime.pipeline.classifier import Classifier

    model = args.model or default_model_dir()
    images = sorted((args.images or sample_images()).glob("*.png"))[:16]
    result: dict = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                    "cpu": _cpu(), "model": str(model), "precision": args.precision, "requests": args.requests,
                    "triton_max_batch": args.triton_max_batch,
                    "runs": {}}
    with Classifier(model, precision=args.precision) as local:
        turn = threading.Lock()

        def local_client() -> Callable[[Path], None]:
            def send(path: Path) -> None:
                with turn:
                    assert local.classify(path)[0].error is None
            return send

        result["backend"] = local.backend.name
        local.classify(images[0])  # warm
        result["runs"]["local"] = [load(c, args.requests, images, local_client) for c in CLIENTS]

    port = _port()
    url = f"http://127.0.0.1:{port}"
    serve = _start("runtime.serve", "--model", str(model), "--port", str(port), "--precision", args.precision,
                   "--max-pending", "256")

    def http_client() -> Callable[[Path], None]:
        def send(path: Path) -> None:
            req = urllib.request.Request(url + "/v1/classify", data=path.read_bytes(), method="POST")
            with urllib.request.urlopen(req, timeout=600) as r:
                r.read()
        return send

    result["runs"]["serve"] = measured(serve, lambda: urllib.request.urlopen(url + "/healthz", timeout=1).status == 200,
                                       http_client, images, args.requests)

    import tritonclient.http as th

    http, grpc, metrics = _port(), _port(), _port()
    triton = _start("runtime.triton_server", "--model", str(model), "--precision", args.precision, "--http-port",
                    str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-queue", "64",
                    *(["--max-batch", str(args.triton_max_batch)] if args.triton_max_batch else []))
    target = TritonTarget(f"http://127.0.0.1:{http}")

    def triton_client() -> Callable[[Path], None]:
        clf = Classifier(None, backend="triton", triton=target, precision=args.precision)

        def send(path: Path) -> None:
            assert clf.classify(path)[0].error is None
        return send

    ready = th.InferenceServerClient(f"127.0.0.1:{http}")
    result["runs"]["triton"] = measured(triton, lambda: ready.is_model_ready("breakhis_fp32"), triton_client, images,
                                        args.requests)
    write_json(args.json, result)
    print(f"{result['cpu']}; model {Path(model).name}, {result['backend']}; {args.requests} requests per client")
    print(f"{'path':8s} {'clients':>7s} {'fields/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for path, rows in result["runs"].items():
        for r in rows:
            print(f"{path:8s} {r['clients']:7d} {r['fields_per_s']:9.2f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {len(__import__('os').sched_getaffinity(0))} cores"
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
