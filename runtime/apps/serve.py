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
  DELETE /v1/slide/ID cancel that job (what it queued is withdrawn) and forget it: GET then gives 404
  GET  /v1/model      manifest: contract, provenance, trained, backend in use
  GET  /healthz       liveness
  GET  /metrics       request counts and latency percentiles
  GET  /openapi.json  the API's contract (runtime.apps.api_contract)

This module does HTTP only: the classifier is owned by runtime.apps.request_queue's worker, the page's images come from
runtime.apps.views. Limits: uploads above --max-upload-mb are refused while they stream in (413); images above
--max-pixels or --max-fields get 413; a full queue gets 503 with Retry-After; work whose client has gone is
dropped; at most --max-uploads uploads are held at once (the memory bound), --max-connections connections are
served, slow clients are cut off (runtime.apps.connection); a slide is refused (413) before any work when its scale
or its field count is beyond the limits (runtime.apps.slide_jobs). Which requests get in, and the headers every
answer carries (Content-Security-Policy, nosniff), is runtime.apps.guard's: Host names (DNS rebinding), bearer
tokens (--token-file; the page asks for one once per tab), cross-origin POSTs. Binding to anything but loopback
without a token is refused unless --insecure-no-auth says so; --tls-cert/--tls-key serve HTTPS.
SIGTERM: stop accepting, finish the batch in progress, cancel what waits, remove slide uploads, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import sys
import threading
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from runtime.apps import api_contract, auth
from runtime.apps.api_contract import Aggregate, responses, upload
from runtime.apps.connection import BODY_CHUNK_TIMEOUT_S, HEADER_TIMEOUT_S, HeaderTimeoutProtocol, next_chunk
from runtime.apps.guard import CLOSED, LOCAL_NAMES, WILDCARDS, Guard, allowed_hosts
from runtime.apps.request_queue import Batcher, Busy
from runtime.apps.slide_jobs import MAX_FACTOR, MIN_FACTOR, SlideJobs, SlideRefused
from runtime.apps.views import patch_views
from runtime.io.decode import ImageTooLarge
from runtime.io.inputs import ImageInput
from runtime.io.scale import Scale
from runtime.pipeline.classifier import Classifier

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
SERVE_MAX_PIXELS = 16_000_000  # per request: 4x a 2048x2048 camera frame (the CLI allows 64 MP)
SERVE_MAX_FIELDS = 32  # per request: a bound on the inference one request can ask for
MAX_PENDING_FIELDS = 128  # waiting in the queue, all requests together: beyond it, 503
MAX_UPLOADS = 4  # uploads held in memory at once (docs/user-guide.md: the memory bound); more wait for a turn
UPLOAD_WAIT_S = 30.0  # how long an upload waits for its turn before 503
MAX_CONNECTIONS = 64  # uvicorn's limit_concurrency: connections and requests at once; beyond it, 503
STATIC = Path(__file__).resolve().parent / "static"
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


@dataclass(frozen=True)
class Limits:
    """What one request, and all requests together, may ask of the server: beyond, 413 or 503."""

    max_upload: int = MAX_UPLOAD_BYTES  # bytes per upload, refused while it streams in
    max_fields: int = SERVE_MAX_FIELDS  # fields per image request
    max_pending: int = MAX_PENDING_FIELDS  # fields waiting in the queue, all requests together
    retry_after_s: int = 5  # what a 503 tells the client to wait
    max_uploads: int = MAX_UPLOADS  # uploads held at once
    max_slide_fields: int | None = None  # fields per slide (None: slide_jobs.default_max_fields)
    body_timeout_s: float = BODY_CHUNK_TIMEOUT_S  # the longest wait for the next piece of an upload: beyond, 408


@dataclass
class Service:
    """What the routes share: the classifier behind its queue, the slide jobs, the limits, the page's token."""

    clf: Classifier
    batcher: Batcher
    slides: SlideJobs
    limits: Limits
    metrics: Metrics = field(default_factory=Metrics)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))  # another site's page cannot read it
    uploads: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_UPLOADS))

    @property
    def page(self) -> str:
        return (STATIC / "index.html").read_text().replace("{{TOKEN}}", self.token)


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


@routes.get("/", response_class=HTMLResponse, responses=responses(page=True))
def page(request: Request) -> str:
    return _service(request).page


