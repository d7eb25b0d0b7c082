"""A slide's fields as CSV: one row per field."""
from __future__ import annotations

import csv
import io

from runtime.pipeline.quality import MEASURES
from runtime.slides.fields import SlideField


def field_csv(fields: list[SlideField], model_tag: str) -> str:
    """One row per field, its level-0 box, status, probability, quality measures and the model."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["row", "col", "minx", "miny", "width", "height", "tissue", "status", "probability", "label",
                "error", "fast_probability", "qc_flags", *(f"qc_{m}" for m in MEASURES), "model"])
    # minx, miny, width, height, probability: as WSInfer writes them
    for f in fields:
        w.writerow([f.row, f.col, f.x, f.y, f.width, f.height, f"{f.tissue:.3f}", f.status,
                    "" if f.probability is None else f"{f.probability:.6f}", f.label or "", f.error or "",
                    "" if f.fast_probability is None else f"{f.fast_probability:.6f}", " ".join(f.flags),
                    *("" if f.quality is None or m not in f.quality else f"{f.quality[m]:.4g}" for m in MEASURES),
                    model_tag])
    return out.getvalue()
