"""A slide's probability map: one float32 pixel per field, as a pyramidal OME-TIFF."""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from runtime.slides.fields import SlideField


def ome_tiff(fields: list[SlideField], mpp: float | None) -> bytes:
    """A pyramidal OME-TIFF, one float32 pixel per field (NaN: background or error), with the field's physical
    size where the scale (``mpp``) is known: QuPath and tifffile open it."""
    import tifffile

    rows = 1 + max((f.row for f in fields), default=-1)
    cols = 1 + max((f.col for f in fields), default=-1)
    grid = np.full((max(rows, 1), max(cols, 1)), np.nan, np.float32)
    for f in fields:
        if f.probability is not None:
            grid[f.row, f.col] = f.probability
    levels = [grid]
    while min(levels[-1].shape) >= 32:
        levels.append(levels[-1][::2, ::2])
    meta: dict[str, Any] = {"axes": "YX", "Name": "probability per field"}
    first = next(iter(fields), None)
    if mpp and first is not None:
        meta |= {"PhysicalSizeX": mpp * first.width, "PhysicalSizeXUnit": "µm",
                 "PhysicalSizeY": mpp * first.height, "PhysicalSizeYUnit": "µm"}
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata=meta)
        for level in levels[1:]:
            tw.write(level, subfiletype=1)
    return buf.getvalue()
