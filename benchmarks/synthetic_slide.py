"""A synthetic pyramidal BigTIFF made of real fields: each cell of a grid holds the model-scale field of a 700x460
BreakHis image (its top-left 672x448 pixels) or blank glass, written tile by tile (never whole in memory), with
downsampled levels as SubIFDs. For the slide tests, the slide benchmark and the overlay picture in docs/slides.md."""
from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

FIELD = (448, 672)  # (height, width): one field of the BreakHis contract at the model's scale
GLASS = 242  # blank glass: bright and grey


def write_mosaic(path: Path, layout: Sequence[Sequence[Path | None]], levels: int = 4, tile: int = 512,
                 magnification: float | None = 100.0, mpp: float | None = None,
                 compression: str = "zlib") -> tuple[int, int]:
    """Write the grid ``layout`` (rows of image paths or None for glass) as a tiled, zlib-compressed pyramidal
    BigTIFF; each level halves the previous one. ``magnification`` goes into the description as ``AppMag = N``
    (None: no scale stated); ``mpp``, microns per level-0 pixel, goes into the resolution tags. Returns level 0's
    (width, height)."""
    import tifffile

    rows, cols = len(layout), len(layout[0])
    fh, fw = FIELD
    cells = {p: _field_rgb(p) for row in layout for p in row if p is not None}
    desc = f"synthetic BreakHis mosaic {rows}x{cols} fields" + (f" |AppMag = {magnification:g}" if magnification
                                                                 else "")
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for lv in range(levels):
            d = 2 ** lv
            ch, cw = fh // d, fw // d
            scaled = {p: cv2.resize(c, (cw, ch), interpolation=cv2.INTER_AREA) if d > 1 else c
                      for p, c in cells.items()}
            shape = (rows * ch, cols * cw, 3)
            kw: dict[str, Any] = {"subifds": levels - 1, "description": desc} if lv == 0 else {"subfiletype": 1}
            if mpp:
                kw |= {"resolution": (1e4 / (mpp * d), 1e4 / (mpp * d)), "resolutionunit": "CENTIMETER"}
            tw.write(_tiles(layout, scaled, ch, cw, shape, tile), shape=shape, dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", compression=compression, metadata=None, **kw)
    return cols * fw, rows * fh


def _field_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None or bgr.shape[0] < FIELD[0] or bgr.shape[1] < FIELD[1]:
        raise ValueError(f"{path}: not an image of at least {FIELD[1]}x{FIELD[0]} pixels")
    return cv2.cvtColor(bgr[:FIELD[0], :FIELD[1]], cv2.COLOR_BGR2RGB)


def _tiles(layout: Sequence[Sequence[Path | None]], cells: dict, ch: int, cw: int, shape: tuple[int, int, int],
           tile: int) -> Iterator[np.ndarray]:
    """The level's tiles in row-major order, each composed from the cells it overlaps."""
    for y0 in range(0, shape[0], tile):
        for x0 in range(0, shape[1], tile):
            t = np.full((tile, tile, 3), GLASS, np.uint8)
            for r in range(y0 // ch, min(len(layout), (y0 + tile - 1) // ch + 1)):
                for c in range(x0 // cw, min(len(layout[0]), (x0 + tile - 1) // cw + 1)):
                    p = layout[r][c]
                    if p is None:
                        continue
                    ya, xa = max(y0, r * ch), max(x0, c * cw)
                    yb, xb = min(y0 + tile, (r + 1) * ch, shape[0]), min(x0 + tile, (c + 1) * cw, shape[1])
                    t[ya - y0:yb - y0, xa - x0:xb - x0] = cells[p][ya - r * ch:yb - r * ch, xa - c * cw:xb - c * cw]
            yield t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path, help="the .tif to write")
    ap.add_argument("--images", type=Path, required=True, help="folder of 700x460 images to place")
    ap.add_argument("--rows", type=int, default=8, help="rows of fields (default 8)")
    ap.add_argument("--cols", type=int, default=8, help="columns of fields (default 8)")
    ap.add_argument("--tissue", type=float, default=0.5, help="fraction of cells holding an image (default 0.5)")
    ap.add_argument("--seed", type=int, default=0, help="which cells hold images (default 0)")
    a = ap.parse_args()
    images = sorted(a.images.glob("*.png"))
    rng = np.random.default_rng(a.seed)
    layout = [[images[int(rng.integers(len(images)))] if rng.random() < a.tissue else None for _ in range(a.cols)]
              for _ in range(a.rows)]
    w, h = write_mosaic(a.out, layout)
    print(f"wrote {a.out}: {w}x{h}, {sum(p is not None for row in layout for p in row)} tissue fields")


if __name__ == "__main__":
    main()
