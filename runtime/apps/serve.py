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
  GET  /openapi.json  the API's contract (runtime.serving.api_contract)

This module does HTTP only: the classifier is owned by runtime.serving.request_queue's worker, the page's images
come from runtime.serving.views. Limits: uploads above --max-upload-mb are refused while they stream in (413); images
above --max-pixels or --max-fields get 413; a full queue gets 503 with Retry-After; work whose client has gone is
dropped; at most --max-uploads uploads are held at once (the memory bound), --max-connections connections are
served, slow clients are cut off (runtime.serving.connection); a slide is refused (413) before any work when its
scale or its field count is beyond the limits (runtime.serving.slide_jobs). Which requests get in, and the headers every
answer carries (Content-Security-Policy, nosniff), is runtime.serving.guard's: Host names (DNS rebinding), bearer
tokens (--token-file; the page asks for one once per tab), cross-origin POSTs. Binding to anything but loopback
without a token is refused unless --insecure-no-auth says so; --tls-cert/--tls-key serve HTTPS.
SIGTERM: stop accepting, finish the batch in progress, cancel what waits, remove slide uploads, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from runtime.apps.routes import page_html, routes
from runtime.pipeline.classifier import Classifier
from runtime.serving import api_contract, auth
from runtime.serving.connection import BODY_CHUNK_TIMEOUT_S, HEADER_TIMEOUT_S, HeaderTimeoutProtocol
from runtime.serving.guard import LOCAL_NAMES, WILDCARDS, Guard, allowed_hosts
from runtime.serving.request_queue import Batcher
from runtime.serving.service import (
    DEFAULT_LIMITS,
    MAX_CONNECTIONS,
    MAX_PENDING_FIELDS,
    MAX_UPLOAD_BYTES,
    MAX_UPLOADS,
    SERVE_MAX_FIELDS,
    SERVE_MAX_PIXELS,
    UPLOAD_WAIT_S,
    Limits,
    Service,
)
from runtime.serving.slide_jobs import SlideJobs


def create_app(clf: Classifier, limits: Limits = DEFAULT_LIMITS, hosts: set[str] | None = None,
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
                       wildcard=wildcard, token=svc.token, page=page_html(svc.token), record=record,
                       bearer_tokens=tokens)
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
