"""``Classifier(model_dir).classify(images)``: decode, tile, preprocess, batch fields across images, infer, report.

Image verdict (screening rule): every field is classified; the image's probability is the highest field
probability, so one malignant field makes the image Malignant.
"""
from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from runtime.backends.base import Backend, DeviceInputBackend
from runtime.backends.choose import PREPROCESSORS, open_backend
from runtime.errors import Unavailable
from runtime.io.decode import DEFAULT_MAX_PIXELS, ImageError, decode, read_image, to_bgr8
from runtime.io.inputs import ImageInput
from runtime.io.scale import name_warning
from runtime.model.manifest import Contract
from runtime.model.model_dir import ModelDir
from runtime.model.paths import default_model_dir
from runtime.pipeline.preprocess import preprocess_fields
from runtime.pipeline.tiling import FieldPlan, TilingError, plan_fields

Input = str | Path | np.ndarray | ImageInput
UNTRAINED_WARNING = "UNTRAINED reference weights: this verdict is NOT a diagnosis (demo/test model)."


@dataclass
class FieldResult:
    row: int  # field position in the image's field grid
    col: int
    y: int  # top-left pixel of the field
    x: int
    height: int
    width: int
    patches: int
    probability: float
    label: str


@dataclass
class Result:
    path: str
    label: str | None = None
    probability: float | None = None
    fields: list[FieldResult] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    size: tuple[int, int] | None = None  # (width, height)
    conversions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the decoder said about this image

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Pending:
    result: Result
    plan: FieldPlan | None = None
    bgr: np.ndarray | None = None  # the decoded image; its fields are preprocessed batch by batch
    probs: list[np.ndarray] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)  # "field 3: probability nan, logit inf", ...
    done: int = 0  # fields inferred so far
    t_pre: float = 0.0
    t_infer: float = 0.0

    @property
    def todo(self) -> int:
        return (self.plan.n_fields if self.plan is not None and self.result.error is None else 0) - self.done


