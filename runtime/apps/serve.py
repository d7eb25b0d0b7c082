"""python -m runtime.serve: the classifier as a local web page and HTTP API, for the microscope workstation.

  GET  /              the page: upload or drop images, see the classified pixels with the patch grid, the patches,
                      the preprocessed patches, the verdict, per-field scores and timings (works offline)
  POST /v1/classify   an image (multipart field "file", or the raw bytes as the body) -> the JSON of
                      `python -m runtime.classify --json` for one input; add ?views=1 for the images the page shows
  POST /v1/slide      a slide, mosaic or large region (as above; ?aggregate=max|topk|mean|fraction&top_k=3&
                      magnification=N&tissue_mask=0|1) -> 202 {"job": id}; one slide at a time, its fields batched
                      with everyone else's
  GET  /v1/slide/ID   that job: state, fields done / total, and when done the result with GeoJSON, CSV and the
                      overlay PNG (base64)
  DELETE /v1/slide/ID cancel that job: what it queued is withdrawn
  GET  /v1/model      manifest: contract, provenance, trained, backend in use
  GET  /healthz       liveness
  GET  /metrics       request counts and latency percentiles

This module does HTTP only: the classifier is owned by runtime.apps.request_queue's worker, the page's images come from
runtime.apps.views. Limits: uploads above --max-upload-mb are refused while they stream in (413); images above
--max-pixels or --max-fields get 413; a full queue gets 503 with Retry-After; work whose client has gone is
dropped. Requests must name this server in their Host header (DNS rebinding), and a browser POST from another
origin, or without the page's token, is refused (403). With --token-file every route but /healthz needs
"Authorization: Bearer TOKEN" (401 otherwise; the page asks for it once per tab), and binding to anything but
loopback without a token is refused unless --insecure-no-auth says so; --tls-cert/--tls-key serve HTTPS.
SIGTERM: stop accepting, finish the batch in progress, cancel what waits, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import sys
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect

from runtime.apps import auth
from runtime.apps.request_queue import Batcher, Busy
from runtime.apps.slide import AGGREGATES
from runtime.apps.slide_jobs import SlideJobs
from runtime.apps.views import patch_views
from runtime.io.decode import ImageTooLarge
from runtime.io.inputs import ImageInput
from runtime.io.scale import Scale
from runtime.pipeline.classifier import Classifier

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
SERVE_MAX_PIXELS = 16_000_000  # per request: 4x a 2048x2048 camera frame (the CLI allows 64 MP)
SERVE_MAX_FIELDS = 32  # per request: a bound on the inference one request can ask for
MAX_PENDING_FIELDS = 128  # waiting in the queue, all requests together: beyond it, 503
PAGE = Path(__file__).resolve().parent / "static" / "index.html"
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
CLOSED = 499  # the client went away before its answer (nginx's code); not a server error
NO_JOB = "no such slide job (finished jobs are kept for a while)"


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency_ms: deque[float] = deque(maxlen=1000)
        self.counts: dict[str, int] = {}

    def record(self, status: int, ms: float) -> None:
        with self.lock:
            self.counts[str(status)] = self.counts.get(str(status), 0) + 1
            if status != CLOSED:  # an abandoned request's wait is not a latency anyone saw
                self.latency_ms.append(ms)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            lat = np.asarray(self.latency_ms) if self.latency_ms else np.zeros(1)
            return {"requests": dict(self.counts), "latency_ms": {
                "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                "max": float(lat.max()), "window": len(self.latency_ms)}}


def allowed_hosts(host: str, extra: list[str]) -> set[str] | None:
    """Host header names this server answers to; None (any) when bound to every interface."""
    if host in ("0.0.0.0", "::"):
        return None
    names = {host, *extra} | (set(LOCAL_NAMES) if host in LOCAL_NAMES else set())
    return {n.lower().strip("[]") for n in names}


def _host_name(value: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:80' -> '::1'."""
    return (urlsplit("//" + value).hostname or "").lower()


@dataclass(frozen=True)
class Limits:
    """What one request, and all requests together, may ask of the server: beyond, 413 or 503."""

    max_upload: int = MAX_UPLOAD_BYTES  # bytes per upload, refused while it streams in
    max_fields: int = SERVE_MAX_FIELDS  # fields per image request
    max_pending: int = MAX_PENDING_FIELDS  # fields waiting in the queue, all requests together
    retry_after_s: int = 5  # what a 503 tells the client to wait


