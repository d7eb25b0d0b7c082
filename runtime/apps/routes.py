"""The HTTP routes of the page and API (docs: runtime/apps/serve.py), at module level: reading uploads within
their limits, and handing the work to the queue or the slide jobs."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from runtime.io.decode import ImageTooLarge
from runtime.io.inputs import ImageInput
from runtime.io.scale import Scale
from runtime.serving.api_contract import Aggregate, responses, upload
from runtime.serving.connection import next_chunk
from runtime.serving.guard import CLOSED
from runtime.serving.request_queue import Busy
from runtime.serving.service import NO_JOB, UPLOAD_WAIT_S, Limits, Service
from runtime.serving.slide_jobs import MAX_FACTOR, MIN_FACTOR, SlideRefused
from runtime.serving.views import patch_views

routes = APIRouter()
STATIC = Path(__file__).resolve().parent / "static"  # the page, its script and style


def page_html(token: str) -> str:
    """The page, with the token its script sends (another site's page cannot read it)."""
    return (STATIC / "index.html").read_text().replace("{{TOKEN}}", token)


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
    return page_html(_service(request).token)


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
