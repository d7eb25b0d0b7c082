"""Who may use the server and how it is reached: bearer tokens from a file, compared in constant time, the rule for
binding to a network, and the TLS files checked before the server starts. The server (runtime/apps/serve.py) asks
``allows`` of every request but ``/healthz``."""
from __future__ import annotations

import hmac
import ssl
from pathlib import Path

from runtime.errors import BreakhisError

MIN_TOKEN_CHARS = 16  # a token is a password nobody types: python -c 'import secrets; print(secrets.token_urlsafe())'


class AuthError(BreakhisError):
    """A token file that cannot be used, or a network binding without authentication."""


def read_tokens(path: Path) -> tuple[bytes, ...]:
    """The tokens of a token file: one per line; blank lines and lines starting with # are skipped. Refused (naming
    the file and line): an unreadable or empty file, a token shorter than MIN_TOKEN_CHARS or with spaces in it."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AuthError(f"{path}: cannot read the token file ({type(e).__name__}: {e})") from None
    tokens = []
    for n, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token) or not token.isprintable():
            raise AuthError(f"{path}:{n}: a token must be at least {MIN_TOKEN_CHARS} printable characters without "
                            "spaces (make one with: python -c 'import secrets; print(secrets.token_urlsafe())')")
        tokens.append(token.encode())
    if not tokens:
        raise AuthError(f"{path}: no token in the file (one per line)")
    return tuple(tokens)


def bearer(header: str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, else None."""
    scheme, _, token = (header or "").partition(" ")
    return token.strip().encode("latin-1") if scheme.lower() == "bearer" and token.strip() else None


def allows(tokens: tuple[bytes, ...], presented: bytes | None) -> bool:
    """Whether ``presented`` is one of ``tokens``: every token compared in constant time (the time does not say how
    much of a token matched, nor which one)."""
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(token, presented or b"")
    return ok and presented is not None


def check_binding(host: str, local: bool, has_tokens: bool, insecure: bool) -> str | None:
    """None where binding ``host`` is safe, a warning where --insecure-no-auth allows it; AuthError otherwise: a
    server on anything but loopback without a token would classify for anyone who can reach it."""
    if local or has_tokens:
        return None
    if not insecure:
        raise AuthError(f"refusing to bind {host} without authentication: anyone who can reach it could use the "
                        "service. Give --token-file FILE (clients send 'Authorization: Bearer TOKEN'), or say "
                        "--insecure-no-auth")
    return f"WARNING: binding to {host} with --insecure-no-auth: anyone who can reach this address can use the service"


def check_tls(cert: Path, key: Path) -> None:
    """Refuse (AuthError naming the files) a certificate and key that do not load as a pair, before the server
    starts rather than in its first handshake."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise AuthError(f"{cert}, {key}: not a usable certificate and private key ({e})") from None
