"""Large inputs read lazily: a pyramidal or tiled TIFF (OME-TIFF, BigTIFF, Aperio SVS) through tifffile's zarr
interface, reading only the tiles a region needs; other vendor slide formats through OpenSlide where it is installed
(optional); other images (PNG, JPEG, ...) decoded whole, within --max-pixels.
Every region comes back as BGR uint8, and the source says what it knows of its scale."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.formats import OPENSLIDE_SUFFIXES, TIFF_SUFFIXES
from runtime.imageio import DEFAULT_MAX_PIXELS, ImageError, read_image
from runtime.scale import Scale, from_name

BLOCK = 2048  # pixels a side read at a time when a thumbnail is made from a large level


class Source:
    """Levels (level 0 first) of one image: ``sizes[i] = (width, height)``, ``downsamples[i]`` level-0 pixels per
    level-i pixel; ``read(level, x, y, w, h)`` returns that region as BGR uint8."""

    name: str
    sizes: list[tuple[int, int]]
    downsamples: list[float]
    scale: Scale

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """(BGR image whose long side is at most ``max_side``, level-0 pixels per thumbnail pixel), read from the
        smallest level that is large enough, block by block, so that a huge single-level image never sits in
        memory (at most BLOCK x BLOCK pixels of it at a time)."""
        i = max((k for k, (w, h) in enumerate(self.sizes) if max(w, h) >= max_side), default=0)
        w, h = self.sizes[i]
        f = min(1.0, max_side / max(w, h))
        thumb = np.empty((max(1, round(h * f)), max(1, round(w * f)), 3), np.uint8)
        for y0 in range(0, h, BLOCK):
            for x0 in range(0, w, BLOCK):
                y1, x1 = min(y0 + BLOCK, h), min(x0 + BLOCK, w)
                ty0, ty1, tx0, tx1 = round(y0 * f), round(y1 * f), round(x0 * f), round(x1 * f)
                if ty1 > ty0 and tx1 > tx0:
                    thumb[ty0:ty1, tx0:tx1] = cv2.resize(self.read(i, x0, y0, x1 - x0, y1 - y0), (tx1 - tx0, ty1 - ty0),
                                                         interpolation=cv2.INTER_AREA)
        return thumb, self.sizes[0][0] / thumb.shape[1]

    def close(self) -> None:
        pass


def open_source(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
    """A TiffSource for TIFF-family files, an OpenSlideSource for other vendor slide formats, else the image decoded
    whole (refused above ``max_pixels``)."""
    path = Path(path)
    if path.name.lower().endswith(TIFF_SUFFIXES):
        return TiffSource(path)
    if path.name.lower().endswith(OPENSLIDE_SUFFIXES):
        return OpenSlideSource(path)
    return ArraySource(path, read_image(path, max_pixels).bgr)


class ArraySource(Source):
    def __init__(self, path: Path, bgr: np.ndarray) -> None:
        self.name, self.bgr = str(path), bgr
        self.sizes, self.downsamples = [(bgr.shape[1], bgr.shape[0])], [1.0]
        self.scale = from_name(path.name)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self.bgr[y:y + h, x:x + w]


class TiffSource(Source):
    def __init__(self, path: Path) -> None:
        import tifffile
        import zarr

        self.name = str(path)
        try:
            self.tif = tifffile.TiffFile(path)
            series = self.tif.series[0]
            self.axes = series.axes
            if series.dtype != np.uint8 or self.axes not in ("YX", "YXS"):
                self.tif.close()
                raise ImageError(f"{path}: a {series.dtype} {self.axes} image; slides are read as 8-bit grey, RGB "
                                 "or RGBA (axes YX or YXS)")
            self.levels = [zarr.open_array(series.aszarr(level=i), mode="r") for i in range(len(series.levels))]
        except (OSError, ValueError, KeyError, IndexError, tifffile.TiffFileError) as e:
            raise ImageError(f"{path}: not a readable TIFF ({e})") from None
        self.sizes = [(int(a.shape[1]), int(a.shape[0])) for a in self.levels]
        self.downsamples = [self.sizes[0][0] / w for w, _ in self.sizes]
        self.scale = _tiff_scale(self.tif, path)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        try:
            a = np.asarray(self.levels[level][y:y + h, x:x + w])
        except Exception as e:  # a damaged tile: codecs raise their own types  # noqa: BLE001
            raise ImageError(f"{self.name}: level {level} region ({x}, {y}, {w}x{h}) cannot be decoded ({e})") \
                from None
        if a.ndim == 2:
            return cv2.cvtColor(a, cv2.COLOR_GRAY2BGR)
        return cv2.cvtColor(a, cv2.COLOR_RGBA2BGR if a.shape[2] == 4 else cv2.COLOR_RGB2BGR)

    def close(self) -> None:
        self.tif.close()


class OpenSlideSource(Source):
    """Vendor slide formats (Hamamatsu, MIRAX, Leica, Ventana, ...) through OpenSlide, an optional extra."""

    def __init__(self, path: Path) -> None:
        try:
            import openslide
        except ImportError:
            raise ImageError(f"{path}: a vendor slide format; reading it needs OpenSlide (pip install "
                             "'breakhis-edge[openslide]': openslide-python and openslide-bin)") from None
        self.name = str(path)
        try:
            self.slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as e:
            raise ImageError(f"{path}: OpenSlide cannot read it ({e})") from None
        self.sizes = [(int(w), int(h)) for w, h in self.slide.level_dimensions]
        self.downsamples = [float(d) for d in self.slide.level_downsamples]
        mag = self.slide.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        mpp = self.slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        self.scale = Scale(float(mag) if mag else None, float(mpp) if mpp else None, "OpenSlide properties") \
            if mag or mpp else from_name(path.name)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        d = self.downsamples[level]
        rgba = np.asarray(self.slide.read_region((round(x * d), round(y * d)), level, (w, h)))  # origin: level 0
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255  # outside the scanned area: white, as glass
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)

    def close(self) -> None:
        self.slide.close()


def _tiff_scale(tif: Any, path: Path) -> Scale:
    """Magnification and microns per pixel from OME-XML, an Aperio description or the resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        xml = tif.ome_metadata
        mag = re.search(r'NominalMagnification="([\d.]+)"', xml)
        size = re.search(r'PhysicalSizeX="([\d.eE+-]+)"', xml)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', xml)
        mpp = float(size.group(1)) if size and (not unit or unit.group(1) in ("µm", "um", "\u00b5m")) else None
        if mag or mpp:
            return Scale(float(mag.group(1)) if mag else None, mpp, "OME-XML")
    desc = tif.pages[0].description or ""
    if tif.is_svs or "AppMag" in desc:
        app_mag = re.search(r"AppMag\s*=\s*([\d.]+)", desc)
        app_mpp = re.search(r"MPP\s*=\s*([\d.]+)", desc)
        if app_mag or app_mpp:
            return Scale(float(app_mag.group(1)) if app_mag else None, float(app_mpp.group(1)) if app_mpp else None,
                         "SVS description")
    tags = tif.pages[0].tags
    if "XResolution" in tags and "ResolutionUnit" in tags and int(tags["ResolutionUnit"].value) in (2, 3):
        num, den = tags["XResolution"].value
        per_unit = num / den if den else 0
        if per_unit > 0:
            microns = 25400.0 if int(tags["ResolutionUnit"].value) == 2 else 10000.0
            return Scale(from_name(path.name).magnification, microns / per_unit, "TIFF resolution")
    return from_name(path.name)
