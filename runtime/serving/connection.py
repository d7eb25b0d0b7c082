"""Time limits on a client's connection, which uvicorn does not set by itself: a request's headers must arrive
within HEADER_TIMEOUT_S of the connection (or of the previous answer on a kept-alive one), else the connection is
closed; the server's body reader (runtime/apps/serve.py) waits at most BODY_CHUNK_TIMEOUT_S for each next piece of
a body (408 otherwise). A slow client therefore holds a socket for seconds, not for ever, and uvicorn's
``limit_concurrency`` (the server's --max-connections) bounds how many it may hold at once."""
from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0  # a whole request head; an ordinary client sends it in one packet
BODY_CHUNK_TIMEOUT_S = 30.0  # between two pieces of a body: a stalled upload, not a slow link (50 MB at 2 Mbit/s
# arrives in pieces of 64 KB every 0.25 s)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        self._header_timer = None

    def _expired(self) -> None:
        # Their state is IDLE until a whole request head has arrived (then SEND_BODY, DONE): a request in progress
        # is never cut off here.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


async def next_chunk(stream: Any, timeout: float = BODY_CHUNK_TIMEOUT_S) -> bytes | None:
    """The next piece of a request body (None at its end); TimeoutError when none comes within ``timeout``."""
    try:
        return await asyncio.wait_for(anext(stream), timeout)
    except StopAsyncIteration:
        return None
