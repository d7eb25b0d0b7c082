"""Slide jobs of the server under ordinary load, in process with the real classifier and batcher: a slide waits for
room in a queue smaller than itself instead of failing, and a job that fails or is cancelled withdraws what it
queued (nothing of it is classified afterwards, the queue's count returns to zero)."""
from __future__ import annotations

import threading
import time

import pytest

from benchmarks.synthetic_slide import write_mosaic
from runtime.pipeline.classifier import Classifier
from runtime.serving.request_queue import Batcher
from runtime.serving.slide_jobs import SlideJobs

OPTIONS = {"aggregate": "max", "top_k": 3, "tissue_mask": True, "scale": None}


@pytest.fixture(scope="module")
def slide6(images_100x, tmp_path_factory):
    path = tmp_path_factory.mktemp("slide") / "six.tif"
    write_mosaic(path, [images_100x[0:3], images_100x[3:6]], levels=1)  # 6 tissue fields
    return path.read_bytes()


@pytest.fixture(scope="module")
def clf(model_dir):
    with Classifier(model_dir, backend="cpu") as c:
        yield c


class Counting:
    """The real classifier, slowed and counted (what reaches inference is what is under test)."""

    def __init__(self, clf, delay=0.0, fail=False):
        self.clf, self.delay, self.fail, self.items = clf, delay, fail, 0
        self.contract, self.max_pixels, self.model_info = clf.contract, clf.max_pixels, clf.model_info
        self.started = threading.Event()

    def classify(self, items):
        self.started.set()
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("the inference worker died")
        self.items += len(items)
        return self.clf.classify(items)


def _finish(job, timeout=120):
    end = time.monotonic() + timeout
    while job.state == "running" and time.monotonic() < end:
        time.sleep(0.05)
    return job


def _drained(batcher, timeout=10):
    end = time.monotonic() + timeout
    while batcher.pending and time.monotonic() < end:
        time.sleep(0.05)
    return batcher.pending == 0


def test_a_slide_larger_than_the_queue_waits_for_room_and_finishes(clf, slide6):
    batcher = Batcher(clf, max_pending=2)  # smaller than the slide's 6 fields
    try:
        job = _finish(SlideJobs(clf, batcher).start(slide6, "six.tif", OPTIONS))
        assert job.state == "done", job.error
        assert job.result["counts"]["classified"] == 6 and job.result["counts"]["errors"] == 0
        assert _drained(batcher)
    finally:
        batcher.stop()


def test_a_cancelled_job_withdraws_what_it_queued(clf, slide6):
    slow = Counting(clf, delay=0.5)
    batcher = Batcher(slow, max_pending=3)
    jobs = SlideJobs(slow, batcher)
    try:
        job = jobs.start(slide6, "six.tif", OPTIONS)
        assert slow.started.wait(30)
        jobs.cancel(job.id)
        assert _finish(job).state == "cancelled" and job.error == "six.tif: cancelled"
        assert _drained(batcher)
        time.sleep(1.0)  # nothing of it is classified afterwards
        assert slow.items < 6 and batcher.pending == 0
        again = _finish(jobs.start(slide6, "six.tif", OPTIONS))  # the queue is usable again
        assert again.state == "done", again.error
    finally:
        batcher.stop()


def test_a_failed_job_withdraws_what_it_queued(clf, slide6):
    broken = Counting(clf, fail=True)
    batcher = Batcher(broken, max_pending=3)
    try:
        job = _finish(SlideJobs(broken, batcher).start(slide6, "six.tif", OPTIONS))
        assert job.state == "error" and job.error == "six.tif: internal error: RuntimeError"
        assert _drained(batcher) and broken.items == 0
    finally:
        batcher.stop()
