"""Image decoding with OpenCV: size limit checked from the header first, explicit colour conversions, clear errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from runtime.errors import BreakhisError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Refuse images above this many pixels before decoding them (a 100X BreakHis field is 0.32 MP; 64 MP is a
# generous ceiling for a camera frame or stitched region and bounds decode memory at ~200 MB of BGR).
DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(BreakhisError):
    """An input that cannot be turned into a BGR uint8 image. The message names the file and the reason."""


@dataclass
class Decoded:
    """A BGR uint8 HxWx3 image and the conversions applied to get it (reported, never silent)."""

    bgr: np.ndarray
    conversions: list[str] = field(default_factory=list)


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, BMP or TIFF header without decoding pixels; None when not found."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"BM" and len(data) >= 26:
        return abs(int.from_bytes(data[18:22], "little", signed=True)), abs(
            int.from_bytes(data[22:26], "little", signed=True))
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 1 if marker == 0xFF else 2
                continue
            seg = int.from_bytes(data[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            i += 2 + seg
        return None
    if data[:4] in (b"II*\x00", b"MM\x00*") and len(data) >= 8:
        order = "little" if data[:2] == b"II" else "big"
        off = int.from_bytes(data[4:8], order)  # type: ignore[arg-type]
        if off + 2 > len(data):
            return None
        n = int.from_bytes(data[off:off + 2], order)  # type: ignore[arg-type]
        wh: dict[int, int] = {}
        for k in range(n):
            e = off + 2 + 12 * k
            if e + 12 > len(data):
                break
            tag = int.from_bytes(data[e:e + 2], order)  # type: ignore[arg-type]
            typ = int.from_bytes(data[e + 2:e + 4], order)  # type: ignore[arg-type]
            if tag in (256, 257):
                wh[tag] = int.from_bytes(data[e + 8:e + (10 if typ == 3 else 12)], order)  # type: ignore[arg-type]
        if 256 in wh and 257 in wh:
            return wh[256], wh[257]
    return None


def decode(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode encoded image bytes to BGR uint8. ``name`` is used in messages."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    size = _header_size(data)
    if size is None:
        raise ImageError(f"{name}: not a PNG, JPEG, TIFF or BMP image (unrecognised or damaged header)")
    w, h = size
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h:,} pixels is above the limit of {max_pixels:,} "
                         "(raise it with --max-pixels)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageError(f"{name}: could not decode the image (truncated or corrupt file)")
    return to_bgr8(img, name)


def to_bgr8(img: np.ndarray, name: str) -> Decoded:
    """Convert a decoded OpenCV array (gray, BGR, BGRA; 8 or 16 bit) to BGR uint8, recording each conversion."""
    conv: list[str] = []
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
        conv.append("16-bit -> 8-bit (value / 257, rounded)")
    elif img.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported sample type {img.dtype} (expected 8- or 16-bit integers)")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        img = cv2.cvtColor(img.reshape(img.shape[0], img.shape[1]), cv2.COLOR_GRAY2BGR)
        conv.append("grayscale -> BGR (channel replicated)")
    elif img.ndim == 3 and img.shape[2] == 4:
        alpha = img[:, :, 3]
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        conv.append("RGBA -> RGB (alpha dropped" + (", image was fully opaque)" if alpha.min() == 255 else
                                                    "; image had transparent pixels)"))
    elif not (img.ndim == 3 and img.shape[2] == 3):
        raise ImageError(f"{name}: unsupported channel layout {img.shape}")
    return Decoded(np.ascontiguousarray(img), conv)


def read_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Read and decode one image file; every failure is an ImageError naming the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{p}: is a directory, not an image") from None
    except OSError as e:
        raise ImageError(f"{p}: cannot read ({e.strerror or e})") from None
    return decode(data, str(p), max_pixels)
