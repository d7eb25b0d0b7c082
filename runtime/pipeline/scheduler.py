"""The field scheduler: fields of consecutive images batched together up to the batch size (only the fields of
the batch in progress are preprocessed), each image charged its share of the time, results released in input
order. A NaN or inf output makes that image an error, never a verdict (NaN > 0.5 is False: "Benign"). With a
re-check (recheck.py), a batch's fields inside the precision's band are classified again at FP32 when the batch is
collected, together, and FP32's probability is theirs; a re-check that fails is their image's error. Every other
failure inside a batch (preprocessing, a run that raised or a server that stayed down or full past its retries, an
output of the wrong length, the re-check's host copy) is the error of that batch's images only: every other image
gets its verdict.

With a preprocessor of two slots (double-buffered, the GPU paths) batch k+1 is preprocessed into one slot while
batch k runs from the other in a runner thread, and a batch's re-checks run in a thread of their own, so that FP32
on the side does not hold up the GPU's batches: the loop waits for an image's re-check only at the end of the input
or once 4 batches' images wait behind it (memory stays bounded). With one slot (the CPU path, where FP32 would
compete for the same cores) the three take turns in this thread. Each image is charged its share of the re-check's
time (``timings_ms["recheck"]``) wherever it had one."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from runtime.model.manifest import Contract
from runtime.pipeline.decoding import Prepared
from runtime.pipeline.preprocessors import Outputs, Preprocessor
from runtime.pipeline.recheck import Recheck
from runtime.pipeline.results import Result


@dataclass
class _Job:
    item: Prepared
    probs: list[np.ndarray] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)  # "field 3: probability nan, logit inf", ...
    fast: dict[int, float] = field(default_factory=dict)  # re-checked field -> the fast tier's probability
    rechecks: list[_Rechecked] = field(default_factory=list)  # re-checks holding fields of this image
    recheck_error: str | None = None
    run_error: str | None = None  # a batch holding some of its fields could not be run
    staged: int = 0  # fields handed to a batch so far
    done: int = 0  # fields inferred so far
    t_pre: float = 0.0
    t_infer: float = 0.0
    t_recheck: float = 0.0

    @property
    def todo(self) -> int:
        return self.item.n_fields - self.staged


@dataclass
class _Rechecked:
    """One batch's re-check: FP32's probabilities (and the seconds they took) on its way, for the in-band fields of
    ``where`` (image, their places in ``probs``, their indices in the image); ``apply`` waits for it (once) and
    writes it into ``probs``, whose slices the images hold, or makes it their error."""

    result: Future  # (probabilities, seconds)
    probs: np.ndarray
    where: list[tuple[_Job, np.ndarray, np.ndarray]]
    applied: bool = False

    def apply(self) -> None:
        if self.applied:
            return
        self.applied = True
        try:
            fp32, seconds = self.result.result()
        except Exception as e:  # any failure of the reference: those images get no verdict, never the fast label
            for j, _, _ in self.where:
                j.recheck_error = _why(e)
            return
        n = sum(len(b) for _, b, _ in self.where)
        m = 0
        for j, in_batch, in_image in self.where:
            j.t_recheck += seconds * len(in_batch) / n
            for b, i in zip(in_batch, in_image):
                j.fast[int(i)] = float(self.probs[b])
                self.probs[b] = fp32[m]
                m += 1


def _why(e: BaseException) -> str:
    """An exception in one line, as an image's error quotes it."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


@dataclass
class _Batch:
    owners: list[tuple[_Job, int]]  # (image, fields of it), in batch order
    n: int
    t_pre: float
    outputs: Future  # (outputs, seconds the run took)


