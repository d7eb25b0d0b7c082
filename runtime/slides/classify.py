"""Slides, stage mosaics and large regions: fields tiled at the model's scale, background skipped, every field's
probability with its level-0 coordinates, a named region verdict, and GeoJSON (QuPath), CSV and an overlay image.

Memory: a tiled TIFF is read tile by tile; what is held at once is the thumbnail (<= 1024 px side, made block by block),
one chunk of field crops (CHUNK x 0.9 MB) and the classifier's batch, whatever the slide's size. PNG/JPEG and other
formats without tiles are decoded whole, within --max-pixels.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from runtime.io.decode import ImageError
from runtime.io.inputs import ImageInput
from runtime.io.scale import Scale, resample_factor
from runtime.io.slide_source import Source, open_source
from runtime.pipeline.classifier import Classifies
from runtime.pipeline.quality import BACKGROUND_SATURATION, BACKGROUND_VALUE, MIN_TISSUE, background
from runtime.slides.aggregate import AGGREGATES, region_verdict
from runtime.slides.fields import SlideField
from runtime.slides.overlay import overlay_image, with_legend
from runtime.slides.result import SlideResult

# Tissue rule: under brightfield, glass is bright and grey. A thumbnail pixel is background when its HSV value is
# >= 220 and its saturation <= 15 (of 255); a field is classified when >= --min-tissue of its pixels are not.
# (On the 58 shared BreakHis fields, tissue fractions are 0.41-1.0: every one of them is kept at the default 0.25.)
CHUNK = 32  # fields cut and handed to the classifier at a time


class Cancelled(Exception):
    """The work was cancelled (the server's DELETE /v1/slide/ID, or the server stopping)."""


def classify_slide(clf: Classifies, path: Path | str, aggregate: str = "max", top_k: int = 3,
                   scale: Scale | None = None, tissue_mask: bool = True, min_tissue: float = MIN_TISSUE,
                   max_pixels: int | None = None, overlay: Path | None = None,
                   progress: Callable[[int, int], None] | None = None, name: str | None = None,
                   rows: tuple[int, int] | None = None, cancelled: threading.Event | None = None) -> SlideResult:
    """Tile ``path`` into fields at the model's scale, skip background, classify the rest in chunks and aggregate.
    ``scale`` overrides what the file states; ``name`` is what results and messages call it (default: the path);
    ``rows`` (start, stop): only that band of field rows (``bands.merge_bands`` joins the bands of a slide).
    ``cancelled``: set, the work stops (Cancelled) at the next step, planning included. Raises ImageError for an
    unreadable file."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, not {aggregate!r}")
    t0 = time.perf_counter()
    src = open_source(path, max_pixels or clf.max_pixels)
    src.name = name or src.name
    try:
        return _classify(clf, src, aggregate, top_k, scale or src.scale, tissue_mask, min_tissue, overlay, progress,
                         t0, rows, cancelled)
    finally:
        src.close()


def _classify(clf: Classifies, src: Source, aggregate: str, top_k: int, scale: Scale, tissue_mask: bool,
              min_tissue: float, overlay: Path | None, progress: Callable[[int, int], None] | None,
              t0: float, band: tuple[int, int] | None = None,
              cancelled: threading.Event | None = None) -> SlideResult:
    def check() -> None:
        if cancelled is not None and cancelled.is_set():
            raise Cancelled("cancelled")

    c = clf.contract
    factor, warnings = resample_factor(scale, c)
    fh, fw = c.field_size
    W, H = src.sizes[0]
    cols, rows = int(W // (fw * factor)), int(H // (fh * factor))
    # The level read: the coarsest one that still has at least the model's resolution.
    level = max((i for i, d in enumerate(src.downsamples) if d <= factor * (1 + 1e-6)), default=0)
    check()
    thumb, t_down = src.thumbnail()
    glass = background(thumb)
    fields = []
    r0, r1 = band or (0, rows)
    for r in range(r0, min(r1, rows)):
        check()  # a cancelled job stops while planning, row by row
        for col in range(cols):
            x, y = round(col * fw * factor), round(r * fh * factor)
            w, h = round((col + 1) * fw * factor) - x, round((r + 1) * fh * factor) - y
            tissue = 1.0 - float(glass[int(y / t_down):max(int(y / t_down) + 1, int((y + h) / t_down)),
                                             int(x / t_down):max(int(x / t_down) + 1, int((x + w) / t_down))].mean())
            keep = not tissue_mask or tissue >= min_tissue
            fields.append(SlideField(r, col, x, y, w, h, round(tissue, 4), "classified" if keep else "background"))
    t_plan = time.perf_counter()
    todo = [f for f in fields if f.status == "classified"]
    for i in range(0, len(todo), CHUNK):
        chunk, crops = [], []
        for f in todo[i:i + CHUNK]:
            try:
                crops.append(ImageInput(f"{src.name} field r{f.row} c{f.col}", array=_crop(src, level, f, (fw, fh)),
                                        min_tissue=min_tissue if tissue_mask else 0.0))  # mask off: glass counts
                chunk.append(f)
            except ImageError as e:  # a damaged tile costs the fields that touch it, not the slide
                f.status, f.error = "error", str(e)
        for f, res in zip(chunk, clf.classify(crops) if crops else []):
            one = res.fields[0] if len(res.fields) == 1 else None  # a crop is one field
            if one is not None:
                f.quality, f.flags = one.quality, one.flags
            if one is not None and one.label is None:  # --qc withhold: its quality flags keep it out
                f.status, f.probability = "withheld", one.probability
            elif res.error or res.probability is None:
                f.status, f.error = "error", res.error
            else:
                f.probability, f.label = res.probability, res.label
                f.fast_probability = one.fast_probability if one is not None else None
        if progress:
            progress(min(i + CHUNK, len(todo)), len(todo))
    t_infer = time.perf_counter()
    warnings += src.problems()
    if not fields:
        warnings.append(f"smaller than one field ({fw * factor:.0f}x{fh * factor:.0f} level-0 pixels at this scale)")
    counts = {"fields": len(fields), "classified": sum(f.status == "classified" for f in fields),
              "background": sum(f.status == "background" for f in fields),
              "errors": sum(f.status == "error" for f in fields),
              "rechecked": sum(f.fast_probability is not None for f in fields),
              "flagged": sum(bool(f.flags) for f in fields), "withheld": sum(f.status == "withheld" for f in fields)}
    result = SlideResult(
        path=src.name, size=(W, H), levels=len(src.sizes),
        scale={"magnification": scale.magnification, "mpp": scale.mpp, "source": scale.source,
               "model_magnification": c.magnification, "model_mpp": c.mpp, "factor": factor, "level": level,
               "level_downsample": src.downsamples[level]},
        aggregate=region_verdict(fields, aggregate, top_k, c.threshold, c.labels),
        counts=counts, tissue_rule=(f"background: HSV value >= {BACKGROUND_VALUE} and saturation <= "
                                    f"{BACKGROUND_SATURATION}; classified when tissue >= {min_tissue:g}"
                                    if tissue_mask else "off: every field classified"),
        fields=fields, warnings=warnings, model=clf.model_info,
        timings_ms={"plan_and_mask": (t_plan - t0) * 1e3, "classify": (t_infer - t_plan) * 1e3})
    if overlay is not None:  # a band's overlay gets its legend once the bands are merged (bands.merge_overlays)
        image = overlay_image(thumb, t_down, fields)
        image = with_legend(image, result.aggregate) if band is None else image
        # encoded here and written by Python: OpenCV's imwrite crashes on names that are not valid UTF-8
        Path(overlay).write_bytes(cv2.imencode(".png", image)[1].tobytes())
    result.timings_ms["total"] = (time.perf_counter() - t0) * 1e3
    return result


def _crop(src: Source, level: int, f: SlideField, size: tuple[int, int]) -> np.ndarray:
    """The field's pixels at the model's scale: read at ``level``, resized only where that level's pixels are not
    the model's (exact crops at the model's scale, so a field equals the same pixels given as an image)."""
    d = src.downsamples[level]
    lw, lh = src.sizes[level]
    x, y = min(round(f.x / d), lw - 1), min(round(f.y / d), lh - 1)
    w, h = min(max(1, round(f.width / d)), lw - x), min(max(1, round(f.height / d)), lh - y)
    img = src.read(level, x, y, w, h)
    if (img.shape[1], img.shape[0]) != size:
        shrink = img.shape[1] > size[0]
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return img
