"""JPEG decoding by the system's libjpeg-turbo (its TurboJPEG library, through ctypes) where it is installed: ctypes
releases the GIL, so JPEGs decode in parallel like PNGs, and libjpeg's warnings (corrupt or truncated data) come back
with the call that caused them instead of as stderr text. Without the library JPEGs take OpenCV's serialised path."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TJPF_BGR, TJPF_GRAY = 1, 6  # pixel formats (turbojpeg.h)
TJCS_YCBCR, TJCS_GRAY, TJCS_RGB = 1, 2, 0  # colour spaces decoded here; CMYK/YCCK go to OpenCV
TJERR_WARNING = 0
TJFLAG_STOPONWARNING = 8192  # stop at the first warning: libjpeg reports a file's first warning only


class Fallback(Exception):
    """TurboJPEG cannot decode this file (CMYK, 12-bit, a fatal error): OpenCV's path decodes it as before."""


@dataclass
class Jpeg:
    image: np.ndarray  # BGR HxWx3, or HxW for a grayscale JPEG (as OpenCV's IMREAD_UNCHANGED gives)
    warnings: list[str]  # libjpeg's first warning, where decoding stopped (the image is then incomplete), else empty


@functools.cache
def library() -> ctypes.CDLL | None:
    """libturbojpeg, or None where it is not installed (Debian: libturbojpeg0; Jetson's L4T has it)."""
    name = ctypes.util.find_library("turbojpeg")
    try:
        lib = ctypes.CDLL(name) if name else None
        if lib is not None:
            _declare(lib)
    except (OSError, AttributeError):  # unloadable, or too old for the 2.x API used here
        return None
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    c_int_p, size = ctypes.POINTER(ctypes.c_int), ctypes.c_ulong
    lib.tjInitDecompress.restype = ctypes.c_void_p
    lib.tjDestroy.argtypes = [ctypes.c_void_p]
    lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_char_p, size, c_int_p, c_int_p, c_int_p, c_int_p]
    lib.tjDecompress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, size, ctypes.c_void_p, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.tjGetErrorStr2.argtypes = [ctypes.c_void_p]
    lib.tjGetErrorStr2.restype = ctypes.c_char_p
    lib.tjGetErrorCode.argtypes = [ctypes.c_void_p]


def decode(data: bytes, into: Callable[[tuple[int, ...]], np.ndarray | None] | None = None,
           size: tuple[int, int] | None = None) -> Jpeg:
    """One baseline or progressive 8-bit JPEG -> BGR (or gray) uint8, with libjpeg's default (accurate) DCT and
    upsampling, as OpenCV decodes it; a colour one into ``into(shape)`` where that gives a buffer. Decoding stops at
    libjpeg's first warning (the only one libjpeg reports) and returns it: the caller refuses a damaged file, or
    has OpenCV's path decode a harmlessly warned one whole. ``size``: the
    (width, height) the caller's header reader found and checked against its limit; another claim here is not
    decoded. Raises Fallback where OpenCV's path should decode it instead."""
    lib = library()
    if lib is None:
        raise Fallback("no libturbojpeg")
    handle = lib.tjInitDecompress()
    if not handle:
        raise Fallback("tjInitDecompress failed")
    try:
        w, h, sub, cs = (ctypes.c_int() for _ in range(4))
        if lib.tjDecompressHeader3(handle, data, len(data), ctypes.byref(w), ctypes.byref(h), ctypes.byref(sub),
                                   ctypes.byref(cs)) != 0 or cs.value not in (TJCS_YCBCR, TJCS_GRAY, TJCS_RGB):
            raise Fallback("header")
        if size is not None and (w.value, h.value) != tuple(size):
            raise Fallback(f"header says {w.value}x{h.value}, not {size[0]}x{size[1]}")
        gray = cs.value == TJCS_GRAY
        shape = (h.value, w.value) if gray else (h.value, w.value, 3)
        img = into(shape) if into is not None and not gray else None
        img = np.empty(shape, np.uint8) if img is None else img
        status = lib.tjDecompress2(handle, data, len(data), img.ctypes.data, w.value, 0, h.value,
                                   TJPF_GRAY if gray else TJPF_BGR, TJFLAG_STOPONWARNING)
        warnings: list[str] = []
        if status != 0:
            if lib.tjGetErrorCode(handle) != TJERR_WARNING:
                raise Fallback("fatal")
            warnings.append((lib.tjGetErrorStr2(handle) or b"").decode(errors="replace").strip())
        return Jpeg(img, warnings)
    finally:
        lib.tjDestroy(handle)
