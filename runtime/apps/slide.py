"""Slides, stage mosaics and large regions: fields tiled at the model's scale, background skipped, every field's
probability with its level-0 coordinates, a named region verdict, and GeoJSON (QuPath), CSV and an overlay image.

Memory: a tiled TIFF is read tile by tile; what is held at once is the thumbnail (<= 1024 px side, made block by block),
one chunk of field crops (CHUNK x 0.9 MB) and the classifier's batch, whatever the slide's size. PNG/JPEG and other
formats without tiles are decoded whole, within --max-pixels.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.errors import BreakhisError
from runtime.io.decode import DEFAULT_MAX_PIXELS, ImageError
from runtime.io.inputs import ImageInput
from runtime.io.scale import Scale, resample_factor
from runtime.io.slide_source import Source, open_source, slide_identity
from runtime.model.manifest import Contract
from runtime.pipeline.classifier import Classifies
from runtime.pipeline.quality import BACKGROUND_SATURATION, BACKGROUND_VALUE, MEASURES, MIN_TISSUE, background
from runtime.pipeline.results import ModelInfo, withheld_count

AGGREGATES = ("max", "topk", "mean", "fraction")
# Tissue rule: under brightfield, glass is bright and grey. A thumbnail pixel is background when its HSV value is
# >= 220 and its saturation <= 15 (of 255); a field is classified when >= --min-tissue of its pixels are not.
# (On the 58 shared BreakHis fields, tissue fractions are 0.41-1.0: every one of them is kept at the default 0.25.)
CHUNK = 32  # fields cut and handed to the classifier at a time


@dataclass
class SlideField:
    row: int
    col: int
    x: int  # level-0 pixels: the field's top-left corner and size
    y: int
    width: int
    height: int
    tissue: float  # fraction of the field's thumbnail pixels that are not background
    status: str  # "classified", "background" (skipped by the tissue mask), "withheld" (--qc withhold) or "error"
    probability: float | None = None  # FP32's where the field was re-checked
    label: str | None = None
    error: str | None = None
    fast_probability: float | None = None  # the fast tier's, where FP32 re-checked the field
    quality: dict[str, float] | None = None  # its quality measures (runtime/pipeline/quality.py)
    flags: list[str] = field(default_factory=list)  # the quality limits it crosses


@dataclass
class SlideResult:
    path: str
    size: tuple[int, int]  # level-0 (width, height)
    levels: int
    scale: dict[str, Any]  # what the input states, where from, the model's, the factor and the level read
    aggregate: dict[str, Any]  # rule, value, label, meaning
    counts: dict[str, int]
    tissue_rule: str
    fields: list[SlideField] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    model: ModelInfo | None = None
    sha256: str | None = None  # of the file classified, where it was hashed (its outputs are named by it)

    @property
    def left_out(self) -> bool:
        """No verdict because fields were left out (withheld by the quality check, or unread) and the counted ones
        do not give the positive label (the aggregate's note says why)."""
        return "unread" in self.aggregate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"model": self.model.to_dict() if self.model else {}}

    def geojson(self) -> dict[str, Any]:
        """A FeatureCollection of the classified fields and those the quality check withheld (class "withheld",
        grey: the fields that can block the verdict are seen in QuPath too; File > Import objects), level-0 pixel
        polygons; each feature's ``id`` a UUID unique to the file (its sha256) and field, the same on every run."""
        feats, ident = [], f"breakhis-edge:{self.sha256 or self.path}"
        for f in self.fields:
            if f.status not in ("classified", "withheld"):
                continue
            ring = [[f.x, f.y], [f.x + f.width, f.y], [f.x + f.width, f.y + f.height], [f.x, f.y + f.height],
                    [f.x, f.y]]
            feats.append({"type": "Feature", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ident}#r{f.row}c{f.col}")),
                          "geometry": {"type": "Polygon", "coordinates": [ring]},
                          "properties": {"objectType": "tile", "name": f"field r{f.row} c{f.col}",
                                         "classification": {"name": f.label or "withheld", "color": list(
                                             _rgb(f.probability if f.status == "classified" else None))},
                                         "measurements": {"probability": f.probability, "tissue": f.tissue} | (
                                             {} if f.fast_probability is None else
                                             {"fast_probability": f.fast_probability}) | {
                                             f"qc_{k}": v for k, v in (f.quality or {}).items()},
                                         "qc_flags": f.flags,
                                         "rechecked": f.fast_probability is not None,
                                         "row": f.row, "col": f.col}})
        # a foreign member (RFC 7946, 6.1): the region's verdict, its warnings and the model, beside the tiles
        return {"type": "FeatureCollection", "features": feats,
                "breakhis": {"aggregate": self.aggregate, "warnings": self.warnings, "model": self.model_tag()}}

    def model_tag(self) -> str:
        """The model as a table cell says it: name@sha256 (first 12) and the precision that ran."""
        m = self.model
        return f"{m.name}@{m.sha256[:12]} {m.precision}" if m else ""

    def outputs(self) -> dict[str, bytes]:
        """STEM suffix -> bytes: .geojson, .csv, .json and the probability map .probability.ome.tif (the overlay PNG
        is made while classifying)."""
        return {".geojson": (json.dumps(self.geojson()) + "\n").encode(), ".csv": self.csv().encode(),
                ".json": (json.dumps(self.to_dict(), indent=1) + "\n").encode(),
                ".probability.ome.tif": self.probability_map()}

    def save(self, stem: str | Path) -> None:
        """Write every output beside STEM, each under a temporary name renamed into place."""
        for suffix, data in self.outputs().items():
            write_atomic(Path(f"{stem}{suffix}"), data)

    def probability_map(self) -> bytes:
        """A pyramidal OME-TIFF, one float32 pixel per field (NaN: background or error), with the field's physical
        size where the scale is known: QuPath and tifffile open it."""
        import tifffile

        rows = 1 + max((f.row for f in self.fields), default=-1)
        cols = 1 + max((f.col for f in self.fields), default=-1)
        grid = np.full((max(rows, 1), max(cols, 1)), np.nan, np.float32)
        for f in self.fields:
            if f.probability is not None:
                grid[f.row, f.col] = f.probability
        levels = [grid]
        while min(levels[-1].shape) >= 32:
            levels.append(levels[-1][::2, ::2])
        meta: dict[str, Any] = {"axes": "YX", "Name": "probability per field"}
        mpp, first = self.scale.get("mpp"), next(iter(self.fields), None)
        if mpp and first is not None:
            meta |= {"PhysicalSizeX": mpp * first.width, "PhysicalSizeXUnit": "µm",
                     "PhysicalSizeY": mpp * first.height, "PhysicalSizeYUnit": "µm"}
        buf = io.BytesIO()
        with tifffile.TiffWriter(buf, ome=True) as tw:
            tw.write(levels[0], subifds=len(levels) - 1, metadata=meta)
            for level in levels[1:]:
                tw.write(level, subfiletype=1)
        return buf.getvalue()

    def csv(self) -> str:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["row", "col", "minx", "miny", "width", "height", "tissue", "status", "probability", "label",
                    "error", "fast_probability", "qc_flags", *(f"qc_{m}" for m in MEASURES), "model"])
        # minx, miny, width, height, probability: as WSInfer writes them
        for f in self.fields:
            w.writerow([f.row, f.col, f.x, f.y, f.width, f.height, f"{f.tissue:.3f}", f.status,
                        "" if f.probability is None else f"{f.probability:.6f}", f.label or "", f.error or "",
                        "" if f.fast_probability is None else f"{f.fast_probability:.6f}", " ".join(f.flags),
                        *("" if f.quality is None else f"{f.quality[m]:.4g}" for m in MEASURES), self.model_tag()])
        return out.getvalue()


