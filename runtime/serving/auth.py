"""Who may use the server and how it is reached: bearer tokens from a file, compared in constant time, the rule for
binding to a network, and the TLS files checked before the server starts. The server's guard
(runtime/serving/guard.py) asks ``allows`` of every request but ``/healthz``.

Files readable by other local users: a TLS private key is refused (``check_tls``): whoever reads it can pose as the
server to every client until the certificate expires, and nothing in the server's answers would show it. A token
file is warned about (``readable_warning``), not refused: a token is revoked by deleting its line (the server reads
the file at start), the same file is often shared by the lab's clients and our Triton server under one service
group, and a refusal would stop a running lab set-up on upgrade; the warning names the file and the chmod that
fixes it. Tokens sent over plain HTTP beyond loopback are warned about (``plain_http_warning``)."""
from __future__ import annotations

import hashlib
import hmac
import os
import ssl
import stat
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
    """Whether ``presented`` is one of ``tokens``: the sha256 digests (32 bytes whatever the lengths) of every token
    compared in constant time, so that the time says neither how much of a token matched, nor which one, nor how
    long the tokens are."""
    digest = hashlib.sha256(presented or b"").digest()
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(hashlib.sha256(token).digest(), digest)
    return ok and presented is not None


def readable_by_others(path: Path) -> bool:
    """Whether users other than the owner and its group may read ``path`` (its mode has o+r)."""
    return bool(path.stat().st_mode & stat.S_IROTH)


def readable_warning(path: Path) -> str | None:
    """A warning (the module says why it is not a refusal) where other local users can read the token file."""
    if not readable_by_others(path):
        return None
    return (f"WARNING: {path}: the token file is readable by every local user (mode "
            f"{stat.S_IMODE(path.stat().st_mode):o}), who can then use this server: chmod o-r {path}")


def plain_http_warning(host: str, local: bool, has_tokens: bool, tls: bool) -> str | None:
    """A warning where bearer tokens would cross a network in clear text."""
    if local or tls or not has_tokens:
        return None
    return (f"WARNING: serving plain HTTP on {host}: the bearer tokens cross the network in clear text, readable by "
            "anyone on the path; give --tls-cert/--tls-key (or a TLS front, docs/deploy.md)")


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
    """Refuse (AuthError naming the files) a private key other local users can read, and a certificate and key
    that do not load as a pair, before the server starts rather than in its first handshake."""
    try:
        if readable_by_others(key):
            raise AuthError(f"{key}: the private key is readable by every local user (mode "
                            f"{stat.S_IMODE(os.stat(key).st_mode):o}): chmod 600 {key} (or 640 with its group)")
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise AuthError(f"{cert}, {key}: not a usable certificate and private key ({e})") from None
