"""A slide in bands of field rows, each classified on its own (a cohort's unit of work), and one slide's result
and overlay from its bands'."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.io.decode import DEFAULT_MAX_PIXELS, ImageError
from runtime.io.scale import Scale, resample_factor
from runtime.io.slide_source import open_source
from runtime.model.manifest import Contract
from runtime.slides.aggregate import region_verdict
from runtime.slides.overlay import with_legend
from runtime.slides.result import SlideResult


def field_rows(path: Path | str, contract: Contract, scale: Scale | None = None,
               max_pixels: int | None = None) -> int:
    """How many rows of fields ``path`` has at the model's scale (what a cohort splits into bands)."""
    src = open_source(path, max_pixels or DEFAULT_MAX_PIXELS)
    try:
        factor, _ = resample_factor(scale or src.scale, contract)
        return int(src.sizes[0][1] // (contract.field_size[0] * factor))
    finally:
        src.close()


def merge_bands(parts: list[SlideResult], aggregate: str, top_k: int, threshold: float,
                labels: tuple[str, str]) -> SlideResult:
    """One slide's result from the results of its bands of field rows (each classified on its own)."""
    fields = sorted((f for p in parts for f in p.fields), key=lambda f: (f.row, f.col))
    return replace(parts[0], fields=fields, counts={k: sum(p.counts[k] for p in parts) for k in parts[0].counts},
                   warnings=list(dict.fromkeys(w for p in parts for w in p.warnings)),
                   timings_ms={k: sum(p.timings_ms.get(k, 0.0) for p in parts) for k in parts[0].timings_ms},
                   aggregate=region_verdict(fields, aggregate, top_k, threshold, labels))


def merge_overlays(parts: list[tuple[SlideResult, bytes]], aggregate: dict[str, Any]) -> bytes:
    """One overlay PNG from the bands' own: each band's rows of the thumbnail taken from the band that drew them
    (a band's overlay differs from the thumbnail only inside its own fields), with the legend of the slide's
    ``aggregate``."""
    images: list[np.ndarray] = []
    for _, png in parts:
        img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ImageError("a band's overlay could not be decoded")
        images.append(img)
    out = images[0].copy()
    for (res, _), img in zip(parts, images):
        if res.fields:
            t_down = res.size[0] / img.shape[1]
            y0, y1 = min(f.y for f in res.fields), max(f.y + f.height for f in res.fields)
            out[int(y0 / t_down):int(y1 / t_down)] = img[int(y0 / t_down):int(y1 / t_down)]
    return cv2.imencode(".png", with_legend(out, aggregate))[1].tobytes()
