"""The things being timed, each behind the same calls: ``run(path) -> (seconds per stage, probability)`` per image
and ``stream(paths)``, which yields as each image's result is done (a folder at the variant's batch size). Two
suites: CPU (the embedded default) and GPU (same GPU for every variant). The product's own paths (the folder as
`runtime.classify` runs it, the watch folder, slides, cohorts, the server) are in benchmarks/paths.py."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASELINE = "baseline_pytorch_fp32_eager"
RUNTIME_CPU = "runtime_onnxruntime_cpu"
RUNTIME_CPU_BATCH = "runtime_onnxruntime_cpu_batch4"  # throughput: 4 fields per inference call
RUNTIME_AUTO = "runtime_auto"  # image by image at the tier `auto` picks, where no row of the suite is that tier
RUNTIME_OV_BF16 = "runtime_openvino_cpu_bf16"  # the CPU's BF16 tier (where the CPU has native BF16)
RUNTIME_OV_BF16_NO_RECHECK = "runtime_openvino_cpu_bf16_recheck_off"  # the tier alone: what its re-checks cost
RUNTIME_CPU_INT8 = "runtime_onnxruntime_cpu_int8"  # only where the model has an INT8 variant that passed its gate
BASELINE_CUDA = "baseline_pytorch_fp32_eager_cuda"
RUNTIME_ORT_CUDA = "runtime_onnxruntime_cuda_fp16"
RUNTIME_ORT_CUDA_FP32 = "runtime_onnxruntime_cuda_fp32"
RUNTIME_ORT_CUDA_NO_RECHECK = "runtime_onnxruntime_cuda_fp16_recheck_off"
RUNTIME_ORT_CUDA_FOLDER = "runtime_onnxruntime_cuda_fp16_folder"  # batch 32; JPEGs on the GPU where nvImageCodec is
RUNTIME_ORT_CUDA_FOLDER_CPU_DECODE = "runtime_onnxruntime_cuda_fp16_folder_cpu_decode"  # the same, JPEGs on the CPU
BASELINE_CUDA_FOLDER = "baseline_pytorch_fp32_eager_cuda_folder"
RUNTIME_TRT_FP16 = "runtime_tensorrt_fp16"
RUNTIME_TRT_INT8 = "runtime_tensorrt_int8"

# suite -> (baseline, per-image variants, throughput variants). The CPU suite's folder rows are the product's paths
# (benchmarks/paths.py: the folder at the tier `auto` picks, and the others); the baseline's folder is its per-image
# row (one image after another in its own process is what its folder pass would be).
SUITES = {
    "cpu": (BASELINE, (BASELINE, RUNTIME_CPU, RUNTIME_OV_BF16, RUNTIME_OV_BF16_NO_RECHECK, RUNTIME_CPU_INT8),
            (RUNTIME_CPU_BATCH,)),
    "gpu": (BASELINE_CUDA, (BASELINE_CUDA, RUNTIME_ORT_CUDA_FP32, RUNTIME_ORT_CUDA, RUNTIME_ORT_CUDA_NO_RECHECK,
                            RUNTIME_TRT_FP16, RUNTIME_TRT_INT8),
            (BASELINE_CUDA_FOLDER, RUNTIME_ORT_CUDA_FOLDER, RUNTIME_ORT_CUDA_FOLDER_CPU_DECODE)),
}
VARIANTS = tuple(dict.fromkeys(v for _, per, thr in SUITES.values() for v in (*per, *thr)))


@dataclass
class Variant:
    run: Callable[[Path], tuple[dict[str, float], float]]  # one image -> (seconds per stage, probability)
    stream: Callable[[list[Path]], Iterator[None]]  # a list of images at the variant's batch size: yields per result
    keep: Any  # the object behind it (kept alive while timing)
    precision: str  # what its fidelity against the baseline is judged by (runtime/model/fidelity.py)
    fields: dict[str, int] = field(default_factory=dict)  # "classified", "rechecked" (at FP32) over every call
    tier: dict[str, Any] = field(default_factory=dict)  # backend, precision, recheck: what it ran

    def run_all(self, paths: list[Path]) -> None:
        for _ in self.stream(paths):
            pass


def _baseline(model_dir: Path, threads: int, device: str) -> Variant:
    from benchmarks.baseline import Baseline

    base = Baseline(model_dir, threads=threads, device=device)

    def run(p: Path) -> tuple[dict[str, float], float]:
        t0 = time.perf_counter()
        x = base.preprocess(p)  # decode + the original per-patch preprocessing
        t1 = time.perf_counter()
        prob = float(base.infer(x)[0])
        return {"decode+preprocess": t1 - t0, "inference": time.perf_counter() - t1}, prob

    def stream(ps: list[Path]) -> Iterator[None]:
        for p in ps:
            run(p)
            yield None

    return Variant(run, stream, base, "fp32", tier={"backend": f"pytorch-{device}", "precision": "fp32",
                                                    "recheck": False})


def _runtime(model_dir: Path, threads: int, **kw: Any) -> Variant:
    from runtime.pipeline.classifier import Classifier

    clf = Classifier(model_dir, threads=threads, **kw)
    fields = {"classified": 0, "rechecked": 0}

    def count(r: Any) -> Any:
        if r.error or r.probability is None:  # a benchmark of errors would time nothing
            raise RuntimeError(r.error or f"{r.path}: no probability")
        fields["classified"] += len(r.fields)
        fields["rechecked"] += r.rechecked
        return r

    def run(p: Path) -> tuple[dict[str, float], float]:
        (r,) = clf.classify([p])
        prob = count(r).probability
        assert prob is not None  # count raised otherwise
        return {k: v / 1e3 for k, v in r.timings_ms.items() if k != "total"}, prob

    def stream(ps: list[Path]) -> Iterator[None]:
        for r in clf.classify_iter(ps):
            count(r)
            yield None

    return Variant(run, stream, clf, clf.backend.precision, fields, tier=tier_of(clf))


RECHECK_WARMED = "; then the re-checks' FP32 reference opened and run on one field (Classifier.open_recheck)"


def warm_recheck(v: Variant) -> str:
    """After a variant's warm-up images: the product's own warm-up of the re-checks where the variant re-checks
    (Classifier.open_recheck: the FP32 reference opened and run on one field, as the server, the watch folder and
    a cohort do at start), so that no timed image pays for opening it; the fields counted so far (the warm-up's)
    forgotten, so that a row counts its timed fields only. What it did, for the row's ``how``."""
    v.fields.update(classified=0, rechecked=0)
    if not v.tier.get("recheck"):
        return ""
    v.keep.open_recheck()
    return RECHECK_WARMED


def tier_of(clf: Any) -> dict[str, Any]:
    """What a Classifier runs: its backend, precision and whether borderline fields are re-checked at FP32."""
    return {"backend": clf.backend.name, "precision": clf.backend.precision, "recheck": clf.recheck is not None}


def open_variant(name: str, model_dir: Path, threads: int) -> Variant:
    """Open a variant; raises (BackendUnavailable, GpuUnavailable, ...) where it cannot run on this machine."""
    openers: dict[str, Callable[[], Variant]] = {
        BASELINE: lambda: _baseline(model_dir, threads, "cpu"),
        BASELINE_CUDA: lambda: _baseline(model_dir, threads, "cuda"),
        RUNTIME_CPU: lambda: _runtime(model_dir, threads, backend="cpu", precision="fp32", batch_size=1,
                                      decode_workers=1),
        RUNTIME_CPU_BATCH: lambda: _runtime(model_dir, threads, backend="cpu", precision="fp32", batch_size=4,
                                            decode_workers=1),
        RUNTIME_AUTO: lambda: _runtime(model_dir, threads, batch_size=1, decode_workers=1),
        RUNTIME_OV_BF16: lambda: _runtime(model_dir, threads, backend="openvino", precision="bf16", batch_size=1,
                                          decode_workers=1),
        RUNTIME_OV_BF16_NO_RECHECK: lambda: _runtime(model_dir, threads, backend="openvino", precision="bf16",
                                                     batch_size=1, decode_workers=1, recheck="off"),
        RUNTIME_CPU_INT8: lambda: _runtime(model_dir, threads, backend="cpu", precision="int8", batch_size=1,
                                           decode_workers=1),
        BASELINE_CUDA_FOLDER: lambda: _baseline(model_dir, threads, "cuda"),
        RUNTIME_ORT_CUDA_FOLDER: lambda: _runtime(model_dir, threads, backend="onnxruntime-cuda", precision="fp16",
                                                  batch_size=32),
        RUNTIME_ORT_CUDA_FOLDER_CPU_DECODE: lambda: _runtime(model_dir, threads, backend="onnxruntime-cuda",
                                                             precision="fp16", batch_size=32, decode="cpu"),
        RUNTIME_ORT_CUDA_FP32: lambda: _runtime(model_dir, threads, backend="onnxruntime-cuda", precision="fp32",
                                                batch_size=1),
        RUNTIME_ORT_CUDA: lambda: _runtime(model_dir, threads, backend="onnxruntime-cuda", precision="fp16",
                                           batch_size=1),
        RUNTIME_ORT_CUDA_NO_RECHECK: lambda: _runtime(model_dir, threads, backend="onnxruntime-cuda",
                                                      precision="fp16", batch_size=1, recheck="off"),
        RUNTIME_TRT_FP16: lambda: _runtime(model_dir, threads, backend="tensorrt", precision="fp16", batch_size=1),
        RUNTIME_TRT_INT8: lambda: _runtime(model_dir, threads, backend="tensorrt", precision="int8", batch_size=1),
    }
    if name not in openers:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(openers)}")
    return openers[name]()