def classify_slide(clf: Classifies, path: Path | str, aggregate: str = "max", top_k: int = 3,
                   scale: Scale | None = None, tissue_mask: bool = True, min_tissue: float = MIN_TISSUE,
                   max_pixels: int | None = None, overlay: Path | None = None,
                   progress: Callable[[int, int], None] | None = None, name: str | None = None,
                   rows: tuple[int, int] | None = None) -> SlideResult:
    """Tile ``path`` into fields at the model's scale, skip background, classify the rest in chunks and aggregate.
    ``scale`` overrides what the file states; ``name`` is what results and messages call it (default: the path);
    ``rows`` (start, stop): only that band of field rows (merge_bands joins the bands of a slide).
    Raises ImageError for an unreadable file."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, not {aggregate!r}")
    t0 = time.perf_counter()
    src = open_source(path, max_pixels or clf.max_pixels)
    src.name = name or src.name
    try:
        return _classify(clf, src, aggregate, top_k, scale or src.scale, tissue_mask, min_tissue, overlay, progress,
                         t0, rows)
    finally:
        src.close()


def _classify(clf: Classifies, src: Source, aggregate: str, top_k: int, scale: Scale, tissue_mask: bool,
              min_tissue: float, overlay: Path | None, progress: Callable[[int, int], None] | None,
              t0: float, band: tuple[int, int] | None = None) -> SlideResult:
    c = clf.contract
    factor, warnings = resample_factor(scale, c)
    fh, fw = c.field_size
    W, H = src.sizes[0]
    cols, rows = int(W // (fw * factor)), int(H // (fh * factor))
    # The level read: the coarsest one that still has at least the model's resolution.
    level = max((i for i, d in enumerate(src.downsamples) if d <= factor * (1 + 1e-6)), default=0)
    thumb, t_down = src.thumbnail()
    glass = background(thumb)
    fields = []
    r0, r1 = band or (0, rows)
    for r in range(r0, min(r1, rows)):
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
    if overlay is not None:  # a band's overlay gets its legend once the bands are merged (merge_overlays)
        image = overlay_image(thumb, t_down, fields)
        image = with_legend(image, result.aggregate) if band is None else image
        # encoded here and written by Python: OpenCV's imwrite crashes on names that are not valid UTF-8
        Path(overlay).write_bytes(cv2.imencode(".png", image)[1].tobytes())
    result.timings_ms["total"] = (time.perf_counter() - t0) * 1e3
    return result


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


def _umask() -> int:
    """The process's umask (read once, at import: setting it to read it is not thread-safe later)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()


