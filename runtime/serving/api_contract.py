"""The server's published API contract (``/openapi.json``) made true to its routes: the request bodies the upload
routes read themselves (multipart field "file", or the raw bytes), every status each route answers (the Guard's
too: 400 malformed Host/Origin, 401 without a token, 403 cross-origin, 421 foreign Host; 503 beyond
--max-connections), and parameter errors as 400 with the server's {"error": ...} body instead of FastAPI's 422.
tests/test_serve_openapi.py runs schemathesis against the running server with this contract."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal, get_args

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match

from runtime.model.manifest import Contract
from runtime.serving.slide_jobs import MAX_FACTOR, MIN_FACTOR
from runtime.slides.aggregate import AGGREGATES

Aggregate = Literal["max", "topk", "mean", "fraction"]
assert set(get_args(Aggregate)) == set(AGGREGATES), "the slide path's rules and the API's differ"

ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}
WHY = {400: "malformed request: a parameter out of its range, a malformed Host or Origin header, an empty or "
            "malformed upload",
       401: "no valid 'Authorization: Bearer TOKEN' (only where the server has --token-file)",
       403: "a browser request from another origin, or without the page's token",
       404: "no such slide job", 408: "the upload stalled", 413: "above a limit: upload bytes, pixels, fields, or a "
       "slide's scale or field count", 421: "a Host header this server does not answer to",
       422: "an upload that is not a readable image, or an image no verdict could be given for",
       503: "busy (queue full, uploads or connections at their limit, another slide running, the upload could not be "
            "stored) or shutting down; Retry-After says when to try again"}
EVERY = (400, 401, 421, 503)  # the Guard's and uvicorn's, on every route
BYTES = {"type": "string", "format": "binary", "minLength": 1}  # an empty upload is a 400
UPLOAD = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": BYTES}, "required": ["file"]}},
    "application/octet-stream": {"schema": BYTES}}}


PLAIN = {"text/plain": {"schema": {"type": "string"}}}  # uvicorn's own 503 beyond --max-connections
PAGE = {"text/html": {"schema": {"type": "string"}}}  # the page's 401, which asks for the token


def responses(*codes: int, page: bool = False) -> dict[int | str, dict[str, Any]]:
    """FastAPI's ``responses=`` for a route answering ``codes`` besides EVERY and its success (``page``: the page,
    whose 401 is the page itself)."""
    out: dict[int | str, dict[str, Any]] = {code: {"description": WHY[code], **ERROR} for code in sorted({*EVERY,
                                                                                                          *codes})}
    out[503] = {"description": WHY[503], "content": ERROR["content"] | PLAIN}
    if page:
        out[401] = {"description": WHY[401], "content": PAGE}
    return out


def upload(*codes: int) -> dict[str, Any]:
    """The route arguments of an upload route: its request body and its answers."""
    return {"responses": responses(*codes), "openapi_extra": {"requestBody": UPLOAD}}


async def bad_parameters(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    said = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": f"bad parameters: {said}"}, status_code=400)


def http_errors(routes: list[BaseRoute]) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """Starlette's 404 and 405 in the server's {"error": ...} form; a 405's Allow lists the methods of every one of
    ``routes`` whose path matches (Starlette's names the first such route's only)."""

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(sorted({m for r in routes if r.matches(request.scope)[0] != Match.NONE
                                                 for m in getattr(r, "methods", None) or ()}))
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=headers)

    return http_error


def install(app: FastAPI, contract: Contract, routes: list[BaseRoute]) -> None:
    """Parameter errors as 400, Starlette's errors as {"error": ...} with a true Allow (``routes``: the server's),
    and the schema without the 422 FastAPI adds to every route with parameters (the routes that answer 422 say so
    themselves), with the range of magnifications the slide route accepts for this model (slide_jobs'
    MIN_FACTOR..MAX_FACTOR of it)."""
    app.add_exception_handler(RequestValidationError, bad_parameters)
    app.add_exception_handler(HTTPException, http_errors(routes))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema["paths"].values():
                for op in path.values():
                    if op["responses"].get("422", {}).get("description") == "Validation Error":
                        del op["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            if contract.magnification:
                for param in schema["paths"]["/v1/slide"]["post"]["parameters"]:
                    if param["name"] == "magnification":
                        number = next(s for s in param["schema"]["anyOf"] if s.get("type") == "number")
                        number.pop("exclusiveMinimum", None)
                        number |= {"minimum": MIN_FACTOR * contract.magnification,
                                   "maximum": MAX_FACTOR * contract.magnification}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