@routes.get("/static/{name}", include_in_schema=False)
def static(name: str) -> Response:
    """The page's own script and style (the Content-Security-Policy allows no other)."""
    if name not in ("app.js", "app.css"):
        return error(404, "no such file")
    return FileResponse(STATIC / name, media_type="text/javascript" if name.endswith(".js") else "text/css")


@routes.get("/healthz", responses=responses())
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@routes.get("/v1/model", responses=responses())
def model(request: Request) -> dict[str, Any]:
    svc = _service(request)
    m, lim = svc.clf.manifest, svc.limits
    return {"name": m.name, "contract": m.contract.to_dict(), "provenance": m.provenance.__dict__,
            "trained": m.provenance.trained, **svc.clf.model_info.to_dict(),
            "limits": {"max_upload_bytes": lim.max_upload, "max_pixels": svc.clf.max_pixels,
                       "max_fields": lim.max_fields}}


@routes.get("/metrics", responses=responses())
def get_metrics(request: Request) -> dict[str, Any]:
    svc = _service(request)
    return svc.metrics.snapshot() | {"queue": {"pending_fields": svc.batcher.pending, "dropped": svc.batcher.dropped}}


async def read_body(request: Request, limit: int, timeout: float) -> bytes | None:
    """The body, read as it streams in; None once it passes the limit. Past the limit nothing more is kept, and up
    to twice the limit is read and dropped so that an ordinary client still receives its 413; a larger upload is
    cut off there. TimeoutError where the client sends nothing for ``timeout`` seconds."""
    chunks: list[bytes] | None = []
    n = 0
    if int(request.headers.get("content-length") or 0) > 2 * limit:
        return None
    stream = request.stream()
    while (chunk := await next_chunk(stream, timeout)) is not None:
        n += len(chunk)
        if n > limit:
            chunks = None
            if n > 2 * limit:
                break
        elif chunks is not None:
            chunks.append(chunk)
    return b"".join(chunks) if chunks is not None else None


async def read_upload(request: Request, limits: Limits) -> tuple[str, bytes] | JSONResponse:
    """(file name, bytes) of a multipart field "file" or a raw body, bounded by the upload limit. Called with one of
    the server's upload turns held (``uploads``)."""
    limit = limits.max_upload
    try:
        data = await read_body(request, limit, limits.body_timeout_s)
    except TimeoutError:
        return error(408, f"the upload stalled: nothing came for {limits.body_timeout_s:g} s", Connection="close")
    if data is None:  # what is left of the body is not read: the connection closes after the answer
        return error(413, f"upload above the limit of {limit:,} bytes", Connection="close")
    name = "upload"
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        request._body = data  # Starlette parses the form from the body already read (and bounded) here
        try:
            form = await request.form(max_part_size=limit)
        except Exception as e:  # noqa: BLE001 - malformed multipart bodies raise parser-specific errors
            return error(400, f"malformed multipart body: {e}")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return error(400, "multipart body has no file field named 'file'")
        name = upload.filename or name
        data = await upload.read()
        request._body = b""  # one copy of the upload is held, not two
    return name, data


@asynccontextmanager
async def upload_turn(svc: Service) -> Any:
    """One of the server's MAX_UPLOADS turns to hold an upload's bytes (read, parsed, decoded or stored; what goes
    on to the queue is the decoded image, which the queue's own bound counts); None after UPLOAD_WAIT_S."""
    try:
        await asyncio.wait_for(svc.uploads.acquire(), UPLOAD_WAIT_S)
    except TimeoutError:
        yield None
        return
    try:
        yield True
    finally:
        svc.uploads.release()


@routes.post("/v1/classify", **upload(403, 408, 413, 422))
async def classify(request: Request, views: int = Query(0, ge=0, le=1)) -> Any:
    svc = _service(request)
    async with upload_turn(svc) as turn:
        if turn is None:
            return busy(svc, Busy(f"{svc.limits.max_uploads} uploads are being received"))
        got = await read_upload(request, svc.limits)
        if isinstance(got, JSONResponse):
            return got
        name, data = got
        item = await asyncio.to_thread(svc.clf.prepare, ImageInput(name, data=data))  # as the classifier would
        empty = not data
        del got, data  # the turn ends with the upload's bytes
    if item.failure is not None:
        status = 413 if isinstance(item.failure, ImageTooLarge) else 400 if empty else 422
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
        out["views"] = await asyncio.to_thread(patch_views, bgr, out, svc.clf.contract)
    return out


