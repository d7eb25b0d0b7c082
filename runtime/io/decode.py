"""Image decoding: the header read lazily by Pillow first (size limit, pages, EXIF orientation), pixels decoded by
libpng through imagecodecs (PNG), libjpeg-turbo through simplejpeg (JPEG) or OpenCV (the rest), explicit
colour conversions, decoder messages attached to the image they concern, clear errors."""
from __future__ import annotations

import io
import logging
import os
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import simplejpeg

from runtime.errors import BreakhisError

MAX_PAGES = 256  # a multi-page TIFF's directories are read to find its largest page: bounded
FORMATS = ("PNG", "JPEG", "MPO", "TIFF", "BMP")  # as Pillow names them (MPO: a JPEG with extra frames)
# Refuse images above this many pixels before decoding them (a 100X BreakHis field is 0.32 MP; 64 MP is a
# generous ceiling for a camera frame or stitched region and bounds decode memory at ~200 MB of BGR).
DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(BreakhisError):
    """An input that cannot be turned into a BGR uint8 image. The message names the file and the reason."""


class ImageTooLarge(ImageError):
    """An input above a stated size limit (the server's 413)."""


@dataclass
class Decoded:
    """A BGR uint8 HxWx3 image, the conversions applied to get it, and what the decoder said about it (reported,
    never silent)."""

    bgr: np.ndarray
    conversions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# Decoder messages that mean the pixels are not what was captured: such an image is refused, not classified.
DAMAGE = ("corrupt jpeg data", "premature end", "crc error", "libpng error", "invalid", "bogus", "huffman")


def damage(messages: list[str]) -> list[str]:
    """The decoder messages that mean the pixels are not what was captured."""
    return [m for m in messages if any(k in m.lower() for k in DAMAGE)]


# EXIF orientation -> what it means, and the OpenCV operations that show the image as viewers do, in order
_FLIP_H, _FLIP_V = (lambda a: cv2.flip(a, 1)), (lambda a: cv2.flip(a, 0))
_CW = (lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE))
_CCW = (lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE))
ORIENTATION = {2: ("mirrored", (_FLIP_H,)), 3: ("rotated 180", (_FLIP_H, _FLIP_V)), 4: ("flipped", (_FLIP_V,)),
               5: ("transposed", (_FLIP_H, _CCW)), 6: ("rotated 90", (_CW,)), 7: ("transversed", (_FLIP_H, _CW)),
               8: ("rotated 270", (_CCW,))}
_STDERR_LOCK = threading.Lock()
Buffer = Callable[[tuple[int, ...]], np.ndarray | None]  # shape -> a uint8 buffer to decode into, or None
_PNG_MESSAGES = threading.local()
FLAGS = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION  # orientation is applied here, once, and reported


@contextmanager
def decoder_messages() -> Iterator[list[str]]:
    """Collect what OpenCV's C decoders (libjpeg, libtiff) print to stderr while decoding one image, so that it is
    attached to that image's result instead of appearing, unattributed, on the console. These decodes are
    serialised while stderr is redirected (PNG and JPEG go through ``_decode_in_parallel`` instead)."""
    lines: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines += [x.strip() for x in tmp.read().decode(errors="replace").splitlines() if x.strip()]


class _AttachToThisDecode(logging.Filter):
    """imagecodecs reports libpng's warnings through Python logging, in the decoding thread: they go to the image
    that thread is decoding instead of the console, so PNG decodes run in parallel without redirecting stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        lines = getattr(_PNG_MESSAGES, "lines", None)
        if lines is None:
            return True
        lines.append(record.getMessage().strip())
        return False


logging.getLogger("imagecodecs").addFilter(_AttachToThisDecode())


def _decode_in_parallel(data: bytes, info: Probe, messages: list[str], into: Buffer | None) -> np.ndarray | None:
    """PNG (libpng) and JPEG (libjpeg-turbo) decoded without the stderr lock, their
    messages collected per call, 8-bit colour ones into ``into(shape)`` where it gives a buffer; None with no
    message: OpenCV's serialised path decodes it (TIFF, BMP, CMYK...)."""
    if info.format == "PNG":
        return _decode_png(data, messages, into)
    if info.format == "JPEG":
        got = decode_jpeg(data, into, info.pages[0])
        if got is not None:
            messages += got[1]
            return got[0]
    return None


# The JPEG colour spaces simplejpeg decodes as OpenCV does (CMYK/YCCK, Adobe's inverted ink, go to OpenCV's path).
_JPEG_SPACES = {"YCbCr": "BGR", "RGB": "BGR", "Gray": "GRAY"}


