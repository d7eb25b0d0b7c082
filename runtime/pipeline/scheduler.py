"""The field scheduler: fields of consecutive images batched together up to the batch size (only the fields of
the batch in progress are preprocessed), each image charged its share of the time, results released in input
order. A NaN or inf output makes that image an error, never a verdict (NaN > 0.5 is False: "Benign"). With a
re-check (recheck.py), a batch's fields inside the precision's band are classified again at FP32 when the batch is
collected, together, and FP32's probability is theirs; a re-check that fails is their image's error, and so is a
run that fails (a backend that raised, a server that stayed down or full past its retries): the images of that batch
get the error, every other image its verdict.

With a preprocessor of two slots (double-buffered, the GPU paths) batch k+1 is preprocessed into one slot while
batch k runs from the other in a runner thread; with one slot (the CPU path) the two take turns in this thread."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

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
    recheck_error: str | None = None
    run_error: str | None = None  # a batch holding some of its fields could not be run
    staged: int = 0  # fields handed to a batch so far
    done: int = 0  # fields inferred so far
    t_pre: float = 0.0
    t_infer: float = 0.0

    @property
    def todo(self) -> int:
        return self.item.n_fields - self.staged


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

    def run(self, items: Iterable[Prepared]) -> Iterator[Result]:
        """Results in input order; memory bounded by the batches in flight and what ``items`` holds ahead."""
        queue: list[_Job] = []
        flight: deque[_Batch] = deque()
        with ThreadPoolExecutor(1, thread_name_prefix="runner") as runner:
            for item in items:
                queue.append(_Job(item))
                while sum(j.todo for j in queue) >= self.batch_size:
                    self._stage(queue, flight, runner)
                    yield from self._pop_finished(queue)
                yield from self._pop_finished(queue)
            while any(j.todo > 0 for j in queue):
                self._stage(queue, flight, runner)
            while flight:
                self._collect(flight.popleft())
            yield from self._pop_finished(queue)

    def _stage(self, queue: list[_Job], flight: deque[_Batch], runner: ThreadPoolExecutor) -> None:
        """Preprocess up to batch_size pending fields (of one or several images) into a free slot and start its
        run; with every slot busy, the oldest batch is collected first (its slot is the one reused)."""
        slots = self.preprocessor.slots
        if len(flight) >= slots:
            self._collect(flight.popleft())
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
        self.preprocessor.stage(images, plans, n, slot)
        t_pre = time.perf_counter() - t0
        if slots == 1:  # in series: nothing to overlap with
            done: Future = Future()
            try:
                done.set_result(self._timed_run(n, slot))
            except Exception as e:  # collected below as the batch's failure, as from the runner thread
                done.set_exception(e)
        else:
            done = runner.submit(self._timed_run, n, slot)
        flight.append(_Batch(owners, n, t_pre, done))
        if slots == 1:
            self._collect(flight.popleft())

    def _timed_run(self, n: int, slot: int) -> tuple[Outputs, float]:
        t0 = time.perf_counter()
        outs = self.preprocessor.run(n, slot)
        return outs, time.perf_counter() - t0

    def _collect(self, batch: _Batch) -> None:
        """Wait for a batch's outputs and charge each image its share; a run that failed is its images' error."""
        try:
            outs, seconds = batch.outputs.result()
        except Exception as e:  # each backend fails in its own types; the other batches' images are not its concern
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            for j, take in batch.owners:
                j.run_error = j.run_error or why
                j.done += take
            return
        finite = np.logical_and.reduce([np.isfinite(v) for v in outs.values()])
        probs = np.array(outs["probability"][:batch.n], np.float32)
        if self.recheck is not None:
            self._recheck(batch, probs, self.recheck.select(probs) & finite[:batch.n])
        k = 0
        for j, take in batch.owners:
            j.probs.append(probs[k:k + take])
            j.non_finite += [f"field {j.done + i}: " + ", ".join(f"{name} {v[k + i]}" for name, v in outs.items())
                             for i in range(take) if not finite[k + i]]
            j.done += take
            j.t_pre += batch.t_pre * take / batch.n
            j.t_infer += seconds * take / batch.n
            k += take

    def _recheck(self, batch: _Batch, probs: np.ndarray, inside: np.ndarray) -> None:
        """FP32's probabilities for the batch's in-band fields, in place in ``probs`` (the fast ones kept on the
        job); a failure is the error of every image that had a field to re-check."""
        assert self.recheck is not None
        if not inside.any():
            return
        images, plans, where = [], [], []
        k = 0
        for j, take in batch.owners:
            idx = np.flatnonzero(inside[k:k + take])
            if idx.size:
                assert j.item.plan is not None
                pixels = j.item.gpu if j.item.gpu is not None else j.item.bgr
                assert pixels is not None
                images.append(self.preprocessor.host_pixels(pixels))
                plans.append(replace(j.item.plan, field_origins=j.item.plan.field_origins[j.done + idx]))
                where.append((j, k + idx, j.done + idx))
            k += take
        try:
            fp32 = self.recheck.run(images, plans)
            if not np.isfinite(fp32).all():
                raise ValueError(f"fp32 gave a non-finite probability ({fp32[~np.isfinite(fp32)][0]})")
        except Exception as e:  # any failure of the reference: those images get no verdict, never the fast label
            for j, _, _ in where:
                j.recheck_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            return
        m = 0
        for j, in_batch, in_image in where:
            for b, i in zip(in_batch, in_image):
                j.fast[int(i)] = float(probs[b])
                probs[b] = fp32[m]
                m += 1

    def _pop_finished(self, queue: list[_Job]) -> Iterator[Result]:
        while queue and queue[0].done >= queue[0].item.n_fields:
            j = queue.pop(0)
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
                res.timings_ms["total"] = sum(res.timings_ms.values())
            if j.item.bgr is not None:
                self.preprocessor.release(j.item.bgr)  # its fields are inferred: the buffer may take the next image
            j.item.bgr = j.item.gpu = None  # release the pixels as soon as the image is done
            yield res
