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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.batcher import Batcher, Busy
from runtime.errors import BreakhisError
from runtime.slide import classify_slide


class BatchedClassifier:
    """What classify_slide needs of a Classifier, with classify() going through the server's batcher."""

    def __init__(self, clf: Any, batcher: Batcher) -> None:
        self.contract, self.max_pixels, self.model_info = clf.contract, clf.max_pixels, clf.model_info
        self.batcher = batcher

    def classify(self, items: list) -> list:
        futures = [self.batcher.submit(item, 1) for item in items]
        return [f.result() for f in futures]


@dataclass
class SlideJob:
    id: str
    name: str
    state: str = "running"  # "running", "done" or "error"
    done: int = 0  # tissue fields classified so far
    total: int = 0
    result: dict[str, Any] | None = None  # the slide's JSON plus "geojson", "csv" and "overlay_png" (base64)
    error: str | None = None
    started: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SlideJobs:
    def __init__(self, clf: Any, batcher: Batcher, keep: int = 8) -> None:
        self.proxy = BatchedClassifier(clf, batcher)
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

    def _run(self, job: SlideJob, path: Path, options: dict[str, Any]) -> None:
        overlay = path.with_suffix(".overlay.png")

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        try:
            res = classify_slide(self.proxy, path, overlay=overlay, progress=progress, name=job.name,  # type: ignore[arg-type]
                                 **options)
            out = res.to_dict() | {"geojson": res.geojson(), "csv": res.csv(),
                                   "overlay_png": base64.b64encode(overlay.read_bytes()).decode()}
            job.total = job.done = res.counts["classified"]
            job.result, job.state = out, "done"
        except (BreakhisError, Busy, ValueError) as e:
            job.error, job.state = f"{job.name}: {e}", "error"
        except Exception as e:  # noqa: BLE001 - a job must end in a state the client can read
            job.error, job.state = f"{job.name}: internal error: {type(e).__name__}", "error"
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