def decode_jpeg(data: bytes, into: Buffer | None = None,
                size: tuple[int, int] | None = None) -> tuple[np.ndarray, list[str]] | None:
    """A JPEG by libjpeg-turbo through simplejpeg, which releases the GIL and, strict, raises libjpeg's first
    warning (the only one libjpeg reports) instead of printing it: (pixels, [that warning]) where it names damage
    (the caller refuses the file), (pixels, []) for a clean decode, or None where OpenCV's path must decode it: a
    CMYK, 12-bit or otherwise unreadable file, or a harmless first warning (only a whole decode gets past one).
    libjpeg's default (accurate) DCT and upsampling, as OpenCV decodes. A colour one goes into ``into(shape)`` where
    that gives a buffer. ``size``: the (width, height) the caller's header reader found and checked against its
    limit; another claim here is not decoded."""
    try:
        h, w, space, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if space not in _JPEG_SPACES or (size is not None and (w, h) != tuple(size)):
        return None
    gray = space == "Gray"
    buf = into((h, w, 3)) if into is not None and not gray else None
    try:
        img = simplejpeg.decode_jpeg(data, colorspace=_JPEG_SPACES[space], buffer=buf, strict=True)
    except ValueError as e:
        warning = str(e).strip()
        return (np.empty(0, np.uint8), [warning]) if damage([warning]) else None  # damaged: no pixels to use
    return (img.reshape(h, w) if gray else img), []


