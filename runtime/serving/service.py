"""What the server's routes share (`Service`: the classifier behind its queue, the slide jobs, the page's token),
the limits one request and all requests together may reach (`Limits`), and the request metrics."""
from __future__ import annotations

import asyncio
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.pipeline.classifier import Classifier
from runtime.serving.connection import BODY_CHUNK_TIMEOUT_S
from runtime.serving.guard import CLOSED
from runtime.serving.request_queue import Batcher
from runtime.serving.slide_jobs import SlideJobs

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
SERVE_MAX_PIXELS = 16_000_000  # per request: 4x a 2048x2048 camera frame (the CLI allows 64 MP)
SERVE_MAX_FIELDS = 32  # per request: a bound on the inference one request can ask for
MAX_PENDING_FIELDS = 128  # waiting in the queue, all requests together: beyond it, 503
MAX_UPLOADS = 4  # uploads held in memory at once (docs/user-guide.md: the memory bound); more wait for a turn
UPLOAD_WAIT_S = 30.0  # how long an upload waits for its turn before 503
MAX_CONNECTIONS = 64  # uvicorn's limit_concurrency: connections and requests at once; beyond it, 503
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


DEFAULT_LIMITS = Limits()  # frozen: the one default every app without its own limits shares


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

    def __post_init__(self) -> None:
        # a long-running service: the re-checks' FP32 reference opened (and run once) now, before the first request,
        # so that the first borderline image does not wait for it, and one that cannot run stops the start
        self.clf.open_recheck()
