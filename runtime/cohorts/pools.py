"""What runs a cohort's units: one after another in this process, or on Ray actors that each hold the model once."""
from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from runtime.cohorts.units import CohortError, Unit
from runtime.cohorts.work import classify_part

MAX_ATTEMPTS = 3  # a slide whose worker died this often is recorded as an error


class SlideWorker:
    """What a Ray actor holds: one Classifier, the model loaded once for every slide the actor is given."""

    def __init__(self, classifier_kw: dict[str, Any]) -> None:
        from runtime.pipeline.classifier import Classifier

        self.clf = Classifier(**classifier_kw)
        self.clf.open_recheck()  # a long-running worker: the re-checks' reference ready before its first slide

    def classify(self, unit: Unit, options: dict[str, Any]) -> dict[str, Any]:
        return classify_part(self.clf, unit, options)

    def model_info(self) -> dict[str, Any]:
        return self.clf.model_info.to_dict() | {"host": socket.gethostname()}


def run_local(clf: Any, units: list[Unit], options: dict[str, Any],
              field_progress: Callable[[Path], Callable[[int, int], None]] | None = None,
              ) -> Iterator[tuple[Unit, dict[str, Any]]]:
    """Slides one after another in this process; ``field_progress(path)`` gives each slide's progress callback. The
    re-checks' reference is opened before the first slide, as the actors open theirs."""
    if units:
        clf.open_recheck()
    for unit in units:
        bar = field_progress(Path(unit.path)) if field_progress else None
        part = classify_part(clf, unit, options, bar)
        if bar is not None:
            bar(-1, -1)
        yield unit, part


def why_died(e: BaseException) -> str:
    """The reason inside a Ray actor's death, as its last ``SomeError: message`` line says it (an actor that raised
    while starting carries its traceback in the message), else the error's type."""
    lines = [ln.strip() for ln in str(e).splitlines() if "Error: " in ln or "Exception: " in ln]
    return lines[-1][:400] if lines else type(e).__name__


class RayPool:
    """Long-lived Ray actors (one per GPU, else one per ``cpus_per_actor`` cores), each holding one Classifier.
    Work units are slides; a unit whose actor dies goes to another (a new actor takes the dead one's place), and
    after MAX_ATTEMPTS it is recorded as an error. Results come back to this process, which alone writes them."""

    def __init__(self, classifier_kw: dict[str, Any], address: str, actors: int | None, cpus_per_actor: int) -> None:
        ray = self.ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        n = actors or (gpus if gpus else max(1, int(resources.get("CPU", 1)) // cpus_per_actor))
        self.worker = ray.remote(num_cpus=cpus_per_actor, num_gpus=1 if gpus else 0)(SlideWorker)
        self.kw = classifier_kw | {"threads": classifier_kw.get("threads") or cpus_per_actor}
        self.started = 0
        self.idle = [self._start() for _ in range(n)]
        try:
            infos = ray.get([w.model_info.remote() for w in self.idle])  # each actor's model, loaded once
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
            self.close()
            raise CohortError(f"the Ray actors could not start: {why_died(e)}") from None
        self.model = {k: v for k, v in infos[0].items() if k != "host"}
        self.info: dict[str, Any] = {"address": address, "actors": n, "cpus_per_actor": cpus_per_actor, "gpus": gpus,
                     "hosts": sorted({i["host"] for i in infos}), "worker_restarts": 0}

    def _start(self) -> Any:
        self.started += 1
        return self.worker.options(name=f"breakhis-cohort-{os.getpid()}-{self.started}").remote(self.kw)

    def run(self, units: list[Unit], options: dict[str, Any]) -> Iterator[tuple[Unit, dict[str, Any]]]:
        ray = self.ray
        queue, attempts = deque(units), {(u.stem, u.part): 0 for u in units}
        pending: dict[Any, tuple[Unit, Any]] = {}  # Ray object ref -> (its slide, the actor working on it)
        while queue or pending:
            while queue and self.idle:
                w, u = self.idle.pop(), queue.popleft()
                attempts[u.stem, u.part] += 1
                pending[w.classify.remote(u, options)] = (u, w)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            u, w = pending.pop(ref)
            try:
                payload = ray.get(ref)
                self.idle.append(w)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                self.info["worker_restarts"] += 1
                self.idle.append(self._start())
                if attempts[u.stem, u.part] < MAX_ATTEMPTS:
                    queue.appendleft(u)
                    continue
                payload = {"result": None, "overlay": b"", "seconds": 0.0,
                           "error": f"its worker died {MAX_ATTEMPTS} times (the last: {why_died(e)})"}
            yield u, payload

    def close(self) -> None:
        for w in self.idle:
            self.ray.kill(w)
        self.idle = []


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise CohortError("--ray needs Ray: pip install -e '.[cluster]' (or pip install 'ray>=2.40'); without "
                          "--ray the cohort runs in this process") from None
    return ray
