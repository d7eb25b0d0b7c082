"""Slide jobs for the server: one slide at a time, in a thread of its own, its fields sent through the same fair
batcher as every other request (so single images still get through between its chunks), its progress readable
while it runs, the upload kept in a temporary file (a TIFF is read tile by tile) and deleted when it is done."""
from __future__ import annotations

import base64
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, TimeoutError
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from runtime.apps.request_queue import Batcher, Busy
from runtime.apps.slide import classify_slide
from runtime.errors import BreakhisError
from runtime.pipeline.classifier import Classifies
from runtime.pipeline.decoding import Input
from runtime.pipeline.results import Result

ROOM_WAIT_S = 600.0  # how long a slide's next field may wait for room in the queue before the job fails


class Cancelled(Exception):
    """The job was cancelled (DELETE /v1/slide/ID, or the server stopping)."""


class BatchedClassifier:
    """What classify_slide needs of a Classifier, with classify() going through the server's batcher: each field
    waits for room in the queue (bounded by ``ROOM_WAIT_S``) rather than failing the job, and a chunk that fails
    or is cancelled withdraws whatever of it is still queued."""

    def __init__(self, clf: Classifies, batcher: Batcher, cancelled: threading.Event) -> None:
        self.contract, self.max_pixels, self.model_info = clf.contract, clf.max_pixels, clf.model_info
        self.batcher, self.cancelled = batcher, cancelled

    def classify(self, items: Sequence[Input]) -> list[Result]:
        futures: list[Future] = []
        try:
            for item in items:
                if self.cancelled.is_set():
                    raise Cancelled("cancelled")
                futures.append(self.batcher.submit(item, 1, wait=ROOM_WAIT_S, cancelled=self.cancelled))
            results = []
            for f in futures:
                while True:
                    try:
                        results.append(f.result(timeout=0.25))
                        break
                    except TimeoutError:
                        if self.cancelled.is_set():
                            raise Cancelled("cancelled") from None
            return results
        except BaseException:
            for f in futures:
                f.cancel()  # still waiting: dropped before it is classified
            if self.cancelled.is_set():
                raise Cancelled("cancelled") from None
            raise


@dataclass
class SlideJob:
    id: str
    name: str
    state: str = "running"  # "running", "done", "error" or "cancelled"
    done: int = 0  # tissue fields classified so far
    total: int = 0
    result: dict[str, Any] | None = None  # the slide's JSON plus "geojson", "csv" and "overlay_png" (base64)
    error: str | None = None
    started: float = field(default_factory=time.time)

    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cancel"}


class SlideJobs:
    def __init__(self, clf: Classifies, batcher: Batcher, keep: int = 8) -> None:
        self.clf, self.batcher = clf, batcher
        self.jobs: dict[str, SlideJob] = {}
        self.keep = keep
        self.lock = threading.Lock()

    def start(self, data: bytes, name: str, options: dict[str, Any]) -> SlideJob:
        """Start classifying an uploaded slide; Busy while another one runs."""
        with self.lock:
            if any(j.state == "running" for j in self.jobs.values()):
                raise Busy("another slide is being classified")
            job = SlideJob(secrets.token_urlsafe(12), name)
            self.jobs[job.id] = job
            for old in sorted(self.jobs.values(), key=lambda j: j.started)[:-self.keep]:
                del self.jobs[old.id]
        # On disk the client's name keeps only safe characters (its suffix picks the reader, a BreakHis name states
        # the magnification), in a folder of its own: the name is never a path.
        folder = Path(tempfile.mkdtemp(prefix="breakhis-slide-"))
        path = folder / (re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).name)[-100:].lstrip(".") or "upload.img")
        path.write_bytes(data)
        threading.Thread(target=self._run, args=(job, path, options), name="slide", daemon=True).start()
        return job

    def get(self, job_id: str) -> SlideJob | None:
        with self.lock:
            return self.jobs.get(job_id)

    def cancel(self, job_id: str) -> SlideJob | None:
        """Ask a running job to stop: what it queued is withdrawn, its state becomes "cancelled"."""
        job = self.get(job_id)
        if job is not None:
            job.cancel.set()
        return job

    def stop(self) -> None:
        """Cancel every running job (the server is stopping)."""
        with self.lock:
            for job in self.jobs.values():
                job.cancel.set()

    def _run(self, job: SlideJob, path: Path, options: dict[str, Any]) -> None:
        overlay = path.with_suffix(".overlay.png")

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        proxy = BatchedClassifier(self.clf, self.batcher, job.cancel)
        try:
            res = classify_slide(proxy, path, overlay=overlay, progress=progress, name=job.name,  # type: ignore[arg-type]
                                 **options)
            out = res.to_dict() | {"geojson": res.geojson(), "csv": res.csv(),
                                   "overlay_png": base64.b64encode(overlay.read_bytes()).decode()}
            job.total = job.done = res.counts["classified"]
            job.result, job.state = out, "done"
        except Cancelled:
            job.error, job.state = f"{job.name}: cancelled", "cancelled"
        except (BreakhisError, Busy, ValueError) as e:
            job.error, job.state = f"{job.name}: {e}", "error"
        except Exception as e:  # noqa: BLE001 - a job must end in a state the client can read
            job.error, job.state = f"{job.name}: internal error: {type(e).__name__}", "error"
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
