"""The field scheduler: fields of consecutive images batched together up to the batch size (only the fields of
the batch in progress are preprocessed), each image charged its share of the time, results released in input
order. A NaN or inf output makes that image an error, never a verdict (NaN > 0.5 is False: "Benign")."""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from runtime.model.manifest import Contract
from runtime.pipeline.decoding import Prepared
from runtime.pipeline.preprocessors import Preprocessor
from runtime.pipeline.results import Result


@dataclass
class _Job:
    item: Prepared
    probs: list[np.ndarray] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)  # "field 3: probability nan, logit inf", ...
    done: int = 0  # fields inferred so far
    t_pre: float = 0.0
    t_infer: float = 0.0

    @property
    def todo(self) -> int:
        return self.item.n_fields - self.done


class FieldScheduler:
    def __init__(self, preprocessor: Preprocessor, batch_size: int, contract: Contract, runs_on: str) -> None:
        self.preprocessor, self.batch_size, self.contract = preprocessor, batch_size, contract
        self.runs_on = runs_on  # "backend X, precision Y": what a non-finite output's error names

    def run(self, items: Iterable[Prepared]) -> Iterator[Result]:
        """Results in input order; memory bounded by the batch in progress and what ``items`` holds ahead."""
        queue: list[_Job] = []
        for item in items:
            queue.append(_Job(item))
            while sum(j.todo for j in queue) >= self.batch_size:
                self._infer_batch(queue)
                yield from self._pop_finished(queue)
            yield from self._pop_finished(queue)
        while any(j.todo > 0 for j in queue):
            self._infer_batch(queue)
        yield from self._pop_finished(queue)

    def _infer_batch(self, queue: list[_Job]) -> None:
        """Run up to batch_size pending fields (from one or several images) through the preprocessor at once."""
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
            assert j.item.plan is not None and j.item.bgr is not None
            images.append(j.item.bgr)
            plans.append(replace(j.item.plan, field_origins=j.item.plan.field_origins[j.done:j.done + take]))
        t0 = time.perf_counter()
        t1, outs = self.preprocessor.infer(images, plans, n)
        t2 = time.perf_counter()
        finite = np.logical_and.reduce([np.isfinite(v) for v in outs.values()])
        k = 0
        for j, take in owners:  # each image is charged its share of the batch
            j.probs.append(outs["probability"][k:k + take])
            j.non_finite += [f"field {j.done + i}: " + ", ".join(f"{name} {v[k + i]}" for name, v in outs.items())
                             for i in range(take) if not finite[k + i]]
            j.done += take
            j.t_pre += (t1 - t0) * take / n
            j.t_infer += (t2 - t1) * take / n
            k += take

    def _pop_finished(self, queue: list[_Job]) -> Iterator[Result]:
        while queue and queue[0].todo <= 0:
            j = queue.pop(0)
            res = j.item.result
            if j.non_finite:
                res.error = (f"{res.path}: the model gave a non-finite output ({'; '.join(j.non_finite)}) on "
                             f"{self.runs_on}: no verdict")
            elif res.error is None:
                assert j.item.plan is not None
                res.finish(j.item.plan, np.concatenate(j.probs), self.contract)
                res.timings_ms["preprocess"] = j.t_pre * 1e3
                res.timings_ms["inference"] = j.t_infer * 1e3
                res.timings_ms["total"] = sum(res.timings_ms.values())
            j.item.bgr = None  # release the pixels as soon as the image is done
            yield res
