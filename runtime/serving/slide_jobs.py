"""Slide jobs for the server: one slide at a time, in a thread of its own, its fields sent through the same fair
batcher as every other request (so single images still get through between its chunks), its progress readable
while it runs, the upload kept in a temporary file (a TIFF is read tile by tile) and deleted when it is done.

Bounded before any work (``admit``): the scale factor must lie within MIN_FACTOR..MAX_FACTOR of the model's and the
planned field count within ``max_fields``, else SlideRefused (the server's 413). A start that fails frees its slot
and its folder; ``stop`` (SIGTERM) cancels the jobs and removes their folders; folders of earlier runs that were
killed are removed when the server starts (``remove_stale``)."""
from __future__ import annotations

import base64
import math
import os
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

from runtime.errors import BreakhisError
from runtime.io.decode import ImageError
from runtime.io.scale import Scale, resample_factor
from runtime.io.slide_source import MAX_SLIDE_PIXELS, open_source
from runtime.model.manifest import Contract
from runtime.pipeline.classifier import Classifies
from runtime.pipeline.decoding import Input
from runtime.pipeline.results import Result
from runtime.serving.request_queue import Batcher, Busy
from runtime.slides.classify import Cancelled, classify_slide

ROOM_WAIT_S = 600.0  # how long a slide's next field may wait for room in the queue before the job fails
# Input pixels per model pixel. BreakHis itself spans 40X..400X, 0.4x..4x a 100X model's scale: beyond 4x a field
# is read from more than 16 input pixels per model pixel (a scan at a far higher magnification than the model's:
# reduce it first); below 0.25x every model pixel is made of less than a sixteenth of an input pixel (upsampled
# more than 4x: nothing the model was trained on), and the field count grows as 1/factor^2 (a 700x460 PNG at
# 0.01x would plan about 10^8 fields). So a request's or a file's scale is refused outside 0.25x..4x.
MIN_FACTOR, MAX_FACTOR = 0.25, 4.0
STALE_AGE_S = 24 * 3600  # a folder named without its server's pid (earlier versions) is stale when older than this
PREFIX = "breakhis-slide-"  # job folders: PREFIX + the server's pid + "-" + random, in the system temp folder


class SlideRefused(BreakhisError):
    """A slide the server will not plan: its scale is out of range or it has too many fields (413)."""


def default_max_fields(contract: Contract) -> int:
    """The fields of the largest slide accepted (MAX_SLIDE_PIXELS at level 0) at the model's own scale: any slide
    the pixel limit lets in fits, unless its scale asks for more fields than its pixels hold at the model's."""
    fh, fw = contract.field_size
    return MAX_SLIDE_PIXELS // (fh * fw)


def admit(path: Path, scale: Scale | None, contract: Contract, max_pixels: int, max_fields: int,
          name: str) -> int | None:
    """The planned field count of ``path``, resolved as classify_slide resolves it (the request's scale, else the
    file's); SlideRefused beyond the limits. None where the file cannot be opened: the job reports why."""
    try:
        src = open_source(path, max_pixels)
    except ImageError:
        return None
    try:
        scale = scale or src.scale
        factor, _ = resample_factor(scale, contract)
        (W, H), (fh, fw) = src.sizes[0], contract.field_size
    finally:
        src.close()
    said = f"{scale.magnification:g}X" if scale.magnification else f"{scale.mpp:g} microns per pixel" \
        if scale.mpp else "unknown"
    if not (math.isfinite(factor) and MIN_FACTOR <= factor <= MAX_FACTOR):
        raise SlideRefused(f"{name}: its scale ({said}, {scale.source}) is {factor:.3g}x the model's; this server "
                           f"reads slides at {MIN_FACTOR:g}x..{MAX_FACTOR:g}x the model's scale (state the "
                           "magnification with ?magnification=N)")
    planned = int(W // (fw * factor)) * int(H // (fh * factor))
    if planned > max_fields:
        raise SlideRefused(f"{name}: {planned:,} fields at {factor:.3g}x the model's scale is above this server's "
                           f"limit of {max_fields:,} fields per slide")
    return planned


def remove_stale(root: Path) -> list[Path]:
    """Remove the job folders in ``root`` left by servers of this user that are gone (killed before they could
    clean up): named with a pid that no longer runs, or, named by earlier versions without one, older than
    STALE_AGE_S. Another user's folders, and a running server's, are left alone. Returns what was removed."""
    removed = []
    for folder in root.glob(PREFIX + "*"):
        try:
            st = folder.lstat()
        except OSError:
            continue
        if not folder.is_dir() or folder.is_symlink() or st.st_uid != os.getuid():
            continue
        pid = folder.name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid():
            if _running(int(pid)):
                continue
        elif time.time() - st.st_mtime < STALE_AGE_S:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    folder: Path | None = field(default=None, repr=False)  # the upload's, removed when the job ends
    thread: threading.Thread | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("cancel", "folder", "thread")}


