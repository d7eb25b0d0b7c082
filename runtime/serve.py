"""python -m runtime.serve: the classifier as a local web page and HTTP API, for the microscope workstation.

  GET  /              the page: upload or drop an image, see the patch grid, the patches, the preprocessed
                      patches, the verdict, per-field scores and timings (no external resources: works offline)
  POST /v1/classify   an image (multipart field "file", or the raw bytes as the body) -> the JSON of
                      `python -m runtime.classify --json` for one input; add ?views=1 for patch images
  GET  /v1/model      manifest: contract, provenance, trained, backend in use
  GET  /healthz       liveness
  GET  /metrics       request counts and latency percentiles

One model and backend are loaded once and owned by one worker thread; concurrent requests are batched together
(their fields share inference calls, up to the backend's batch size). Bad uploads get a 4xx with the reason.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from runtime.imageio import ImageError, decode
from runtime.tiling import plan_image

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
PAGE = Path(__file__).resolve().parent / "static" / "index.html"


def _jpeg(img: np.ndarray) -> str:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else ""


def patch_views(bgr: np.ndarray, result: dict[str, Any], contract: Any) -> dict[str, Any]:
    """The patches of the most malignant field and their preprocessed versions, as images a person can see.
    Preprocessed values (mean-subtracted, in the model's channel order) are stretched to 0..255 per patch."""
    from runtime.preprocess import preprocess_fields

    plan = plan_image(bgr, contract)
    best = int(np.argmax([f["probability"] for f in result["fields"]]))
    sub = replace(plan, field_origins=plan.field_origins[best:best + 1], grid=(1, 1))
    pre = preprocess_fields(bgr, sub, contract)[0]  # (T, 3, P, P)
    p = contract.patch
    raw, shown = [], []
    for (y, x), arr in zip(sub.patch_origins(), pre):
        raw.append(_jpeg(bgr[y:y + p, x:x + p]))
        hwc = arr.transpose(1, 2, 0)
        if contract.channel_order == "RGB":
            hwc = hwc[:, :, ::-1]  # display as BGR for OpenCV's encoder
        lo, hi = hwc.min(), hwc.max()
        shown.append(_jpeg(((hwc - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)))
    return {"field": best, "patches": raw, "preprocessed": shown}


class Batcher:
    """One worker thread owns the classifier: requests queue their decoded images, the worker takes all that are
    waiting (up to max_items) and classifies them together, so concurrent requests share GPU batches, and the
    event loop never blocks on inference."""

    def __init__(self, clf: Any, max_items: int = 16) -> None:
        self.clf, self.max_items = clf, max_items
        self.queue: queue.Queue[tuple[np.ndarray, Future]] = queue.Queue()
        threading.Thread(target=self._work, name="classifier", daemon=True).start()

    def submit(self, bgr: np.ndarray) -> Future:
        fut: Future = Future()
        self.queue.put((bgr, fut))
        return fut

    def _work(self) -> None:
        while True:
            items = [self.queue.get()]
            while len(items) < self.max_items:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                for (_, fut), res in zip(items, self.clf.classify([bgr for bgr, _ in items])):
                    fut.set_result(res)
            except Exception as e:  # never leave a request waiting forever
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency_ms: deque[float] = deque(maxlen=1000)
        self.counts: dict[str, int] = {}

    def record(self, status: int, ms: float) -> None:
        with self.lock:
            self.counts[str(status)] = self.counts.get(str(status), 0) + 1
            self.latency_ms.append(ms)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            lat = np.asarray(self.latency_ms) if self.latency_ms else np.zeros(1)
            return {"requests": dict(self.counts), "latency_ms": {
                "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                "max": float(lat.max()), "window": len(self.latency_ms)}}


def create_app(clf: Any, max_upload: int = MAX_UPLOAD_BYTES) -> Any:
    """The app around an open Classifier (which it owns from now on, through one worker thread)."""
    max_pixels = clf.max_pixels
    batcher = Batcher(clf)
    metrics = Metrics()
    app = FastAPI(title="breakhis-edge", docs_url=None, redoc_url=None)

    def error(status: int, msg: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status)

    @app.middleware("http")
    async def timing(request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as e:  # the last guard: a bug must not take the server down or leak a traceback
            response = error(500, f"internal error: {type(e).__name__}")
        if request.url.path.startswith("/v1/classify"):
            metrics.record(response.status_code, (time.perf_counter() - t0) * 1e3)
        return response

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    def model() -> dict[str, Any]:
        m = clf.manifest
        return {"name": m.name, "contract": m.contract.to_dict(), "provenance": m.provenance.__dict__,
                "trained": m.provenance.trained, **clf.model_info}

    @app.get("/metrics")
    def get_metrics() -> dict[str, Any]:
        return metrics.snapshot()

    @app.post("/v1/classify")
    async def classify(request: Request, views: int = 0) -> Any:
        length = int(request.headers.get("content-length") or 0)
        if length > max_upload:
            return error(413, f"upload of {length:,} bytes is above the limit of {max_upload:,}")
        ctype = request.headers.get("content-type", "")
        name = "upload"
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form()
            except Exception as e:  # malformed multipart bodies raise parser-specific errors
                return error(400, f"malformed multipart body: {e}")
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return error(400, "multipart body has no file field named 'file'")
            name = upload.filename or name
            data = await upload.read()
        else:
            data = await request.body()
        if len(data) > max_upload:
            return error(413, f"upload of {len(data):,} bytes is above the limit of {max_upload:,}")
        t0 = time.perf_counter()
        try:
            dec = decode(data, name, max_pixels)
        except ImageError as e:
            return error(422 if data else 400, str(e))
        t1 = time.perf_counter()
        res = await asyncio.wrap_future(batcher.submit(dec.bgr))
        if res.error:
            return error(422, res.error.replace("<array>", name))
        out = res.to_dict()
        out["path"], out["conversions"] = name, dec.conversions
        out["timings_ms"]["decode"] = decode_ms = (t1 - t0) * 1e3
        out["timings_ms"]["total"] += decode_ms
        if views:
            out["views"] = patch_views(dec.bgr, out, clf.contract)
        return out

    app.state.classifier = clf
    return app


def main(argv: list[str] | None = None) -> int:
    from runtime.cli import add_model_options

    ap = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only). WARNING: another address exposes "
                         "the service, which has no authentication, to the network")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    ap.add_argument("--max-upload-mb", type=int, default=MAX_UPLOAD_BYTES >> 20,
                    help=f"refuse larger uploads with 413 (default {MAX_UPLOAD_BYTES >> 20})")
    add_model_options(ap)
    args = ap.parse_args(argv)
    import uvicorn

    from runtime.cli import open_classifier
    from runtime.errors import BreakhisError, report

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: binding to {args.host}: anyone who can reach this address can use the service "
              "(no authentication).", file=sys.stderr)
    try:
        app = create_app(open_classifier(args), args.max_upload_mb << 20)
    except BreakhisError as e:
        return report(e)
    clf = app.state.classifier
    print(f"serving {clf.manifest.name} ({clf.backend.name}) on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