def write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` whole or not at all: written under a temporary name in its folder, then renamed;
    its mode is the user's umask's, as any file the user writes (mkstemp's own is 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:80]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~UMASK)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_stem(folder: Path, name: str, sha256: str) -> Path:
    """FOLDER/NAME.<first 12 hex of the file's sha256>: two inputs of one name (other folders, a reused name) never
    write over each other's results, and the same file always lands on the same names."""
    return folder / f"{Path(name).name}.{sha256[:12]}"


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


def aggregate_verdict(probs: list[float | None], rule: str, top_k: int, threshold: float,
                      labels: tuple[str, str], withheld: list[SlideField] | None = None,
                      unread: int = 0) -> dict[str, Any]:
    """The region's verdict from its classified fields, by a named rule (max = the screening default). Fields left
    out, ``withheld`` by the quality check or ``unread`` (a damaged tile), can only take a verdict away: a region
    the counted fields call the positive label keeps it; otherwise, with any field left out, it gets no verdict (a
    note that says why: a field left out could be the positive one)."""
    p = np.asarray([v for v in probs if v is not None], np.float64)
    held = withheld or []
    meaning = {"max": "highest field probability: one malignant field makes the region Malignant (screening)",
               "topk": f"mean of the {top_k} highest field probabilities",
               "mean": "mean field probability",
               "fraction": f"fraction of fields that are {labels[1]}; {labels[1]} when above {threshold:g}"}[rule]
    out: dict[str, Any] = {"rule": rule, "meaning": meaning, "fields": int(p.size)}
    if rule == "topk":
        out["k"] = top_k
    value = None if not p.size else float({"max": lambda: p.max(), "topk": lambda: np.sort(p)[-top_k:].mean(),
                                           "mean": lambda: p.mean(),
                                           "fraction": lambda: (p > threshold).mean()}[rule]())
    if (held or unread) and (value is None or value <= threshold):
        total = p.size + len(held) + unread
        left = ([withheld_count(held, total)] if held else []) + \
            ([f"{unread} of {total} fields could not be read"] if unread else [])
        counted = "no field was counted" if value is None else \
            f"the counted fields give {rule} = {value:.4f}, not above {threshold:g}"
        return out | {"value": None, "label": None, "withheld": len(held), "unread": unread,
                      "note": f"no verdict: {'; '.join(left)}; {counted}, and a field left out could be {labels[1]}, "
                              f"so the region is not called {labels[0]}"}
    if value is None:
        return out | {"value": None, "label": None, "note": "no tissue field to classify"}
    return out | {"value": value, "label": labels[1] if value > threshold else labels[0]}


def region_verdict(fields: list[SlideField], rule: str, top_k: int, threshold: float,
                   labels: tuple[str, str]) -> dict[str, Any]:
    """``aggregate_verdict`` of a slide's fields: the classified ones counted, the withheld and unread left out."""
    return aggregate_verdict([f.probability for f in fields if f.status == "classified"], rule, top_k, threshold,
                             labels, [f for f in fields if f.status == "withheld"],
                             sum(f.status == "error" for f in fields))


def _rgb(p: float | None) -> tuple[int, int, int]:
    """Green (benign) through yellow (0.5) to blue (malignant): blue stands out on H&E's pinks and purples, where a
    red tint on eosin does not."""
    if p is None:
        return 128, 128, 128
    if p <= 0.5:
        return int(255 * 2 * p), 200 + int(55 * 2 * p), 0
    t = 2 * p - 1
    return int(255 * (1 - t)), int(255 - 195 * t), int(255 * t)


LEGEND = 44  # pixels of the legend strip under the overlay


def with_legend(overlay: np.ndarray, aggregate: dict[str, Any]) -> np.ndarray:
    """The overlay with a strip under it: the colour scale of p(malignant), what the outlines mean, and the region's
    verdict (or why there is none)."""
    h, w = overlay.shape[:2]
    width = max(w, 480)
    out = np.full((h + LEGEND, width, 3), 255, np.uint8)
    out[:h, :w] = overlay
    for i in range(160):  # the scale: p 0 .. 1
        r, g, b = _rgb(i / 159)
        out[h + 6:h + 20, 8 + i] = (b, g, r)
    text = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(out, "p(malignant) 0 .. 1; amber outline: quality flag", (176, h + 18), text, 0.4, (0, 0, 0), 1,
                cv2.LINE_AA)
    verdict = (f"{aggregate['label']} ({aggregate['rule']} = {aggregate['value']:.3f})" if aggregate["label"]
               else aggregate.get("note", "no verdict"))
    chars = max(40, (width - 16) // 8)  # about 8 pixels a character at this size: the note wrapped, never cut
    lines = [verdict[i:i + chars] for i in range(0, len(verdict), chars)]
    out = np.vstack([out, np.full((16 * (len(lines) - 1), width, 3), 255, np.uint8)])
    for k, line in enumerate(lines):
        cv2.putText(out, line, (8, h + 37 + 16 * k), text, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def overlay_image(thumb: np.ndarray, t_down: float, fields: list[SlideField]) -> np.ndarray:
    """The thumbnail with every classified field tinted by its probability, errors crossed, background untouched;
    a field with a quality flag outlined in amber (withheld ones untinted)."""
    tint, out = thumb.copy(), thumb.copy()
    boxes = [(f, (int(f.x / t_down), int(f.y / t_down)),
              (int((f.x + f.width) / t_down) - 1, int((f.y + f.height) / t_down) - 1)) for f in fields]
    for f, a, b in boxes:
        if f.status == "classified":
            r, g, bl = _rgb(f.probability)
            cv2.rectangle(tint, a, b, (bl, g, r), -1)
        elif f.status == "error":
            cv2.line(out, a, b, (0, 0, 0), 1)
    out = cv2.addWeighted(tint, 0.45, out, 0.55, 0)
    for f, a, b in boxes:
        if f.flags:
            cv2.rectangle(out, a, b, (0, 160, 224), 2)
        elif f.status == "classified":
            cv2.rectangle(out, a, b, (60, 60, 60), 1)
    return out


EPILOG = """examples:
  python -m runtime.slide mosaic.ome.tif --out results/        # GeoJSON, CSV, overlay PNG and JSON per input
  python -m runtime.slide region.png --magnification 100 --aggregate topk --top-k 5
  python -m runtime.slide slide.svs --no-tissue-mask --json    # every field, JSON on stdout
"""


def main(argv: list[str] | None = None) -> int:
    from runtime.apps.options import add_model_options, open_classifier
    from runtime.errors import report

    ap = argparse.ArgumentParser(prog="python -m runtime.slide", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path,
                    help="slides, mosaics or large images (TIFF family read lazily), or DICOM slides (the folder of "
                         "a slide's instances)")
    ap.add_argument("--out", type=Path, default=Path("slide-results"),
                    help="folder for STEM.geojson, STEM.csv, STEM.overlay.png and STEM.json, STEM being the file's "
                         "name and the start of its sha256 (default: slide-results)")
    ap.add_argument("--aggregate", choices=AGGREGATES, default="max",
                    help="the region verdict's rule (default: max, the screening rule); named in every output")
    ap.add_argument("--top-k", type=int, default=3, help="fields averaged by --aggregate topk (default: 3)")
    ap.add_argument("--magnification", type=float, default=None,
                    help="the input's objective magnification, overriding what the file states (e.g. 200)")
    ap.add_argument("--mpp", type=float, default=None,
                    help="the input's microns per pixel at level 0, overriding what the file states")
    ap.add_argument("--no-tissue-mask", action="store_true", help="classify every field, background too")
    ap.add_argument("--min-tissue", type=float, default=MIN_TISSUE,
                    help=f"fraction of a field that must be tissue for it to be classified (default: {MIN_TISSUE})")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the results as a JSON list instead of a table")
    fmt.add_argument("--jsonl", action="store_true",
                     help="print one JSON object per line, as each slide is done (as runtime.classify --jsonl)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_model_options(ap, max_pixels=100_000_000, max_pixels_why="tiled slides are read tile by tile "
                      "whatever their size; this bounds images without tiles, decoded whole")
    args = ap.parse_args(argv)
    if args.top_k < 1 or not 0 <= args.min_tissue <= 1:
        ap.error("--top-k must be at least 1 and --min-tissue between 0 and 1")
    scale = Scale(args.magnification, args.mpp, "flag") if args.magnification or args.mpp else None
    try:
        clf = open_classifier(args)
    except BreakhisError as e:
        return report(e)
    args.out.mkdir(parents=True, exist_ok=True)
    results, failed = [], 0
    with clf:
        for path in args.inputs:
            bar = None if args.no_progress else field_bar(path)
            try:
                _, sha = slide_identity(path)  # a file, or a DICOM slide's folder
            except OSError as e:
                print(f"error: {path}: cannot read ({e.strerror or e})", file=sys.stderr)
                failed += 1
                continue
            stem = output_stem(args.out, path.name, sha)
            try:
                res = classify_slide(clf, path, args.aggregate, args.top_k, scale, not args.no_tissue_mask,
                                     args.min_tissue, args.max_pixels, Path(f"{stem}.overlay.png"), progress=bar)
            except BreakhisError as e:
                print(f"error: {e}", file=sys.stderr)
                failed += 1
                continue
            finally:
                if bar:
                    bar(-1, -1)
            res.sha256 = sha
            res.save(stem)
            if args.jsonl:
                print(json.dumps(res.to_dict()), flush=True)
            failed += res.counts["errors"] > 0 or res.left_out  # no verdict: like an error, exit 1
            if not args.jsonl:  # streamed: nothing held
                results.append(res)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    elif not args.jsonl:
        for r in results:  # names of any bytes stay printable
            print(_summary(r, args.out).encode("utf-8", "backslashreplace").decode())
    return 1 if failed else 0


def _summary(r: SlideResult, out: Path) -> str:
    a, n, s = r.aggregate, r.counts, r.scale
    verdict = f"{a['label']} ({a['rule']} = {a['value']:.4f})" if a["value"] is not None else a["note"]
    model = f"{s['model_magnification']:g}X" if s["model_magnification"] else "the model's"
    given = f"{s['magnification']:g}X" if s["magnification"] else "?"
    lines = [f"{r.path}: {verdict}",
             f"  {n['fields']} fields at {model} scale (input {given} from {s['source']}, factor {s['factor']:.3g}, "
             f"level {s['level']}): "
             f"{n['classified']} classified, {n['background']} background, {n['errors']} errors, "
             f"{n['flagged']} flagged and {n['withheld']} withheld by the quality check; "
             f"{r.timings_ms['total'] / 1e3:.1f} s",
             f"  wrote {output_stem(out, r.path, r.sha256 or '')}.geojson / .csv / .overlay.png / .json / "
             ".probability.ome.tif"]
    lines += [f"  WARNING: {w}" for w in r.warnings]
    if r.model and r.model.warning:
        lines.append(f"  WARNING: {r.model.warning}")
    return "\n".join(lines)


def field_bar(path: Path, position: int = 0) -> Callable[[int, int], None]:
    """A tqdm bar on stderr over a slide's fields, fed (done, total); (-1, -1) closes it."""
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if done < 0:
            if "bar" in state:
                state["bar"].close()
            return
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=path.name[-30:], unit="field", file=sys.stderr, position=position,
                                leave=position == 0)
        state["bar"].update(done - state["bar"].n)

    return update
