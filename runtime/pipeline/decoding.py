"""The decode-and-plan stage: an input read, decoded within the pixel limit and tiled into fields, once (the server
runs it before queueing, the classifier for everything else), and a pool that runs it ahead of inference."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.io.decode import Buffer, ImageError, decode, read_image, to_bgr8
from runtime.io.inputs import ImageInput
from runtime.io.scale import name_warning
from runtime.model.manifest import Contract
from runtime.pipeline.results import ModelInfo, Result
from runtime.pipeline.tiling import FieldPlan, TilingError, plan_fields


@dataclass
class Prepared:
    """An input ready for inference (``plan`` and ``bgr`` set), or its result already an error (``failure``)."""

    result: Result
    plan: FieldPlan | None = None
    bgr: np.ndarray | None = None  # the decoded image; its fields are preprocessed batch by batch
    failure: Exception | None = None  # why it cannot be classified (ImageError, TilingError), where it cannot

    @property
    def n_fields(self) -> int:
        return self.plan.n_fields if self.plan is not None and self.result.error is None else 0


Input = str | Path | np.ndarray | ImageInput | Prepared


def prepare(item: Input, contract: Contract, max_pixels: int, model: ModelInfo | None = None,
            into: Buffer | None = None) -> Prepared:
    """Read (paths), decode (bytes, arrays) and tile one input; a failure becomes its result's error. ``into``:
    where its pixels are decoded (the GPU paths' page-locked buffers), only for a caller that releases them."""
    if isinstance(item, Prepared):
        return item
    if not isinstance(item, ImageInput):
        item = ImageInput("<array>", array=item) if isinstance(item, np.ndarray) else ImageInput(str(item))
    res = Result(path=item.name, model=model)
    if item.error is not None:
        res.error = item.error
        return Prepared(res)
    t0 = time.perf_counter()
    try:
        dec = to_bgr8(item.array, item.name) if item.array is not None else \
            decode(item.data, item.name, max_pixels, into) if item.data is not None else \
            read_image(item.name, max_pixels, into)
        h, w = dec.bgr.shape[:2]
        res.size, res.conversions, res.warnings = (w, h), dec.conversions, dec.warnings
        wrong_scale = name_warning(item.name, contract)
        if wrong_scale:
            res.warnings.append(wrong_scale)
        plan = plan_fields(h, w, contract)
    except (ImageError, TilingError) as e:
        res.error = str(e) if isinstance(e, ImageError) else f"{item.name}: {e}"
        return Prepared(res, failure=e)
    res.timings_ms = {"decode": (time.perf_counter() - t0) * 1e3}
    return Prepared(res, plan, dec.bgr)


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