class SlideJobs:
    def __init__(self, clf: Classifies, batcher: Batcher, keep: int = 8, max_fields: int | None = None,
                 root: Path | None = None) -> None:
        self.clf, self.batcher = clf, batcher
        self.jobs: dict[str, SlideJob] = {}  # what GET /v1/slide/ID finds (DELETE forgets a job)
        self.active: SlideJob | None = None  # the one slot: the job whose thread runs, forgotten or not
        self.keep = keep
        self.max_fields = max_fields or default_max_fields(clf.contract)
        self.root = root or Path(tempfile.gettempdir())
        self.lock = threading.Lock()
        remove_stale(self.root)

    def start(self, data: bytes, name: str, options: dict[str, Any]) -> SlideJob:
        """Start classifying an uploaded slide (blocking: it writes the file; the server calls it in a thread).
        Busy while another one runs; SlideRefused beyond the limits (``admit``); OSError where the upload cannot
        be stored. Whatever stops the start frees the slot and removes the folder."""
        with self.lock:
            if self.active is not None:
                raise Busy("another slide is being classified")
            job = SlideJob(secrets.token_urlsafe(12), name)  # holds the slot while it starts
            self.jobs[job.id], self.active = job, job
            for old in sorted(self.jobs.values(), key=lambda j: j.started)[:-self.keep]:
                del self.jobs[old.id]
        try:
            # On disk the client's name keeps only safe characters (its suffix picks the reader, a BreakHis name
            # states the magnification), in a folder of its own: the name is never a path.
            job.folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=self.root))
            path = job.folder / (re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).name)[-100:].lstrip(".") or "upload.img")
            path.write_bytes(data)
            admit(path, options.get("scale"), self.clf.contract, self.clf.max_pixels, self.max_fields, name)
            job.thread = threading.Thread(target=self._run, args=(job, path, options), name="slide", daemon=True)
            job.thread.start()
        except BaseException:
            with self.lock:
                self.jobs.pop(job.id, None)
                self.active = None
            if job.folder is not None:
                shutil.rmtree(job.folder, ignore_errors=True)
            raise
        return job

    def get(self, job_id: str) -> SlideJob | None:
        with self.lock:
            return self.jobs.get(job_id)

    def cancel(self, job_id: str) -> SlideJob | None:
        """Forget a job (GET finds it no more) and, if it runs, stop it: what it queued is withdrawn, its state
        becomes "cancelled", and its slot is free once its thread has ended."""
        with self.lock:
            job = self.jobs.pop(job_id, None)
        if job is not None:
            job.cancel.set()
        return job

    def stop(self, wait: float = 10.0) -> None:
        """Cancel every running job (the server is stopping), wait up to ``wait`` seconds for them to end, and
        remove their uploads whether or not they have."""
        with self.lock:
            jobs = list(self.jobs.values()) + ([self.active] if self.active is not None else [])
        for job in jobs:
            job.cancel.set()
        deadline = time.monotonic() + wait
        for job in jobs:
            if job.thread is not None:
                job.thread.join(max(deadline - time.monotonic(), 0.0))
            if job.folder is not None:
                shutil.rmtree(job.folder, ignore_errors=True)

    def _run(self, job: SlideJob, path: Path, options: dict[str, Any]) -> None:
        overlay = path.with_suffix(".overlay.png")

        def progress(done: int, total: int) -> None:
            if job.cancel.is_set():  # between chunks: the rest of the slide is not read
                raise Cancelled("cancelled")
            job.done, job.total = done, total

        proxy = BatchedClassifier(self.clf, self.batcher, job.cancel)
        result, error, state = None, None, "done"
        try:
            res = classify_slide(proxy, path, overlay=overlay, progress=progress, name=job.name,  # type: ignore[arg-type]
                                 cancelled=job.cancel, **options)
            result = res.to_dict() | {"geojson": res.geojson(), "csv": res.csv(),
                                      "overlay_png": base64.b64encode(overlay.read_bytes()).decode()}
            job.total = job.done = res.counts["classified"]
        except Cancelled:
            error, state = f"{job.name}: cancelled", "cancelled"
        except (BreakhisError, Busy, ValueError) as e:
            error, state = f"{job.name}: {e}", "error"
        except Exception as e:  # noqa: BLE001 - a job must end in a state the client can read
            error, state = f"{job.name}: internal error: {type(e).__name__}", "error"
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
            with self.lock:  # the slot is free before the state says the job has ended
                self.active = None
            job.result, job.error, job.state = result, error, state
