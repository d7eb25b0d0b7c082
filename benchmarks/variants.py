"""The things being timed, each behind the same call: ``run(path) -> (preprocess_s, inference_s)``."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

BASELINE = "baseline_pytorch_fp32_eager"
RUNTIME_CPU = "runtime_onnxruntime_cpu"
RUNTIME_CPU_BATCH = "runtime_onnxruntime_cpu_batch4"  # throughput: 4 fields per inference call
VARIANTS = (BASELINE, RUNTIME_CPU, RUNTIME_CPU_BATCH)

Runner = Callable[[Path], tuple[float, float]]


def open_variant(name: str, model_dir: Path, threads: int) -> tuple[Runner, Callable[[list[Path]], None], object]:
    """(per-image runner, whole-list runner, object to keep alive) for a variant."""
    if name == BASELINE:
        from benchmarks.baseline import Baseline

        base = Baseline(model_dir, threads=threads)

        def run_base(p: Path) -> tuple[float, float]:
            t0 = time.perf_counter()
            x = base.preprocess(p)  # decode + the original per-patch preprocessing
            t1 = time.perf_counter()
            base.infer(x)
            return t1 - t0, time.perf_counter() - t1

        def run_all_base(ps: list[Path]) -> None:
            for p in ps:
                run_base(p)

        return run_base, run_all_base, base
    if name in (RUNTIME_CPU, RUNTIME_CPU_BATCH):
        from runtime.classifier import Classifier

        clf = Classifier(model_dir, backend="cpu", threads=threads, batch_size=4 if name == RUNTIME_CPU_BATCH else 1)

        def run_rt(p: Path) -> tuple[float, float]:
            (r,) = clf.classify([p])
            if r.error:
                raise RuntimeError(r.error)
            t = r.timings_ms
            return (t["decode"] + t["preprocess"]) / 1e3, t["inference"] / 1e3

        def run_all_rt(ps: list[Path]) -> None:
            clf.classify(ps)

        return run_rt, run_all_rt, clf
    raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