@dataclass
class Service:
    """What the routes share: the classifier behind its queue, the slide jobs, the limits, the page's token."""

    clf: Classifier
    batcher: Batcher
    slides: SlideJobs
    limits: Limits
    metrics: Metrics = field(default_factory=Metrics)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))  # another site's page cannot read it


routes = APIRouter()


def _service(request: Request) -> Service:
    return request.app.state.service


def error(status: int, msg: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status, headers=headers)


def busy(svc: Service, e: Exception | None = None) -> JSONResponse:
    """503 with Retry-After: the queue is full (``e`` says how full), or the server is shutting down."""
    wait = svc.limits.retry_after_s
    return error(503, f"busy: {e}; try again in {wait} s" if e else "the server is shutting down",
                 **{"Retry-After": str(wait)})


def page_html(token: str) -> str:
    return PAGE.read_text().replace("{{TOKEN}}", token)


@routes.get("/", response_class=HTMLResponse)
def page(request: Request) -> str:
    return page_html(_service(request).token)


@routes.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@routes.get("/v1/model")
def model(request: Request) -> dict[str, Any]:
    svc = _service(request)
    m, lim = svc.clf.manifest, svc.limits
    return {"name": m.name, "contract": m.contract.to_dict(), "provenance": m.provenance.__dict__,
            "trained": m.provenance.trained, **svc.clf.model_info.to_dict(),
            "limits": {"max_upload_bytes": lim.max_upload, "max_pixels": svc.clf.max_pixels,
                       "max_fields": lim.max_fields}}


