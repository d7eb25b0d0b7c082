"""Large inputs read lazily: a pyramidal or tiled TIFF (OME-TIFF, BigTIFF, Aperio SVS) read tile by tile with
tifffile's decoders, only the tiles a region needs, each checked on its own; other vendor slide formats through
OpenSlide where it is installed (optional); other images (PNG, JPEG, ...) decoded whole, within --max-pixels.
Every region comes back as BGR uint8, and the source says what it knows of its scale."""
from __future__ import annotations

import hashlib
import logging
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import cv2
import numpy as np

from runtime.io.decode import DEFAULT_MAX_PIXELS, ImageError, ImageTooLarge, read_image
from runtime.io.formats import OPENSLIDE_SUFFIXES, TIFF_SUFFIXES, is_dicom
from runtime.io.scale import Scale, from_name
from runtime.model.manifest import sha256_file

BLOCK = 2048  # pixels a side read at a time when a thumbnail is made from a large level
MAX_SLIDE_PIXELS = 40_000_000_000  # level 0: beyond any scanner's 40X slide; a claim above it is refused
MAX_THUMBNAIL_SOURCE_PIXELS = 2_000_000_000  # the level the tissue map is read from, whole (block by block)
JPEG_COMPRESSIONS = (6, 7)  # old-style and new-style JPEG (TIFF compression tag)
MAX_LISTED = 8  # damaged tiles listed one by one in a slide's warnings


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
        return self._thumbnail(max_side)

    def _thumbnail(self, max_side: int, **read: str) -> tuple[np.ndarray, float]:
        i = max((k for k, (w, h) in enumerate(self.sizes) if max(w, h) >= max_side), default=0)
        w, h = self.sizes[i]
        f = min(1.0, max_side / max(w, h))
        thumb = np.empty((max(1, round(h * f)), max(1, round(w * f)), 3), np.uint8)
        # BLOCK x BLOCK pixels at a time; along a thin image (a side under BLOCK / 8) as many pixels in longer blocks
        bh = bw = BLOCK
        if min(w, h) < BLOCK // 8:
            bh, bw = (h, BLOCK * BLOCK // h) if w >= h else (BLOCK * BLOCK // w, w)
        for y0 in range(0, h, bh):
            for x0 in range(0, w, bw):
                y1, x1 = min(y0 + bh, h), min(x0 + bw, w)
                ty0, ty1, tx0, tx1 = round(y0 * f), round(y1 * f), round(x0 * f), round(x1 * f)
                if ty1 > ty0 and tx1 > tx0:
                    block = self.read(i, x0, y0, x1 - x0, y1 - y0, **read)  # type: ignore[call-arg]
                    thumb[ty0:ty1, tx0:tx1] = cv2.resize(block, (tx1 - tx0, ty1 - ty0), interpolation=cv2.INTER_AREA)
        return thumb, self.sizes[0][0] / thumb.shape[1]

    def problems(self) -> list[str]:
        """What reading found wrong (damaged tiles, unwritten ones), one line each."""
        return []

    def close(self) -> None:
        pass


def slide_identity(path: Path) -> tuple[int, str]:
    """(bytes, sha256) of a slide file, or of a DICOM slide's folder (over its instances' names and hashes): what
    its outputs are named by and a cohort resumes by."""
    if not path.is_dir():
        return path.stat().st_size, sha256_file(path)
    files = sorted(path.glob("*.dcm"))
    digest = "".join(f"{f.name}:{sha256_file(f)}\n" for f in files)
    return sum(f.stat().st_size for f in files), hashlib.sha256(digest.encode()).hexdigest()


def open_source(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
    """A TiffSource for TIFF-family files, an OpenSlideSource for other vendor slide formats, else the image decoded
    whole (refused above ``max_pixels``)."""
    path = Path(path)
    if is_dicom(path):
        return DicomSource(path if path.is_dir() else path.parent)
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


class TileError(ImageError):
    """One tile (or strip) of a TIFF level that cannot be read or decoded: the fields that touch it are errors."""


class TiffSource(Source):
    """A TIFF level read tile by tile (or strip by strip) with tifffile's decoders, synchronously: each tile is
    read, checked and decoded on its own, so a damaged tile costs only the fields that touch it, and is reported
    once. A tile never written (offset or byte count 0: a region not scanned) reads as glass and is counted."""

    def __init__(self, path: Path) -> None:
        import tifffile

        self.name = str(path)
        self.log: list[str] = []  # what tifffile said while reading the structure (never printed unattributed)
        with _tifffile_messages(self.log):
            try:
                self.tif = tifffile.TiffFile(path)
            except (OSError, ValueError, KeyError, IndexError, struct.error, tifffile.TiffFileError) as e:
                raise ImageError(f"{path}: not a readable TIFF ({str(e)[:200]}{_said(self.log)})") from None
            try:
                self._open(path)
            except BaseException:
                self.tif.close()
                raise
        self.bad: dict[tuple[int, int], str] = {}  # (level, tile index) -> why it cannot be decoded
        self.unwritten: set[tuple[int, int]] = set()
        self.lock = threading.Lock()  # one file handle: a seek and its read go together

    def _open(self, path: Path) -> None:
        import tifffile

        try:
            series = self.tif.series[0]
            self.axes = series.axes
            self.pages: list[Any] = [level.pages[0] for level in series.levels]  # tifffile.TiffPage each
            shapes = [tuple(int(n) for n in p.shape) for p in self.pages]
        except (OSError, ValueError, KeyError, IndexError, TypeError, struct.error, tifffile.TiffFileError) as e:
            raise ImageError(f"{path}: not a readable TIFF ({str(e)[:200]}{_said(self.log)})") from None
        if not self.pages:
            raise ImageError(f"{path}: not a readable TIFF (no image in it{_said(self.log)})")
        if series.dtype != np.uint8 or self.axes not in ("YX", "YXS"):
            raise ImageError(f"{path}: a {series.dtype} {self.axes} image; slides are read as 8-bit grey, RGB or "
                             "RGBA (axes YX or YXS)")
        if any(p.planarconfig != 1 and len(p.shape) == 3 for p in self.pages):
            raise ImageError(f"{path}: samples stored as separate planes (planar configuration 2) are not read")
        self.sizes = [(s[1], s[0]) for s in shapes]
        if not all(w and h for w, h in self.sizes):
            raise ImageError(f"{path}: a level with no pixels ({self.sizes})")
        w0, h0 = self.sizes[0]
        if w0 * h0 > MAX_SLIDE_PIXELS:
            raise ImageTooLarge(f"{path}: claims {w0:,} x {h0:,} = {w0 * h0:,} pixels, above the limit of "
                             f"{MAX_SLIDE_PIXELS:,} for a slide (a whole 40X scan is about 10 billion)")
        smallest = min(w * h for w, h in self.sizes)
        if smallest > MAX_THUMBNAIL_SOURCE_PIXELS:
            raise ImageTooLarge(f"{path}: its smallest level is {smallest:,} pixels, above the limit of "
                             f"{MAX_THUMBNAIL_SOURCE_PIXELS:,} read for the tissue map; an image this large needs "
                             "a pyramid (e.g. vips tiffsave --tile --pyramid, or bfconvert -pyramid-resolutions)")
        size = path.stat().st_size
        beyond = sum(int(o) + int(n) > size for p in self.pages for o, n in zip(p.dataoffsets, p.databytecounts) if o)
        if beyond:
            raise ImageError(f"{path}: truncated: {beyond} tiles lie beyond the end of the file ({size:,} bytes); "
                             "copy or download it again")
        self.downsamples = [w0 / w for w, _ in self.sizes]
        self.scale = _tiff_scale(self.tif, path)

    def read(self, level: int, x: int, y: int, w: int, h: int, damaged: str = "raise") -> np.ndarray:
        """The region as BGR. A damaged tile raises TileError (``damaged="fill"``: mid-grey instead, for the
        tissue map, so that the fields there are tried, and fail, at their own level)."""
        page = self.pages[level]
        th, tw = int(page.chunks[0]), int(page.chunks[1])
        per_row = int(page.chunked[1])
        samples = page.shape[2] if len(page.shape) == 3 else 1
        out = np.empty((h, w, samples), np.uint8)
        for r in range(y // th, (y + h - 1) // th + 1):
            for c in range(x // tw, (x + w - 1) // tw + 1):
                ya, yb, xa, xb = max(y, r * th), min(y + h, (r + 1) * th), max(x, c * tw), min(x + w, (c + 1) * tw)
                try:
                    seg = self._segment(level, r * per_row + c)
                except TileError:
                    if damaged != "fill":
                        raise
                    seg = np.full((th, tw, samples), 128, np.uint8)
                if seg is None:  # never written: not scanned, glass
                    out[ya - y:yb - y, xa - x:xb - x] = 255
                else:
                    out[ya - y:yb - y, xa - x:xb - x] = seg[ya - r * th:yb - r * th, xa - c * tw:xb - c * tw]
        if samples == 1:
            return cv2.cvtColor(out[..., 0], cv2.COLOR_GRAY2BGR)
        return cv2.cvtColor(out, cv2.COLOR_RGBA2BGR if samples == 4 else cv2.COLOR_RGB2BGR)

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        return self._thumbnail(max_side, damaged="fill")

    def _segment(self, level: int, index: int) -> np.ndarray | None:
        """Tile ``index`` of ``level`` as (rows, cols, samples), None where it was never written; TileError (once
        per tile, remembered) where its bytes are missing, do not decode, or decode to the wrong shape."""
        key = (level, index)
        if key in self.bad:
            raise TileError(self.bad[key])
        page = self.pages[level]
        try:
            offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        except IndexError:
            return self._damaged(key, "no such tile in the file's tile table")
        if not offset or not count:
            self.unwritten.add(key)
            return None
        with self.lock:
            fh = self.tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
        if len(data) < count:
            return self._damaged(key, f"truncated file: {len(data)} of its {count} bytes")
        if page.compression in JPEG_COMPRESSIONS:
            problem = _jpeg_problem(data, page.jpegtables)
            if problem:
                return self._damaged(key, problem)
        try:
            seg, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as e:  # noqa: BLE001 - each codec raises its own types
            return self._damaged(key, f"{type(e).__name__}: {str(e)[:120]}")
        if seg is None or seg.shape != tuple(shape) or seg.shape[0] != 1:
            return self._damaged(key, f"decoded to {None if seg is None else seg.shape}, expected {tuple(shape)}")
        return seg[0]

    def _damaged(self, key: tuple[int, int], why: str) -> NoReturn:
        level, index = key
        page = self.pages[level]
        per_row = int(page.chunked[1])
        th, tw = int(page.chunks[0]), int(page.chunks[1])
        r, c = divmod(index, per_row)
        self.bad[key] = (f"{self.name}: level {level} tile {index} (pixels {c * tw},{r * th} to "
                         f"{(c + 1) * tw},{(r + 1) * th}) cannot be decoded: {why}")
        raise TileError(self.bad[key])

    def problems(self) -> list[str]:
        """What reading found: each damaged tile once (the first ``MAX_LISTED``, then a count), how many tiles were
        never written, and what tifffile said about the file's structure."""
        bad = [self.bad[k] for k in sorted(self.bad)]
        out = bad[:MAX_LISTED]
        if len(bad) > MAX_LISTED:
            out.append(f"and {len(bad) - MAX_LISTED} more damaged tiles (each field's error names its tile)")
        out += [f"{self.name}: tifffile: {m}" for m in dict.fromkeys(self.log)]
        if self.unwritten:
            out.append(f"{len(self.unwritten)} tiles were never written (not scanned): read as glass (background)")
        return out

    def close(self) -> None:
        self.tif.close()


def _jpeg_problem(data: bytes, tables: bytes | None) -> str | None:
    """Why a JPEG tile is damaged though it may still decode (libjpeg pads a truncated scan with grey, and reads a
    corrupt one as other pixels, saying so only as a warning), or None. The check decodes the tile once more with
    libjpeg-turbo, whose warnings come back with the call (decode.decode_jpeg; where it hands a tile to OpenCV's
    libjpeg, under the stderr lock): about 0.3 ms per 256 x 256 tile, the price of hearing them (imagecodecs does
    not pass them on)."""
    from runtime.io.decode import damage, decode_jpeg, decoder_messages

    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "truncated JPEG data (no end-of-image marker)"
    stream = tables[:-2] + data[2:] if tables and data.startswith(b"\xff\xd8") else data  # tables + the tile's scan
    got = decode_jpeg(stream)
    if got is None:  # OpenCV's libjpeg, its message heard under the stderr lock
        with decoder_messages() as messages:
            decoded = cv2.imdecode(np.frombuffer(stream, np.uint8), cv2.IMREAD_UNCHANGED) is not None
    else:
        decoded, messages = True, got[1]
    damaged = damage(messages)
    if damaged or not decoded:
        return f"libjpeg: {'; '.join(damaged)[:160]}" if damaged else "libjpeg cannot decode it"
    return None


class _Collect(logging.Filter):
    """tifffile's log records go to the source being opened in this thread (its errors and problems), not to an
    unattributed line on stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        lines = getattr(_TIFF_MESSAGES, "lines", None)
        if lines is None:
            return True
        lines.append(record.getMessage().strip()[:200])
        return False


_TIFF_MESSAGES = threading.local()
logging.getLogger("tifffile").addFilter(_Collect())


@contextmanager
def _tifffile_messages(lines: list[str]) -> Iterator[None]:
    _TIFF_MESSAGES.lines = lines
    try:
        yield
    finally:
        _TIFF_MESSAGES.lines = None


def _said(log: list[str]) -> str:
    return f"; tifffile says: {'; '.join(dict.fromkeys(log))[:200]}" if log else ""


class DicomSource(Source):
    """A DICOM whole-slide image (a folder of one series' instances, VL Whole Slide Microscopy) through wsidicom,
    an optional extra; the scale from the DICOM pixel spacing."""

    def __init__(self, folder: Path) -> None:
        try:
            from wsidicom import WsiDicom
        except ImportError:
            raise ImageError(f"{folder}: a DICOM slide; reading it needs wsidicom (pip install "
                             "'breakhis-edge[dicom]')") from None
        self.name = str(folder)
        try:
            self.wsi = WsiDicom.open(folder)
        except Exception as e:  # wsidicom and pydicom raise their own types for foreign or damaged files
            raise ImageError(f"{folder}: not a readable DICOM slide ({type(e).__name__}: {str(e)[:200]})") from None
        levels = list(self.wsi.levels)
        self.levels = [lv.level for lv in levels]
        self.sizes = [(int(lv.size.width), int(lv.size.height)) for lv in levels]
        self.downsamples = [self.sizes[0][0] / w for w, _ in self.sizes]
        mpp = self.wsi.mpp.width if self.wsi.mpp is not None else None
        self.scale = Scale(None, float(mpp), "DICOM pixel spacing") if mpp else from_name(folder.name)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        rgb = np.asarray(self.wsi.read_region((x, y), self.levels[level], (w, h)).convert("RGB"))
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)

    def close(self) -> None:
        self.wsi.close()


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