@routes.post("/v1/slide", status_code=202, **upload(403, 408, 413))
async def slide(request: Request, aggregate: Aggregate = "max", top_k: int = Query(3, ge=1, le=1_000_000),
                magnification: float | None = Query(None, gt=0, allow_inf_nan=False),
                tissue_mask: int = Query(1, ge=0, le=1)) -> Any:
    svc = _service(request)
    async with upload_turn(svc) as turn:
        if turn is None:
            return busy(svc, Busy(f"{svc.limits.max_uploads} uploads are being received"))
        got = await read_upload(request, svc.limits)  # read first: a client still sending cannot read
        if isinstance(got, JSONResponse):  # an early answer
            return got
        return await _slide(svc, *got, aggregate, top_k, magnification, tissue_mask)


async def _slide(svc: Service, name: str, data: bytes, aggregate: str, top_k: int, magnification: float | None,
                 tissue_mask: int) -> Any:
    if not data:
        return error(400, "empty upload")
    model = svc.clf.contract.magnification  # a scale asked for out of range is a parameter out of its range (400);
    if magnification is not None and model and not MIN_FACTOR <= magnification / model <= MAX_FACTOR:  # a file's: 413
        return error(400, f"magnification must be within {MIN_FACTOR * model:g}..{MAX_FACTOR * model:g} "
                          f"({MIN_FACTOR:g}x..{MAX_FACTOR:g}x this model's {model:g}X)")
    options = {"aggregate": aggregate, "top_k": top_k, "tissue_mask": bool(tissue_mask),
               "scale": Scale(magnification, None, "request") if magnification else None}
    try:
        job = await asyncio.to_thread(svc.slides.start, data, name, options)  # writes the file: not on the loop
    except Busy as e:
        return busy(svc, e)
    except SlideRefused as e:
        return error(413, str(e))
    except OSError as e:  # disk full, no permission: the slot and the folder are free again
        return error(503, f"{name}: the upload could not be stored ({e.strerror or type(e).__name__})",
                     **{"Retry-After": str(svc.limits.retry_after_s)})
    return {"job": job.id, "status": f"/v1/slide/{job.id}"}


@routes.get("/v1/slide/{job_id}", responses=responses(404))
def slide_status(request: Request, job_id: str) -> Any:
    job = _service(request).slides.get(job_id)
    return error(404, NO_JOB) if job is None else job.to_dict()


@routes.delete("/v1/slide/{job_id}", responses=responses(403, 404))
def slide_cancel(request: Request, job_id: str) -> Any:
    job = _service(request).slides.cancel(job_id)
    return error(404, NO_JOB) if job is None else \
        {"job": job.id, "state": job.state, "cancelling": job.state == "running"}


