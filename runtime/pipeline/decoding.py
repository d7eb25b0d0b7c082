"""The decode-and-plan stage: an input read, decoded within the pixel limit and tiled into fields, once (the server
runs it before queueing, the classifier for everything else), and a pool that runs it ahead of inference."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtime.io.decode import Buffer, Decoded, ImageError, decode, read_bytes, to_bgr8
from runtime.io.inputs import ImageInput
from runtime.io.scale import name_warning
from runtime.model.geometry import FieldPlan, TilingError, plan_fields
from runtime.model.manifest import Contract
from runtime.model.stain_reference import StainReference
from runtime.pipeline.quality import STEP, FieldQuality, assess
from runtime.pipeline.results import ModelInfo, Result

if TYPE_CHECKING:
    from runtime.gpu.jpeg import DeviceImage, GpuJpegDecoder


@dataclass
class Prepared:
    """An input ready for inference (``plan`` and ``bgr`` set), or its result already an error (``failure``)."""

    result: Result
    plan: FieldPlan | None = None
    bgr: np.ndarray | None = None  # the decoded image; its fields are preprocessed batch by batch
    gpu: DeviceImage | None = None  # or the image decoded on the GPU (RGB), where it was
    failure: Exception | None = None  # why it cannot be classified (ImageError, TilingError), where it cannot
    quality: list[FieldQuality] | None = None  # each field's quality (runtime/pipeline/quality.py); None: --qc off

    @property
    def n_fields(self) -> int:
        return self.plan.n_fields if self.plan is not None and self.result.error is None else 0


Input = str | Path | np.ndarray | ImageInput | Prepared


def prepare(item: Input, contract: Contract, max_pixels: int, model: ModelInfo | None = None,
            into: Buffer | None = None, gpu_jpeg: GpuJpegDecoder | None = None, quality: bool = True,
            stain: StainReference | None = None) -> Prepared:
    """Read (paths), decode (bytes, arrays) and tile one input, and measure its fields' quality (``quality``; their
    stain drift against ``stain``, the model's stain reference, where it has one); a failure becomes its result's
    error. ``into``: where its pixels are decoded (the GPU paths' page-locked buffers),
    only for a caller that releases them; ``gpu_jpeg``: a JPEG decoded on the GPU where that decoder takes it (its
    quality read from every second row brought back, never the whole image)."""
    if isinstance(item, Prepared):
        return item
    if not isinstance(item, ImageInput):
        item = ImageInput("<array>", array=item) if isinstance(item, np.ndarray) else ImageInput(str(item))
    res = Result(path=item.name, model=model)
    if item.error is not None:
        res.error = item.error
        return Prepared(res)
    t0 = time.perf_counter()
    on_gpu: DeviceImage | None = None
    dec: Decoded | None = None
    try:
        if item.array is not None:
            dec = to_bgr8(item.array, item.name)
        else:
            data, name = (item.data, item.name) if item.data is not None else \
                (read_bytes(item.name), str(Path(item.name)))
            on_gpu = gpu_jpeg.decode_file(data, name, max_pixels) if gpu_jpeg is not None else None
            dec = None if on_gpu is not None else decode(data, name, max_pixels, into)
        if dec is not None:
            (h, w), res.conversions, res.warnings = dec.bgr.shape[:2], dec.conversions, dec.warnings
        else:
            assert on_gpu is not None
            h, w = on_gpu.height, on_gpu.width
        res.size = (w, h)
        wrong_scale = name_warning(item.name, contract)
        if wrong_scale:
            res.warnings.append(wrong_scale)
        plan = plan_fields(h, w, contract)
    except (ImageError, TilingError) as e:
        res.error = str(e) if isinstance(e, ImageError) else f"{item.name}: {e}"
        return Prepared(res, failure=e)
    t1 = time.perf_counter()
    res.timings_ms = {"decode": (t1 - t0) * 1e3}
    fields = None
    if quality:
        if dec is not None:
            sparse = dec.bgr[::STEP, ::STEP]
        else:
            assert gpu_jpeg is not None and on_gpu is not None
            sparse = gpu_jpeg.sparse(on_gpu, STEP)
        fields = assess(sparse, plan, contract.field_size, item.min_tissue, stain)
        res.timings_ms["quality"] = (time.perf_counter() - t1) * 1e3
    return Prepared(res, plan, None if dec is None else dec.bgr, on_gpu, quality=fields)


def open_gpu_jpeg(choice: str, preprocess: str, notes: list[str]) -> GpuJpegDecoder | None:
    """Where JPEGs are decoded: "cpu"; "gpu" (nvImageCodec, which must pass its self-check: fails loudly where it
    cannot); "auto": the GPU next to GPU preprocessing where nvImageCodec is installed and passes, else the CPU
    (a note says why where it is installed)."""
    from runtime.backends.choose import DECODERS
    from runtime.gpu.jpeg import GpuDecodeUnavailable, GpuJpegDecoder, NvImageCodecMissing

    if choice not in DECODERS:
        raise ValueError(f"decode must be one of {', '.join(DECODERS)}, not {choice!r}")
    if choice == "cpu" or (choice == "auto" and preprocess != "gpu"):
        return None
    if preprocess != "gpu":
        raise GpuDecodeUnavailable("decode gpu needs GPU preprocessing (a GPU backend, or --preprocess gpu)")
    try:
        return GpuJpegDecoder()
    except GpuDecodeUnavailable as e:
        if choice == "gpu":
            raise
        if not isinstance(e, NvImageCodecMissing):
            notes.append(f"decode auto chose the CPU: {str(e).splitlines()[0]}")
        return None


def prefetch(items: Iterable[Input], prepare: Callable[[Input], Prepared], workers: int,
             ahead: int) -> Iterator[Prepared]:
    """Prepared inputs in input order. With several workers, up to ``ahead`` inputs are prepared in a pool while
    the caller infers: decoding overlaps inference, and memory stays bounded whatever the number of inputs."""
    if workers <= 1:
        yield from map(prepare, items)
        return
    window: deque[Future] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        for item in items:
            window.append(pool.submit(prepare, item))
            if len(window) >= ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
