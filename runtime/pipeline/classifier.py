"""``Classifier(model_dir).classify(images)``: the one entry, built from named stages: decode-and-plan ahead in a
pool (decoding.py), the preprocessing path chosen once (preprocessors.py), fields batched across images
(scheduler.py), results with their coordinates and the model that made them (results.py)."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from runtime.backends.base import Backend
from runtime.backends.choose import open_backend, reference_for
from runtime.io.decode import DEFAULT_MAX_PIXELS
from runtime.io.inputs import ImageInput
from runtime.model.manifest import Contract, Manifest
from runtime.model.model_dir import ModelDir
from runtime.model.paths import default_model_dir
from runtime.model.stain_reference import StainReference
from runtime.pipeline.decoding import Input, Prepared, open_gpu_jpeg, prefetch, prepare
from runtime.pipeline.preprocessors import open_preprocessor
from runtime.pipeline.quality import QC_MODES
from runtime.pipeline.recheck import RECHECK, Recheck
from runtime.pipeline.results import ModelInfo, Result
from runtime.pipeline.scheduler import FieldScheduler

if TYPE_CHECKING:
    from runtime.backends.triton import TritonTarget


class Classifies(Protocol):
    """What the server, its queue and the slide path need of a classifier (the Classifier, or a proxy to it)."""

    contract: Contract
    max_pixels: int
    model_info: ModelInfo

    def classify(self, images: Sequence[Input]) -> list[Result]: ...


class Classifier:
    """One model, one backend, chosen once. ``model_dir``: default the trained model where setup.sh exported it,
    else the untrained reference. ``backend``: "auto", "cpu" (ONNX Runtime), "openvino", "onnxruntime-cuda",
    "tensorrt", or "triton": the fields go to the Triton server ``triton`` names (runtime/backends/triton.py), whose
    model must be ``model_dir``'s where one is given (else the server's contract is used). ``precision``: "auto" (FP16 on a GPU, BF16 on a CPU with native BF16, each where the model has a
    variant that passed its gate; else FP32), or a listed variant (runtime/model/precisions.py).
    ``preprocess``: "cpu" (numpy), "gpu" (our CUDA kernel via pycuda) or "auto" (GPU when inference runs on a GPU
    and pycuda is usable, else CPU). ``layout``: ONNX Runtime CUDA's memory layout, "auto" (NHWC where the variant
    passed its gate in it on a GPU), "nchw" or "nhwc". ``decode``: where JPEGs are decoded, "auto" (the GPU next to
    GPU preprocessing where nvImageCodec is installed and passes its damage self-check), "cpu" or "gpu".
    ``recheck``: "on" (a faster precision's fields within its band of the threshold are classified again at FP32,
    so every label is FP32's: runtime/pipeline/recheck.py) or "off". ``qc``: each field's quality measured and
    "flag"ged where a limit is crossed (the verdict stands, marked, with what to do), "withhold" (a flagged field
    gets no label; the verdict comes from the others) or "off" (runtime/pipeline/quality.py). A NaN or inf from the
    model makes that image's result an error."""

    def __init__(self, model_dir: Path | str | None = None, backend: str = "auto", batch_size: int | None = None,
                 threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, preprocess: str = "auto",
                 precision: str = "auto", allow_build: bool = False, decode_workers: int | None = None,
                 layout: str = "auto", decode: str = "auto", recheck: str = "on", qc: str = "flag",
                 triton: TritonTarget | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if recheck not in RECHECK:
            raise ValueError(f"recheck must be one of {', '.join(RECHECK)}, not {recheck!r}")
        if qc not in QC_MODES:
            raise ValueError(f"qc must be one of {', '.join(QC_MODES)}, not {qc!r}")
        self.qc = qc
        self.stain_reference: StainReference | None  # the model's stains (runtime/pipeline/stain.py), where recorded
        reference: Callable[[], tuple[Callable[[], Backend], str]]
        if backend == "triton":  # the server's model; a local one, where named, must be the same
            if triton is None:
                raise ValueError("backend triton needs triton=TritonTarget(url)")
            from runtime.backends.triton import open_triton

            local = ModelDir.open(model_dir) if model_dir is not None else None
            stain_off = local.stain_check_off() if local is not None else \
                "stain check off: the Triton server's model has no stain reference here (name its model directory)"
            remote, notes = open_triton(triton, precision, local.manifest if local is not None else None)
            self.backend: Backend = remote
            self.manifest: Manifest = remote.manifest
            band, reference = remote.band, remote.reference
            self.stain_reference = local.stain_reference() if local is not None else None
        else:
            model = ModelDir.open(model_dir if model_dir is not None else default_model_dir())
            self.manifest = model.manifest
            self.backend, notes = open_backend(backend, model, threads, precision, allow_build, layout,
                                               recheck == "on")
            band = model.band(self.backend.precision)
            reference = partial(reference_for, self.backend, model, threads)
            self.stain_reference, stain_off = model.stain_reference(), model.stain_check_off()
        self.stain_off = stain_off if qc != "off" else None  # said in every result's model block and by the CLIs
        self.contract = self.manifest.contract
        self.max_pixels = max_pixels
        # Images are decoded ahead of inference by a pool of threads. With inference on a GPU the host's cores are
        # free for decoding (one is left for this thread); on the CPU inference needs them and a few keep up.
        cores = os.cpu_count() or 1
        self.decode_workers = decode_workers if decode_workers is not None else \
            min(16, max(1, cores - 1)) if self.backend.on_gpu else min(4, cores)
        self.batch_size = min(batch_size or self.backend.preferred_batch,
                              getattr(self.backend, "max_batch", None) or 1 << 30)
        self.recheck: Recheck | None = None
        try:
            if recheck == "on" and band > 0:  # its FP32 file checked now: refused at start, not at each field
                opener, where = reference()
                self.recheck = Recheck(band, self.contract, opener, where, self.batch_size)
            self.preprocessor = open_preprocessor(preprocess, self.backend, self.contract, self.batch_size, notes)
            try:
                self.gpu_jpeg = open_gpu_jpeg(decode, self.preprocessor.name, notes)
            except BaseException:
                self.preprocessor.close()
                raise
        except BaseException:
            self.backend.close()  # opened above: its session and device memory are not left behind
            raise
        self.model_info = ModelInfo.of(self.manifest, self.backend, self.preprocessor.name, notes,
                                       self.recheck.describe() if self.recheck else None, self.stain_off)
        self.scheduler = FieldScheduler(self.preprocessor, self.batch_size, self.contract,
                                        f"backend {self.backend.name}, precision {self.backend.precision}",
                                        self.recheck, qc == "withhold")

    def classify(self, images: Iterable[Input] | Input) -> list[Result]:
        """Classify images (paths, BGR uint8 arrays, named ImageInputs, or Prepared ones); one Result each, in
        order. Failures are Result.error."""
        if isinstance(images, (str, Path, np.ndarray, ImageInput, Prepared)):
            images = [images]
        return list(self.classify_iter(images))

    def classify_iter(self, images: Iterable[Input]) -> Iterator[Result]:
        """Results in input order while fields of consecutive images are batched together; memory stays bounded:
        a window of decoded images ahead (2 per decode worker plus a batch), and the batch in progress."""
        ahead = 2 * self.decode_workers + self.batch_size
        return self.scheduler.run(prefetch(images, self._prepare_owned, self.decode_workers, ahead))

    def _prepare_owned(self, item: Input) -> Prepared:
        """As ``prepare``, the pixels decoded into the preprocessor's buffers: the scheduler hands them back when
        the image is done (inputs prepared outside, like the server's, keep their own memory)."""
        return prepare(item, self.contract, self.max_pixels, self.model_info, self.preprocessor.host_buffer,
                       self.gpu_jpeg, self.qc != "off", self.stain_reference)

    def prepare(self, item: Input) -> Prepared:
        """The decode-and-plan step for one input, as classify runs it (the server runs it before queueing)."""
        return prepare(item, self.contract, self.max_pixels, self.model_info, quality=self.qc != "off",
                       stain=self.stain_reference)

    def open_recheck(self) -> None:
        """Open the FP32 reference of the re-checks now and run one field through it, instead of on the first
        borderline field: what a long-running service does at start (the server, the watch folder, a cohort), so
        that its first borderline request does not pay for opening it, and a reference that cannot run stops the
        start instead of costing a field its verdict. Nothing where nothing is re-checked (FP32, --recheck off)."""
        if self.recheck is not None:
            self.recheck.open()

    def close(self) -> None:
        self.backend.close()
        self.preprocessor.close()
        if self.recheck is not None:
            self.recheck.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