def create_app(clf: Classifier, limits: Limits = Limits(), hosts: set[str] | None = None,
               tokens: tuple[bytes, ...] = (), wildcard: bool = False) -> FastAPI:
    """The app around an open Classifier (which it owns from now on, through one worker thread); ``hosts``: the
    Host names it answers to (guard.allowed_hosts; default: loopback), ``wildcard``: bound to every interface;
    ``tokens``: the bearer tokens every route but /healthz needs (none: no authentication)."""
    batcher = Batcher(clf, max_pending=limits.max_pending)
    svc = Service(clf, batcher, SlideJobs(clf, batcher, max_fields=limits.max_slide_fields), limits,
                  uploads=asyncio.Semaphore(limits.max_uploads))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        svc.slides.stop()  # cancelled, their uploads removed
        batcher.stop()  # shutdown: waiting work is cancelled; the batch in progress finishes

    def record(path: str, status: int, ms: float) -> None:
        if path.startswith("/v1/classify"):
            svc.metrics.record(status, ms)

    app = FastAPI(title="breakhis-edge", docs_url=None, redoc_url=None, lifespan=lifespan)
    api_contract.install(app, clf.contract, routes.routes)
    app.include_router(routes)
    app.state.service = svc
    app.add_middleware(Guard, hosts=allowed_hosts("127.0.0.1", []) if hosts is None else hosts,  # type: ignore
                       wildcard=wildcard, token=svc.token, page=svc.page, record=record, bearer_tokens=tokens)
    return app


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
                    help="another name this server may be reached by (Host header), repeatable; on --host 0.0.0.0 "
                         "or :: the names it answers to are these and localhost (and any IP address)")
    ap.add_argument("--max-upload-mb", type=int, default=MAX_UPLOAD_BYTES >> 20,
                    help=f"refuse larger uploads with 413, while they stream in (default {MAX_UPLOAD_BYTES >> 20})")
    ap.add_argument("--max-fields", type=int, default=SERVE_MAX_FIELDS,
                    help=f"refuse images of more fields per request with 413 (default {SERVE_MAX_FIELDS})")
    ap.add_argument("--max-pending", type=int, default=MAX_PENDING_FIELDS,
                    help=f"fields allowed to wait, all requests together; beyond, 503 (default {MAX_PENDING_FIELDS})")
    ap.add_argument("--max-slide-fields", type=int, default=None,
                    help="refuse slides of more fields with 413, before any work (default: the fields of the largest "
                         "slide accepted, 40 billion pixels, at the model's scale)")
    ap.add_argument("--max-uploads", type=int, default=MAX_UPLOADS,
                    help=f"uploads held in memory at once; more wait up to {UPLOAD_WAIT_S:g} s, then 503 "
                         f"(default {MAX_UPLOADS}; docs/user-guide.md: the memory bound)")
    ap.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                    help=f"connections and requests served at once; beyond, 503 (default {MAX_CONNECTIONS})")
    ap.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                    help=f"seconds a request's headers may take to arrive; then the connection is closed "
                         f"(default {HEADER_TIMEOUT_S:g})")
    ap.add_argument("--body-timeout", type=float, default=BODY_CHUNK_TIMEOUT_S,
                    help=f"seconds an upload may send nothing; then 408 (default {BODY_CHUNK_TIMEOUT_S:g})")
    g = ap.add_argument_group("security (docs/user-guide.md: a server on the lab network)")
    g.add_argument("--token-file", type=Path, default=None,
                   help="bearer tokens, one per line (at least 16 characters each): every route but /healthz then "
                        "needs 'Authorization: Bearer TOKEN' (401 otherwise); the page asks for it once per tab")
    g.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this certificate (PEM)")
    g.add_argument("--tls-key", type=Path, default=None, help="the certificate's private key (PEM)")
    g.add_argument("--insecure-no-auth", action="store_true",
                   help="allow binding to a network address without --token-file: anyone who can reach it can use "
                        "the service")
    add_model_options(ap, max_pixels=SERVE_MAX_PIXELS, max_pixels_why="lower than the CLI's: several uploads are "
                      "decoded at once, and the server's memory bound counts them")
    args = ap.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        ap.error("--tls-cert and --tls-key go together")
    import uvicorn

    from runtime.apps.options import open_classifier
    from runtime.errors import BreakhisError, report

    local = args.host in LOCAL_NAMES
    try:
        tokens = auth.read_tokens(args.token_file) if args.token_file else ()
        warnings = [auth.check_binding(args.host, local, bool(tokens), args.insecure_no_auth),
                    auth.readable_warning(args.token_file) if args.token_file else None,
                    auth.plain_http_warning(args.host, local, bool(tokens), args.tls_cert is not None)]
        if args.tls_cert:
            auth.check_tls(args.tls_cert, args.tls_key)
        for warning in filter(None, warnings):
            print(warning, file=sys.stderr)
        limits = Limits(args.max_upload_mb << 20, args.max_fields, args.max_pending, max_uploads=args.max_uploads,
                        max_slide_fields=args.max_slide_fields, body_timeout_s=args.body_timeout)
        app = create_app(open_classifier(args), limits, allowed_hosts(args.host, args.allowed_host), tokens,
                         wildcard=args.host in WILDCARDS)
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
                ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
                http=type("Protocol", (HeaderTimeoutProtocol,), {"header_timeout": args.header_timeout}),
                limit_concurrency=args.max_connections, ws="none")
    print("stopped", file=sys.stderr)
    return 0