class FieldScheduler:
    def __init__(self, preprocessor: Preprocessor, batch_size: int, contract: Contract, runs_on: str,
                 recheck: Recheck | None = None, withhold: bool = False) -> None:
        self.preprocessor, self.batch_size, self.contract = preprocessor, batch_size, contract
        self.runs_on = runs_on  # "backend X, precision Y": what a non-finite output's error names
        self.recheck = recheck
        self.withhold = withhold  # a field with a quality flag gets no label (--qc withhold)
        self.next_slot = 0
        self.window = 4 * batch_size  # images held at most behind one whose re-check still runs

    def run(self, items: Iterable[Prepared]) -> Iterator[Result]:
        """Results in input order; memory bounded by the batches in flight and what ``items`` holds ahead."""
        queue: list[_Job] = []
        flight: deque[_Batch] = deque()
        with ThreadPoolExecutor(1, thread_name_prefix="runner") as runner, \
                ThreadPoolExecutor(1, thread_name_prefix="recheck") as checker:
            for item in items:
                queue.append(_Job(item))
                while sum(j.todo for j in queue) >= self.batch_size:
                    self._stage(queue, flight, runner, checker)
                    yield from self._pop_finished(queue)
                yield from self._pop_finished(queue)
            while any(j.todo > 0 for j in queue):
                self._stage(queue, flight, runner, checker)
            while flight:
                self._collect(flight.popleft(), checker)
            yield from self._pop_finished(queue, flush=True)

    def _stage(self, queue: list[_Job], flight: deque[_Batch], runner: ThreadPoolExecutor,
               checker: ThreadPoolExecutor) -> None:
        """Preprocess up to batch_size pending fields (of one or several images) into a free slot and start its
        run; with every slot busy, the oldest batch is collected first (its slot is the one reused). A
        preprocessing that fails is the batch's failure, collected as a run's."""
        slots = self.preprocessor.slots
        if len(flight) >= slots:
            self._collect(flight.popleft(), checker)
        owners, n = [], 0
        for j in queue:
            take = min(j.todo, self.batch_size - n)
            if take > 0:
                owners.append((j, take))
                n += take
            if n == self.batch_size:
                break
        images, plans = [], []
        for j, take in owners:
            pixels = j.item.gpu if j.item.gpu is not None else j.item.bgr
            assert j.item.plan is not None and pixels is not None
            images.append(pixels)
            plans.append(replace(j.item.plan, field_origins=j.item.plan.field_origins[j.staged:j.staged + take]))
            j.staged += take
        slot, self.next_slot = self.next_slot, (self.next_slot + 1) % slots
        t0 = time.perf_counter()
        done: Future = Future()
        try:
            self.preprocessor.stage(images, plans, n, slot)
        except Exception as e:  # collected below as the batch's failure, as a run's
            done.set_exception(e)
        t_pre = time.perf_counter() - t0
        if not done.done() and slots == 1:  # in series: nothing to overlap with
            _settle(done, self._timed_run, n, slot)
        elif not done.done():
            done = runner.submit(self._timed_run, n, slot)
        flight.append(_Batch(owners, n, t_pre, done))
        if slots == 1:
            self._collect(flight.popleft(), checker)

    def _timed_run(self, n: int, slot: int) -> tuple[Outputs, float]:
        t0 = time.perf_counter()
        outs = self.preprocessor.run(n, slot)
        return outs, time.perf_counter() - t0

    def _collect(self, batch: _Batch, checker: ThreadPoolExecutor) -> None:
        """Wait for a batch's outputs, start the re-check of its in-band fields and charge each image its share;
        anything that fails here (the run, outputs of the wrong length) is the error of this batch's images."""
        try:
            outs, seconds = batch.outputs.result()
            outs = {name: np.asarray(v).reshape(-1) for name, v in outs.items()}
            short = {name: v.size for name, v in outs.items() if v.size < batch.n}
            if "probability" not in outs or short:
                raise ValueError(f"the backend answered {batch.n} fields with "
                                 f"{', '.join(f'{v} {k}' for k, v in short.items()) or 'no probability'}")
            outs = {name: v[:batch.n] for name, v in outs.items()}
            finite = np.logical_and.reduce([np.isfinite(v) for v in outs.values()])
            probs = np.array(outs["probability"], np.float32)
        except Exception as e:  # each backend fails in its own types; the other batches' images are not its concern
            for j, take in batch.owners:
                j.run_error = j.run_error or _why(e)
                j.done += take
            return
        if self.recheck is not None:
            self._recheck(batch, probs, self.recheck.select(probs) & finite, checker)
        k = 0
        for j, take in batch.owners:
            j.probs.append(probs[k:k + take])  # a view: a re-check's answers land in it when applied
            j.non_finite += [f"field {j.done + i}: " + ", ".join(f"{name} {v[k + i]}" for name, v in outs.items())
                             for i in range(take) if not finite[k + i]]
            j.done += take
            j.t_pre += batch.t_pre * take / batch.n
            j.t_infer += seconds * take / batch.n
            k += take

    def _recheck(self, batch: _Batch, probs: np.ndarray, inside: np.ndarray, checker: ThreadPoolExecutor) -> None:
        """Start FP32 on the batch's in-band fields (in ``checker`` on the GPU paths, here on the CPU path); each
        image with such a field holds the re-check, applied to ``probs`` before its result is released. A failure,
        host copy included, is the error of every image that had a field to re-check."""
        assert self.recheck is not None
        if not inside.any():
            return
        recheck, where = self.recheck, []
        k = 0
        for j, take in batch.owners:
            idx = np.flatnonzero(inside[k:k + take])
            if idx.size:
                where.append((j, k + idx, j.done + idx))
            k += take

        def fp32(images: list[np.ndarray], plans: list, t0: float) -> tuple[np.ndarray, float]:
            got = recheck.run(images, plans)
            if not np.isfinite(got).all():
                raise ValueError(f"fp32 gave a non-finite probability ({got[~np.isfinite(got)][0]})")
            return got, time.perf_counter() - t0

        result: Future = Future()
        t0 = time.perf_counter()
        try:  # the pixels come to the host here (a GPU image's copy needs this thread's context)
            images, plans = [], []
            for j, _, in_image in where:
                assert j.item.plan is not None
                pixels = j.item.gpu if j.item.gpu is not None else j.item.bgr
                assert pixels is not None
                images.append(self.preprocessor.host_pixels(pixels))
                plans.append(replace(j.item.plan, field_origins=j.item.plan.field_origins[in_image]))
        except Exception as e:
            result.set_exception(e)
        if not result.done() and self.preprocessor.slots == 1:  # the CPU path: FP32 would take the same cores
            _settle(result, fp32, images, plans, t0)
        elif not result.done():
            result = checker.submit(fp32, images, plans, t0)
        rechecked = _Rechecked(result, probs, where)
        for j, _, _ in where:
            j.rechecks.append(rechecked)

    def _pop_finished(self, queue: list[_Job], flush: bool = False) -> Iterator[Result]:
        """Release the finished images at the head of the queue. One whose re-check still runs (the GPU paths) is
        waited for only at the end (``flush``) or once more than ``window`` images wait behind it: until then the
        next batches go on."""
        while queue and queue[0].done >= queue[0].item.n_fields:
            if not (flush or len(queue) > self.window or all(r.result.done() for r in queue[0].rechecks)):
                return
            j = queue.pop(0)
            for rechecked in j.rechecks:
                rechecked.apply()
            res = j.item.result
            if j.run_error is not None:
                res.error = f"{res.path}: its fields could not be classified ({j.run_error}): no verdict"
            elif j.non_finite:
                res.error = (f"{res.path}: the model gave a non-finite output ({'; '.join(j.non_finite)}) on "
                             f"{self.runs_on}: no verdict")
            elif j.recheck_error is not None:
                res.error = (f"{res.path}: a field within the re-check band could not be classified again at fp32 "
                             f"({j.recheck_error}): no verdict")
            elif res.error is None:
                assert j.item.plan is not None
                res.finish(j.item.plan, np.concatenate(j.probs), self.contract, j.fast, j.item.quality,
                           self.withhold)
                res.timings_ms["preprocess"] = j.t_pre * 1e3
                res.timings_ms["inference"] = j.t_infer * 1e3
                if j.rechecks:
                    res.timings_ms["recheck"] = j.t_recheck * 1e3
                res.timings_ms["total"] = sum(res.timings_ms.values())
            if j.item.bgr is not None:
                self.preprocessor.release(j.item.bgr)  # its fields are inferred: the buffer may take the next image
            j.item.bgr = j.item.gpu = None  # release the pixels as soon as the image is done
            yield res


def _settle(future: Future, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` here, its result or its exception into ``future`` (as a worker thread would)."""
    try:
        future.set_result(fn(*args))
    except Exception as e:
        future.set_exception(e)