class Classifier:
    """One model, one backend, chosen once. ``model_dir``: default the trained model where setup.sh exported it,
    else the untrained reference. ``backend``: "auto", "cpu" (ONNX Runtime), "openvino", "onnxruntime-cuda" or
    "tensorrt". ``precision``: "auto" (FP16 on a GPU, BF16 on a CPU with native BF16, each where the model has a
    variant that passed its gate; else FP32), or a listed variant.
    ``preprocess``: "cpu" (numpy), "gpu" (our CUDA kernel via pycuda) or "auto" (GPU when inference runs on a GPU
    and pycuda is usable, else CPU). With a GPU backend the kernel writes straight into the backend's device input,
    so images cross the bus once, as uint8. A NaN or inf from the model makes that image's result an error."""

    def __init__(self, model_dir: Path | str | None = None, backend: str = "auto", batch_size: int | None = None,
                 threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, preprocess: str = "auto",
                 precision: str = "auto", allow_build: bool = False, decode_workers: int | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = ModelDir.open(model_dir if model_dir is not None else default_model_dir())
        self.manifest = self.model.manifest
        self.contract = self.manifest.contract
        self.max_pixels = max_pixels
        self.backend, notes = open_backend(backend, self.model, threads, precision, allow_build)
        # Images are read and decoded ahead of inference by a pool of threads, so decoding overlaps inference. With
        # inference on a GPU the host's cores are free for decoding (one is left for this thread); on the CPU
        # inference needs them and a few decode threads keep up. (PNGs decode in parallel; OpenCV's decoders take
        # turns while their messages are captured for the file: runtime/io/decode.py.)
        cores = os.cpu_count() or 1
        self.decode_workers = decode_workers if decode_workers is not None else \
            min(16, max(1, cores - 1)) if self.backend.on_gpu else min(4, cores)
        self.batch_size = min(batch_size or self.backend.preferred_batch,
                              getattr(self.backend, "max_batch", None) or 1 << 30)
        try:
            self.gpu = _open_gpu_preprocessor(preprocess, self.backend, self.contract, notes)
        except BaseException:
            self.backend.close()  # opened above: its session and device memory are not left behind
            raise
        self.device_input = self.gpu is not None and self.backend.device_input
        # The preprocessing path, chosen once: GPU kernel into the backend's input, GPU kernel back to the host,
        # or numpy into a reused host batch.
        self._run = self._run_device if self.device_input else self._run_gpu_host if self.gpu else self._run_cpu
        self._batch: np.ndarray | None = None  # the CPU path's host batch, allocated once on first use
        self.model_info = self.manifest.model_info() | {"backend": self.backend.name,
                                                        "precision": self.backend.precision,
                                                        "file": self.backend.model_file,
                                                        "file_sha256": self.backend.file_sha256,
                                                        "preprocess": "gpu" if self.gpu else "cpu"}
        if notes:
            self.model_info["backend_notes"] = notes
        if not self.manifest.provenance.trained:
            self.model_info["warning"] = UNTRAINED_WARNING

    def classify(self, images: Iterable[Input] | Input) -> list[Result]:
        """Classify images (paths, BGR uint8 arrays, or named ImageInputs); one Result each, in order. Failures
        are Result.error."""
        if isinstance(images, (str, Path, np.ndarray, ImageInput)):
            images = [images]
        return list(self.classify_iter(images))

    def classify_iter(self, images: Iterable[Input]) -> Iterator[Result]:
        """Stream results in input order while batching fields of consecutive images together. Memory stays
        bounded whatever the number of inputs: a window of decoded images ahead, and the batch in progress."""
        queue: list[_Pending] = []
        for pending in self._prepared(images):
            queue.append(pending)
            while sum(p.todo for p in queue) >= self.batch_size:
                self._infer_batch(queue)
                yield from self._pop_finished(queue)
            yield from self._pop_finished(queue)
        while any(p.todo > 0 for p in queue):
            self._infer_batch(queue)
        yield from self._pop_finished(queue)

    def _prepared(self, images: Iterable[Input]) -> Iterator[_Pending]:
        """Inputs read, decoded and tiled, in input order. With decode workers, up to 2 per worker plus a batch
        ahead: the next batch decodes while this one is inferred, and memory stays bounded."""
        if self.decode_workers <= 1:
            yield from map(self._prepare, images)
            return
        window: deque[Future] = deque()
        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode") as pool:
            for item in images:
                window.append(pool.submit(self._prepare, item))
                if len(window) >= 2 * self.decode_workers + self.batch_size:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()

    def _prepare(self, item: Input) -> _Pending:
        if not isinstance(item, ImageInput):
            item = ImageInput("<array>", array=item) if isinstance(item, np.ndarray) else ImageInput(str(item))
        res = Result(path=item.name, model=self.model_info)
        if item.error is not None:
            res.error = item.error
            return _Pending(res)
        t0 = time.perf_counter()
        try:
            if item.decoded is not None:
                dec = replace(item.decoded, conversions=list(item.decoded.conversions),
                              warnings=list(item.decoded.warnings))
            elif item.array is not None:
                dec = to_bgr8(item.array, item.name)
            elif item.data is not None:
                dec = decode(item.data, item.name, self.max_pixels)
            else:
                dec = read_image(item.name, self.max_pixels)
            t1 = time.perf_counter()
            h, w = dec.bgr.shape[:2]
            res.size, res.conversions, res.warnings = (w, h), dec.conversions, dec.warnings
            wrong_scale = name_warning(item.name, self.contract)
            if wrong_scale:
                res.warnings.append(wrong_scale)
            plan = plan_fields(h, w, self.contract)
        except (ImageError, TilingError) as e:
            res.error = str(e) if isinstance(e, ImageError) else f"{item.name}: {e}"
            return _Pending(res)
        res.timings_ms = {"decode": (t1 - t0) * 1e3}
        return _Pending(res, plan, dec.bgr)

    def _infer_batch(self, queue: list[_Pending]) -> None:
        """Run up to batch_size pending fields (from one or several images) through the backend at once."""
        owners, n = [], 0
        for p in queue:
            take = min(p.todo, self.batch_size - n)
            if take > 0:
                owners.append((p, take))
                n += take
            if n == self.batch_size:
                break
        images, plans = [], []
        for p, take in owners:  # only the fields going into this batch are preprocessed: memory stays bounded
            assert p.plan is not None and p.bgr is not None
            images.append(p.bgr)
            plans.append(replace(p.plan, field_origins=p.plan.field_origins[p.done:p.done + take]))
        t0 = time.perf_counter()
        t1, outs = self._run(images, plans, n)
        t2 = time.perf_counter()
        probs = outs["probability"]
        finite = np.logical_and.reduce([np.isfinite(v) for v in outs.values()])
        k = 0
        for p, take in owners:  # each image is charged its share of the batch
            p.probs.append(probs[k:k + take])
            p.non_finite += [f"field {p.done + i}: " + ", ".join(f"{name} {v[k + i]}" for name, v in outs.items())
                             for i in range(take) if not finite[k + i]]
            p.done += take
            p.t_pre += (t1 - t0) * take / n
            p.t_infer += (t2 - t1) * take / n
            k += take

    def _run_device(self, images: list[np.ndarray], plans: list[FieldPlan], n: int) -> tuple[float, dict]:
        """One kernel launch for the whole batch, written into the backend's input on its stream."""
        backend = cast(DeviceInputBackend, self.backend)
        self.gpu.submit(images, plans, dst=backend.input_ptr)
        return time.perf_counter(), backend.run_device(n)

    def _run_gpu_host(self, images: list[np.ndarray], plans: list[FieldPlan], n: int) -> tuple[float, dict]:
        """GPU kernel, result brought back for a backend that takes host input."""
        batch = self.gpu.to_host(images, plans)
        return time.perf_counter(), self.backend.run(batch)

    def _run_cpu(self, images: list[np.ndarray], plans: list[FieldPlan], n: int) -> tuple[float, dict]:
        if self._batch is None:  # only the CPU path needs it (a 32-field batch is 116 MB)
            self._batch = np.empty((self.batch_size, *self.contract.field_shape), np.float32)
        batch, k = self._batch[:n], 0
        for img, plan in zip(images, plans):
            preprocess_fields(img, plan, self.contract, out=batch[k:k + plan.n_fields])
            k += plan.n_fields
        return time.perf_counter(), self.backend.run(batch)

    def _pop_finished(self, queue: list[_Pending]) -> Iterator[Result]:
        while queue and queue[0].todo <= 0:
            p = queue.pop(0)
            if p.non_finite:  # an overflow must never read as a verdict (NaN > 0.5 is False: "Benign")
                p.result.error = (f"{p.result.path}: the model gave a non-finite output ({'; '.join(p.non_finite)}) "
                                  f"on backend {self.backend.name}, precision {self.backend.precision}: no verdict")
                p.bgr = None
            elif p.result.error is None:
                self._finish(p)
            yield p.result

    def _finish(self, p: _Pending) -> None:
        c, plan, res = self.contract, p.plan, p.result
        assert plan is not None
        probs = np.concatenate(p.probs)
        fh, fw = c.field_size
        cols = plan.grid[1]
        res.fields = [FieldResult(row=i // cols, col=i % cols, y=int(y), x=int(x), height=fh, width=fw,
                                  patches=c.seq_len, probability=float(pr), label=c.label(float(pr)))
                      for i, ((y, x), pr) in enumerate(zip(plan.field_origins, probs))]
        res.probability = float(probs.max())
        res.label = c.label(res.probability)
        res.timings_ms["preprocess"] = p.t_pre * 1e3
        res.timings_ms["inference"] = p.t_infer * 1e3
        res.timings_ms["total"] = sum(res.timings_ms.values())
        p.bgr = None  # release the pixels as soon as the image is done

    def close(self) -> None:
        self.backend.close()
        if self.gpu is not None:
            self.gpu.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_gpu_preprocessor(choice: str, backend: Backend, contract: Contract, notes: list[str]):
    """None for the CPU path. "gpu" fails loudly when impossible; "auto" uses the GPU only next to a GPU backend,
    sharing its stream and writing its input dtype, and falls back to the CPU (with a note) when the kernel cannot
    run here (no pycuda, no GPU, no nvcc to build it)."""
    if choice not in PREPROCESSORS:
        raise ValueError(f"preprocess must be one of {', '.join(PREPROCESSORS)}, not {choice!r}")
    device_input = backend.device_input
    if choice == "cpu" or (choice == "auto" and not device_input):
        return None
    try:
        from runtime.gpu.preprocessor import GpuPreprocessor

        if device_input:
            gpu_backend = cast(DeviceInputBackend, backend)
            return GpuPreprocessor(contract, fp16=gpu_backend.input_fp16, stream=gpu_backend.stream)
        return GpuPreprocessor(contract)
    except Unavailable as e:
        if choice == "gpu":
            raise
        notes.append(f"preprocess auto chose the CPU: {str(e).splitlines()[0]}")
        return None
