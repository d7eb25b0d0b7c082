"""The server's front door, as pure ASGI middleware (so that handlers still see their client's disconnect): which
requests reach the routes at all, and the headers every answer carries.

Refused before any route runs: a Host header this server does not answer to (421: DNS rebinding), a malformed Host
or Origin (400), a request without one of the bearer tokens where the server has them (401; the page itself comes
with 401 and asks for the token), a browser POST/DELETE from another origin or without the page's token (403), and
every scope but HTTP and the lifespan (a websocket is closed before it is accepted). A refusal reads at most
REFUSAL_DRAIN bytes of what the client sends. Every answer carries SECURITY_HEADERS (the page's script is a file of
this server's: no inline script, nothing from another origin, never framed). An unexpected exception becomes a 500
without a traceback."""
from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from fastapi.responses import HTMLResponse, JSONResponse
from starlette.requests import ClientDisconnect

from runtime.serving import auth

CLOSED = 499  # the client went away before its answer (nginx's code); not a server error
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::")
PUBLIC = ("/healthz", "/static/app.js", "/static/app.css")  # no token needed: liveness and the page's own files
REFUSAL_DRAIN = 1 << 20  # bytes of a refused request's body read (and dropped) so that an ordinary client, which
# sends its whole request before it reads, receives the refusal; a larger upload is cut off instead
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = ((b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"))


class Malformed(ValueError):
    """A Host or Origin header that is not a host name (with an optional port)."""


def allowed_hosts(host: str, extra: list[str]) -> set[str]:
    """Host header names this server answers to: the bound address and --allowed-host names, and the loopback
    names where it is bound to loopback or to every interface. On a wildcard bind an IP address in the Host header
    is also accepted (``host_allowed``): DNS rebinding needs a name, and the address a client dialled is not one."""
    names = {host, *extra} | (set(LOCAL_NAMES) if host in LOCAL_NAMES + WILDCARDS else set())
    return {n.lower().strip("[]") for n in names} - set(WILDCARDS)


def host_name(value: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:80' -> '::1'; Malformed for anything that is not a host[:port]."""
    try:
        parts = urlsplit("//" + value)
        name, _ = parts.hostname, parts.port  # .port raises ValueError for a port that is not one
    except ValueError as e:
        raise Malformed(str(e)) from None
    if not name or parts.path or parts.query or parts.fragment or parts.username is not None or any(
            c.isspace() or not c.isprintable() for c in value):
        raise Malformed(f"not a host name: {value[:80]!r}")
    return name.lower()


def host_allowed(name: str, hosts: set[str], wildcard: bool) -> bool:
    if name in hosts:
        return True
    if not wildcard:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """See the module's docstring. ``hosts``: allowed_hosts(...); ``wildcard``: bound to every interface;
    ``page``: the page (HTML) sent with the 401 that asks for a token; ``record``: called with (path, status, ms)
    of each HTTP answer."""

    def __init__(self, app: Any, hosts: set[str], wildcard: bool, token: str, page: str,
                 record: Callable[[str, int, float], None], bearer_tokens: tuple[bytes, ...] = ()) -> None:
        self.app, self.hosts, self.wildcard, self.token, self.page = app, hosts, wildcard, token, page
        self.record, self.bearer_tokens = record, bearer_tokens

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # no route takes one: closed before it is accepted (the client sees 403)
            await receive()
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            raise RuntimeError(f"unsupported ASGI scope {scope['type']!r}")

        async def secure_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            code, msg, extra = refusal
            await self.drain(receive)
            close = {"Connection": "close"}  # else uvicorn would read (and drop) the rest of the body to keep it alive
            answer = HTMLResponse(self.page, status_code=401, headers=close) if msg is None else \
                JSONResponse({"error": msg}, status_code=code, headers=extra | close)
            return await answer(scope, receive, secure_send)
        t0, status = time.perf_counter(), [CLOSED]

        async def send_status(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await secure_send(message)

        try:
            await self.app(scope, receive, send_status)
        except ClientDisconnect:
            status[0] = CLOSED
        except Exception as e:  # noqa: BLE001 - the last guard: a bug must not take the server down or leak a traceback
            status[0] = 500
            await JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)(
                scope, receive, secure_send)
        self.record(scope["path"], status[0], (time.perf_counter() - t0) * 1e3)

    def refusal(self, scope: dict) -> tuple[int, str | None, dict[str, str]] | None:
        """(status, message, headers) of the refusal, None to let the request in (message None: the page's 401)."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host", ""), headers.get("origin")
        try:
            name = host_name(host)
            # "null" (a sandboxed or local document) is an origin, and never this server's
            origin_name = None if origin is None else "" if origin == "null" else host_name(urlsplit(origin).netloc)
        except ValueError as e:  # Malformed, or what urlsplit says of an Origin that is not a URL
            return 400, f"malformed Host or Origin header ({e})", {}
        if not host_allowed(name, self.hosts, self.wildcard):
            return 421, f"this server does not answer to Host {host[:100]!r}", {}
        if self.bearer_tokens and scope["path"] not in PUBLIC and not auth.allows(
                self.bearer_tokens, auth.bearer(headers.get("authorization"))):
            if scope["path"] == "/" and scope["method"] == "GET":
                return 401, None, {}
            return 401, "this server needs 'Authorization: Bearer TOKEN' (a token from its --token-file)", {
                "WWW-Authenticate": 'Bearer realm="breakhis-edge"'}
        if scope["method"] in ("POST", "DELETE") and origin is not None and (
                origin_name != name or headers.get("x-breakhis-token") != self.token):
            return 403, "cross-origin request refused (use the page served here, or a client without Origin)", {}
        return None

    @staticmethod
    async def drain(receive: Any) -> None:
        """Read (and drop) up to REFUSAL_DRAIN bytes of what the client is still sending."""
        n = 0
        while n <= REFUSAL_DRAIN:
            message = await receive()
            n += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                break