def _decode_png(data: bytes, messages: list[str], into: Buffer | None = None) -> np.ndarray | None:
    """One PNG by libpng (imagecodecs releases the GIL and raises on errors), in OpenCV's IMREAD_UNCHANGED layout:
    gray 2-D, BGR, BGRA (gray + alpha becomes BGRA, as OpenCV does), 8 or 16 bit; 8-bit RGB into ``into(shape)``
    where it gives a buffer, its channels swapped there in place."""
    _PNG_MESSAGES.lines = messages
    rgb8 = data[24:26] == b"\x08\x02"  # IHDR: bit depth 8, colour type 2 (RGB)
    buf = into((int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big"), 3)) if rgb8 and into else None
    try:
        try:
            img = imagecodecs.png_decode(data, out=buf)
        except ValueError:  # the header said RGB but the pixels are not (a tRNS chunk makes RGBA): ordinary memory
            img = imagecodecs.png_decode(data)
    except imagecodecs.PngError as e:
        messages.append(f"libpng error: {e}")
        return None
    finally:
        _PNG_MESSAGES.lines = None
    if img.ndim == 3 and img.shape[2] == 2:
        img = img[:, :, [0, 0, 0, 1]]
    elif img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR if img.shape[2] == 3 else cv2.COLOR_RGBA2BGRA,
                           dst=img if img.shape[2] == 3 else None)
    return img


@dataclass
class Probe:
    """What the header says, read lazily by Pillow (no pixels decoded)."""

    format: str
    pages: list[tuple[int, int]]  # (width, height) of every page/frame
    orientation: int  # EXIF orientation tag, 1 = as stored


def probe(data: bytes, name: str) -> Probe:
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # Pillow only reads headers here; our own limit (max_pixels) applies before decoding
    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: reads headers (and TIFF directories) only
            fmt = (im.format or "").upper()
            if fmt not in FORMATS:
                raise ImageError(f"{name}: {fmt or 'unknown'} images are not supported (PNG, JPEG, TIFF, BMP)")
            n_pages = int(getattr(im, "n_frames", 1))
            if n_pages > MAX_PAGES:
                raise ImageError(f"{name}: {n_pages} pages; at most {MAX_PAGES} are read")
            pages = []
            for i in range(n_pages):
                im.seek(i)
                pages.append(im.size)
            orientation = int(im.getexif().get(0x0112, 1) or 1) if fmt in ("JPEG", "MPO", "TIFF") else 1
    except UnidentifiedImageError:  # Pillow's message is a repr of its buffer: say it in words
        raise ImageError(f"{name}: not a PNG, JPEG, TIFF or BMP image (its first bytes are not any image format's "
                         "signature: another kind of file, renamed?)") from None
    except (OSError, EOFError, SyntaxError, ValueError, struct.error) as e:
        raise ImageError(f"{name}: not a PNG, JPEG, TIFF or BMP image (unrecognised or damaged header: "
                         f"{str(e)[:120]})") from None
    return Probe(fmt, pages, orientation if orientation in ORIENTATION else 1)


def header(data: bytes, name: str, max_pixels: int) -> tuple[Probe, int]:
    """What the header says and the page to decode (the largest), once the file is known not to be empty and within
    the pixel limit: checked before any pixel is decoded, on whichever decoder."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    info = probe(data, name)
    page = max(range(len(info.pages)), key=lambda i: info.pages[i][0] * info.pages[i][1])
    w, h = info.pages[page]
    if w * h > max_pixels:
        raise ImageTooLarge(f"{name}: {w}x{h} = {w * h:,} pixels is above the limit of {max_pixels:,} "
                            "(raise it with --max-pixels)")
    return info, page


def decode(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, into: Buffer | None = None) -> Decoded:
    """Decode encoded image bytes to BGR uint8. ``name`` is used in messages.

    Rules (each reported in ``conversions``): a multi-page TIFF is read at its largest page; EXIF orientation is
    applied, as browsers and viewers do, so the pixels classified are the ones a person sees. Decoder messages that
    mean damaged data make it an error; other decoder messages are kept as warnings. ``into(shape)``: where an 8-bit
    colour PNG or JPEG is decoded into (a GPU's page-locked buffer), or None for ordinary memory."""
    info, page = header(data, name, max_pixels)
    w, h = info.pages[page]
    conversions: list[str] = []
    img: np.ndarray | None
    messages: list[str] = []
    img = _decode_in_parallel(data, info, messages, into) if len(info.pages) == 1 else None
    if img is None and not messages:
        with decoder_messages() as messages:
            buf = np.frombuffer(data, np.uint8)
            if len(info.pages) > 1:
                ok, mats = cv2.imdecodemulti(buf, FLAGS, range=(page, page + 1))
                img = mats[0] if ok and mats else None
                conversions.append(f"page {page + 1} of {len(info.pages)} used (the largest, {w}x{h})")
            else:
                img = cv2.imdecode(buf, FLAGS)
    damaged = damage(messages)
    if damaged:
        raise ImageError(f"{name}: truncated or corrupt data, the decoder says: {'; '.join(damaged)[:300]} (not "
                         "classified: its pixels may not be what was captured)")
    if img is None or img.size == 0:
        raise ImageError(f"{name}: could not decode the image (truncated or corrupt file)")
    out = to_bgr8(img, name, png_significant_bits(data) if info.format == "PNG" else None)
    if info.orientation != 1:
        what, ops = ORIENTATION[info.orientation]
        if info.format != "TIFF":  # OpenCV's TIFF reader (libtiff) orients the pixels itself
            for op in ops:
                out.bgr = op(out.bgr)
            out.bgr = np.ascontiguousarray(out.bgr)
        conversions.append(f"orientation tag {info.orientation} ({what}) applied, as viewers show the image")
    out.conversions = conversions + out.conversions
    out.warnings = messages + out.warnings
    return out


# 16-bit samples -> 8 bits. A 16-bit PNG holds 16 significant bits unless its sBIT chunk says fewer; by the PNG
# standard a writer then scales its samples up to 16 bits, but many cameras and tools store 10-, 12- or 14-bit values
# as they are, which value / 257 makes 16 to 64 times too dark. So, per group of samples (the colour, the alpha):
# - with sBIT s < 16: where every sample fits in s bits (stored as they are), value x 255 / (2^s - 1); else (scaled
#   up as the standard says) value / 257;
# - without sBIT: where every sample fits in 8, 10, 12 or 14 bits (the smallest), it is taken as data of that depth,
#   value x 255 / (2^k - 1), with a warning: a 16-bit brightfield capture whose brightest sample (glass) stays below
#   a quarter of the range is not what a camera gives, but the file does not say so itself;
# - otherwise value / 257.
# Other 16-bit formats (TIFF) are divided by 257.
SENSOR_DEPTHS = (8, 10, 12, 14)


def png_significant_bits(data: bytes) -> tuple[int | None, int | None]:
    """(colour bits, alpha bits) from a PNG's sBIT chunk, None where it has none (or none for alpha). Reads the
    chunks before the image data only."""
    pos, color_type = 8, data[25] if len(data) > 25 else 0
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"sBIT":
            body = data[pos + 8:pos + 8 + length]
            colour = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}.get(color_type, 0)
            if len(body) < colour or colour == 0:
                return None, None
            alpha = body[colour] if color_type in (4, 6) and len(body) > colour else None
            return max(body[:colour]), alpha
        pos += 12 + length
    return None, None


def _to_8bit(samples: np.ndarray, sbit: int | None, what: str) -> tuple[np.ndarray, str, str | None]:
    """16-bit ``samples`` to uint8 by the rule above: (pixels, the conversion said, a warning or None)."""
    top = int(samples.max()) if samples.size else 0
    if sbit is not None and 0 < sbit < 16 and top < 1 << sbit:
        depth, why, warn = sbit, f"its sBIT chunk says {sbit} significant bits, stored unscaled", None
    elif sbit is None and top < 1 << SENSOR_DEPTHS[-1]:
        depth = next(k for k in SENSOR_DEPTHS if top < 1 << k)
        why = f"no sBIT chunk; every sample fits in {depth} bits (the largest is {top})"
        warn = (f"16-bit PNG without an sBIT chunk whose {what} samples all fit in {depth} bits (the largest is "
                f"{top}): taken as {depth}-bit data, not as a 16-bit image {1 << (16 - depth)} times darker (an "
                "sBIT chunk would say which)")
    else:
        return ((samples.astype(np.uint32) + 128) // 257).astype(np.uint8), "value / 257, rounded", None
    full = (1 << depth) - 1
    scaled = (samples.astype(np.uint32) * 255 + full // 2) // full
    return scaled.astype(np.uint8), f"{depth}-bit data: value x 255 / {full}, rounded; {why}", warn


def to_bgr8(img: np.ndarray, name: str, sbit: tuple[int | None, int | None] | None = None) -> Decoded:
    """Convert a decoded OpenCV array (gray, BGR, BGRA; 8 or 16 bit) to BGR uint8, recording each conversion (and
    warning where it assumed something). ``sbit``: a 16-bit PNG's significant bits (colour, alpha) from its sBIT
    chunk, where its samples are scaled by the rule above; None: not a PNG (value / 257). Transparent pixels are
    composited over white, the colour of glass, with a warning saying how many there were."""
    conv: list[str] = []
    warn: list[str] = []
    if img.dtype == np.uint16:
        if sbit is None:
            img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
            conv.append("16-bit -> 8-bit (value / 257, rounded)")
        else:
            groups = [(img[:, :, :3], sbit[0], "colour"), (img[:, :, 3:], sbit[1], "alpha")] \
                if img.ndim == 3 and img.shape[2] == 4 else [(img, sbit[0], "colour")]
            parts = []
            for samples, bits, what in groups:
                eight, how, warning = _to_8bit(samples, bits, what)
                parts.append(eight)
                conv.append(f"16-bit -> 8-bit ({how})" + (f" for the {what}" if len(groups) > 1 else ""))
                warn += [warning] if warning else []
            img = np.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]
    elif img.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported sample type {img.dtype} (expected 8- or 16-bit integers)")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        img = cv2.cvtColor(img.reshape(img.shape[0], img.shape[1]), cv2.COLOR_GRAY2BGR)
        conv.append("grayscale -> BGR (channel replicated)")
    elif img.ndim == 3 and img.shape[2] == 4:
        alpha = img[:, :, 3]
        seen = int(np.count_nonzero(alpha < 255))
        if seen:  # over white: what a transparent part of a slide shows, glass; not the black of its zero colour
            a = alpha[:, :, None].astype(np.uint32)
            img = ((img[:, :, :3].astype(np.uint32) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
            clear = int(np.count_nonzero(alpha == 0))
            conv.append(f"RGBA -> RGB ({seen} transparent pixels composited over white, as glass)")
            warn.append(f"{seen} of {alpha.size} pixels were transparent ({clear} fully, {seen - clear} partly): "
                        "composited over white (glass); a microscope capture has no transparency, so check how "
                        "this image was made")
        else:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
            conv.append("RGBA -> RGB (alpha dropped, image was fully opaque)")
    elif not (img.ndim == 3 and img.shape[2] == 3):
        raise ImageError(f"{name}: unsupported channel layout {img.shape}")
    return Decoded(np.ascontiguousarray(img), conv, warn)


def read_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, into: Buffer | None = None) -> Decoded:
    """Read and decode one image file; every failure is an ImageError naming the file."""
    return decode(read_bytes(path), str(Path(path)), max_pixels, into)


def read_bytes(path: Path | str) -> bytes:
    """One file's bytes; every failure an ImageError naming the file."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{p}: is a directory, not an image") from None
    except OSError as e:
        raise ImageError(f"{p}: cannot read ({e.strerror or e})") from None
