"""One worker thread owns the classifier; HTTP requests hand it named images and wait on futures.

Bounded: at most ``max_pending`` fields wait (a request beyond that gets Busy, the server's 503 + Retry-After; a
slide job waits for room instead).
Fair: the worker takes waiting images smallest first (by fields), so one large image cannot starve small ones; the
wait of a small request is bounded by the one batch in progress. Cancellable: an image whose client has gone is
dropped before it is classified. ``stop`` cancels everything still waiting (graceful shutdown).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from runtime.pipeline.classifier import Classifies
from runtime.pipeline.decoding import Input


class Busy(Exception):
    """The queue is full (or the server is stopping); try again later."""


@dataclass(order=True)
class _Job:
    fields: int
    seq: int
    item: Input = field(compare=False)
    future: Future = field(compare=False)


class Batcher:
    def __init__(self, clf: Classifies, max_pending: int = 128, max_items: int = 16) -> None:
        self.clf, self.max_pending, self.max_items = clf, max_pending, max_items
        self.budget = max(getattr(clf, "batch_size", 1), 1) * 4  # fields per worker round, beyond the first image
        self.jobs: list[_Job] = []
        self.pending = 0  # fields waiting or in progress
        self.cond = threading.Condition()
        self.stopping = False
        self.seq = 0
        self.dropped = 0  # images whose client had gone before they were classified
        self.thread = threading.Thread(target=self._work, name="classifier", daemon=True)
        self.thread.start()

    def submit(self, item: Input, fields: int, wait: float = 0.0, cancelled: threading.Event | None = None) -> Future:
        """Queue one image of ``fields`` fields. When the bound would be exceeded: Busy at once, or, with
        ``wait`` (seconds), once room has not come in that time (a background job's way: it waits its turn
        instead of failing). ``cancelled`` ends such a wait early, with Busy."""
        fut: Future = Future()
        deadline = time.monotonic() + wait
        with self.cond:
            while not self.stopping and self.pending and self.pending + fields > self.max_pending:
                left = deadline - time.monotonic()
                if left <= 0 or (cancelled is not None and cancelled.is_set()):
                    raise Busy(f"{self.pending} fields are waiting (limit {self.max_pending})" +
                               (f"; no room came within {wait:g} s" if wait else ""))
                self.cond.wait(min(left, 0.25))
            if self.stopping:
                raise Busy("the server is shutting down")
            self.seq += 1
            self.jobs.append(_Job(fields, self.seq, item, fut))
            self.pending += fields
            self.cond.notify()
        return fut

    def _take(self) -> list[_Job]:
        with self.cond:
            while not self.jobs and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return []
            self.jobs.sort()  # smallest first, then oldest first
            take: list[_Job] = []
            n = 0
            while self.jobs and len(take) < self.max_items and (not take or n + self.jobs[0].fields <= self.budget):
                job = self.jobs.pop(0)
                if job.future.set_running_or_notify_cancel():  # False: its client has gone
                    take.append(job)
                    n += job.fields
                else:
                    self.pending -= job.fields
                    self.dropped += 1
                    self.cond.notify_all()  # room for whoever waits to submit
            return take

    def _work(self) -> None:
        while not self.stopping:
            jobs = self._take()
            if not jobs:
                continue
            try:
                for job, res in zip(jobs, self.clf.classify([j.item for j in jobs])):
                    job.future.set_result(res)
            except Exception as e:  # never leave a request waiting forever
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
            finally:
                with self.cond:
                    self.pending -= sum(j.fields for j in jobs)
                    self.cond.notify_all()  # room for whoever waits to submit

    def stop(self) -> None:
        """Refuse new work and cancel what is still waiting; the batch in progress finishes."""
        with self.cond:
            self.stopping = True
            for job in self.jobs:
                job.future.cancel()
            self.jobs.clear()
            self.cond.notify_all()