@routes.get("/metrics")
def get_metrics(request: Request) -> dict[str, Any]:
    svc = _service(request)
    return svc.metrics.snapshot() | {"queue": {"pending_fields": svc.batcher.pending, "dropped": svc.batcher.dropped}}


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, read as it streams in; None once it passes the limit. Past the limit nothing more is kept, and up
    to twice the limit is read and dropped so that an ordinary client still receives its 413; a larger upload is
    cut off there."""
    chunks: list[bytes] | None = []
    n = 0
    if int(request.headers.get("content-length") or 0) > 2 * limit:
        return None
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            chunks = None
            if n > 2 * limit:
                break
        elif chunks is not None:
            chunks.append(chunk)
    return b"".join(chunks) if chunks is not None else None


async def read_upload(request: Request, limit: int) -> tuple[str, bytes] | JSONResponse:
    """(file name, bytes) of a multipart field "file" or a raw body, bounded by the upload limit."""
    data = await read_body(request, limit)
    if data is None:
        return error(413, f"upload above the limit of {limit:,} bytes")
    name = "upload"
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        request._body = data  # Starlette parses the form from the body already read (and bounded) here
        try:
            form = await request.form(max_part_size=limit)
        except Exception as e:  # malformed multipart bodies raise parser-specific errors
            return error(400, f"malformed multipart body: {e}")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return error(400, "multipart body has no file field named 'file'")
        name = upload.filename or name
        data = await upload.read()
    return name, data


@routes.post("/v1/classify")
async def classify(request: Request, views: int = 0) -> Any:
    svc = _service(request)
    got = await read_upload(request, svc.limits.max_upload)
    if isinstance(got, JSONResponse):
        return got
    name, data = got
    item = await asyncio.to_thread(svc.clf.prepare, ImageInput(name, data=data))  # as the classifier would
    if item.failure is not None:
        status = 413 if isinstance(item.failure, ImageTooLarge) else 400 if not data else 422
        return error(status, item.result.error or str(item.failure))
    if item.n_fields > svc.limits.max_fields:
        return error(413, f"{name}: {item.n_fields} fields is above this server's limit of {svc.limits.max_fields} "
                          "per request")
    bgr = item.bgr
    assert bgr is not None  # prepared without failure: decoded and planned
    try:
        fut = svc.batcher.submit(item, item.n_fields)
    except Busy as e:
        return busy(svc, e)
    waiting = asyncio.wrap_future(fut)
    while not waiting.done():
        await asyncio.wait({waiting}, timeout=0.25)
        if not waiting.done() and await request.is_disconnected():
            fut.cancel()  # dropped before it is classified, if it has not started
            return Response(status_code=CLOSED)
    if waiting.cancelled():
        return busy(svc)
    res = waiting.result()
    if res.error and res.withheld:  # no verdict: the body keeps every field's measures and flags
        return JSONResponse(res.to_dict(), status_code=422)
    if res.error:
        return error(422, res.error)
    out = res.to_dict()  # its warnings: the decoder's and the classifier's (e.g. another magnification)
    if views:
        out["views"] = patch_views(bgr, out, svc.clf.contract)
    return out


@routes.post("/v1/slide", status_code=202)
async def slide(request: Request, aggregate: str = "max", top_k: int = 3, magnification: float | None = None,
                tissue_mask: int = 1) -> Any:
    svc = _service(request)
    got = await read_upload(request, svc.limits.max_upload)  # read first: a client still sending cannot read an
    if isinstance(got, JSONResponse):  # early answer
        return got
    name, data = got
    if aggregate not in AGGREGATES or top_k < 1 or (magnification is not None and magnification <= 0):
        return error(400, f"aggregate must be one of {', '.join(AGGREGATES)}, top_k >= 1, magnification > 0")
    if not data:
        return error(400, "empty upload")
    options = {"aggregate": aggregate, "top_k": top_k, "tissue_mask": bool(tissue_mask),
               "scale": Scale(magnification, None, "request") if magnification else None}
    try:
        job = svc.slides.start(data, name, options)
    except Busy as e:
        return busy(svc, e)
    return {"job": job.id, "status": f"/v1/slide/{job.id}"}


@routes.get("/v1/slide/{job_id}")
def slide_status(request: Request, job_id: str) -> Any:
    job = _service(request).slides.get(job_id)
    return error(404, NO_JOB) if job is None else job.to_dict()


@routes.delete("/v1/slide/{job_id}")
def slide_cancel(request: Request, job_id: str) -> Any:
    job = _service(request).slides.cancel(job_id)
    return error(404, NO_JOB) if job is None else \
        {"job": job.id, "state": job.state, "cancelling": job.state == "running"}


def create_app(clf: Classifier, limits: Limits = Limits(), hosts: set[str] | None = None,
               tokens: tuple[bytes, ...] = ()) -> FastAPI:
    """The app around an open Classifier (which it owns from now on, through one worker thread); ``tokens``: the
    bearer tokens every route but /healthz needs (none: no authentication)."""
    batcher = Batcher(clf, max_pending=limits.max_pending)
    svc = Service(clf, batcher, SlideJobs(clf, batcher), limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        svc.slides.stop()
        batcher.stop()  # shutdown: waiting work is cancelled; the batch in progress finishes

    app = FastAPI(title="breakhis-edge", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.include_router(routes)
    app.state.service = svc
    app.add_middleware(Guard, hosts=hosts, token=svc.token, metrics=svc.metrics,  # type: ignore[arg-type]
                       max_upload=limits.max_upload, bearer_tokens=tokens)
    return app


class Guard:
    """Pure ASGI middleware (so that handlers still see their client's disconnect): refuses foreign Host headers
    (421), requests without one of the bearer tokens where the server has them (401; the page itself comes with
    401 and asks for the token), browser POSTs from another origin or without the page's token (403), turns an
    unexpected exception into a 500 without a traceback, and records each /v1/classify answer in the metrics."""

    def __init__(self, app: Any, hosts: set[str] | None, token: str, metrics: Metrics, max_upload: int,
                 bearer_tokens: tuple[bytes, ...] = ()) -> None:
        self.app, self.hosts, self.token, self.metrics, self.max_upload = app, hosts, token, metrics, max_upload
        self.bearer_tokens = bearer_tokens

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host", ""), headers.get("origin")
        refusal, extra = None, {}
        if self.hosts is not None and _host_name(host) not in self.hosts:
            refusal = (421, f"this server does not answer to Host {host!r}")
        elif self.bearer_tokens and scope["path"] != "/healthz" and not auth.allows(
                self.bearer_tokens, auth.bearer(headers.get("authorization"))):
            if scope["path"] == "/" and scope["method"] == "GET":  # the page, which asks for the token
                return await HTMLResponse(page_html(self.token), status_code=401)(scope, receive, send)
            refusal, extra = (401, "this server needs 'Authorization: Bearer TOKEN' (a token from its --token-file)"), {
                "WWW-Authenticate": 'Bearer realm="breakhis-edge"'}
        elif scope["method"] in ("POST", "DELETE") and origin is not None and (
                _host_name(urlsplit(origin).netloc) != _host_name(host)
                or headers.get("x-breakhis-token") != self.token):
            refusal = (403, "cross-origin request refused (use the page served here, or a client without Origin)")
        if refusal is not None:
            # Read (and drop) what the client is still sending, up to twice the upload limit, so that it can read
            # the refusal instead of meeting a closed connection.
            n = 0
            while n <= 2 * self.max_upload:
                message = await receive()
                n += len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
            return await JSONResponse({"error": refusal[1]}, status_code=refusal[0], headers=extra)(
                scope, receive, send)
        t0, status = time.perf_counter(), [CLOSED]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except ClientDisconnect:
            status[0] = CLOSED
        except Exception as e:  # the last guard: a bug must not take the server down or leak a traceback
            status[0] = 500
            await JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)(
                scope, receive, send)
        if scope["path"].startswith("/v1/classify"):
            self.metrics.record(status[0], (time.perf_counter() - t0) * 1e3)


def main(argv: list[str] | None = None) -> int:
    from runtime.apps.options import add_model_options

    ap = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only). Any other address needs "
                         "--token-file (or --insecure-no-auth), and should have --tls-cert/--tls-key")
    ap.add_argument("--port", type=int, default=8080,
                    help="port to listen on (default 8080: Triton Inference Server, often beside it, takes 8000-8002)")
    ap.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                    help="another name this server may be reached by (Host header), repeatable")
    ap.add_argument("--max-upload-mb", type=int, default=MAX_UPLOAD_BYTES >> 20,
                    help=f"refuse larger uploads with 413, while they stream in (default {MAX_UPLOAD_BYTES >> 20})")
    ap.add_argument("--max-fields", type=int, default=SERVE_MAX_FIELDS,
                    help=f"refuse images of more fields per request with 413 (default {SERVE_MAX_FIELDS})")
    ap.add_argument("--max-pending", type=int, default=MAX_PENDING_FIELDS,
                    help=f"fields allowed to wait, all requests together; beyond, 503 (default {MAX_PENDING_FIELDS})")
    g = ap.add_argument_group("security (docs/user-guide.md: a server on the lab network)")
    g.add_argument("--token-file", type=Path, default=None,
                   help="bearer tokens, one per line (at least 16 characters each): every route but /healthz then "
                        "needs 'Authorization: Bearer TOKEN' (401 otherwise); the page asks for it once per tab")
    g.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this certificate (PEM)")
    g.add_argument("--tls-key", type=Path, default=None, help="the certificate's private key (PEM)")
    g.add_argument("--insecure-no-auth", action="store_true",
                   help="allow binding to a network address without --token-file: anyone who can reach it can use "
                        "the service")
    add_model_options(ap, max_pixels=SERVE_MAX_PIXELS)
    args = ap.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        ap.error("--tls-cert and --tls-key go together")
    import uvicorn

    from runtime.apps.options import open_classifier
    from runtime.errors import BreakhisError, report

    hosts = allowed_hosts(args.host, args.allowed_host)
    try:
        tokens = auth.read_tokens(args.token_file) if args.token_file else ()
        warning = auth.check_binding(args.host, args.host in LOCAL_NAMES, bool(tokens), args.insecure_no_auth)
        if args.tls_cert:
            auth.check_tls(args.tls_cert, args.tls_key)
        if warning:
            print(warning, file=sys.stderr)
        app = create_app(open_classifier(args), Limits(args.max_upload_mb << 20, args.max_fields, args.max_pending),
                         hosts, tokens)
    except BreakhisError as e:
        return report(e)
    clf = app.state.service.clf
    scheme = "https" if args.tls_cert else "http"
    print(f"serving {clf.manifest.name} ({clf.backend.name}) on {scheme}://{args.host}:{args.port}/"
          + (f" ({len(tokens)} token(s) accepted)" if tokens else ""), file=sys.stderr)
    # uvicorn stops gracefully on SIGTERM/SIGINT and then re-raises the signal to the handler it found; a quiet
    # one makes that graceful stop an exit with status 0 instead of a death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30,
                ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)
    print("stopped", file=sys.stderr)
    return 0
