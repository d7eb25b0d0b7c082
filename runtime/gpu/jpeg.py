"""JPEG decoding on the GPU with NVIDIA nvImageCodec (the optional ``gpu-decode`` extra; on Jetson its ``-tegra-``
wheel): a JPEG is decoded into GPU memory the preprocessing kernel reads (RGB: the kernel orders the channels), so
its pixels never cross the bus. Used only where a self-check at start shows this decoder refuses truncated and
corrupt JPEGs as libjpeg does (the damage rule) and decodes a clean one to libjpeg's pixels; a JPEG it cannot decode
goes to the CPU decoder, which names the damage. PNG always stays on the CPU (there is no GPU PNG decoder)."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from runtime.errors import Unavailable
from runtime.io.decode import decoder_messages, header

MAX_DIFF = 8  # a clean JPEG's pixels vs libjpeg's: decoders' IDCTs and upsampling differ by a few levels


class GpuDecodeUnavailable(Unavailable):
    """GPU JPEG decoding cannot be used here; the message says why (JPEGs are decoded on the CPU)."""


class NvImageCodecMissing(GpuDecodeUnavailable):
    """nvImageCodec is not installed: the ordinary case, nothing to note."""


@dataclass
class DeviceImage:
    """A decoded image in GPU memory, as the kernel reads it: ``height`` rows of ``pitch`` bytes, RGB uint8."""

    ptr: int
    height: int
    width: int
    pitch: int
    keep: Any  # the nvImageCodec Image owning the memory, held while the kernel may read it
    channels: int = 3
    bgr: bool = False


def to_host(image: DeviceImage, context: Any, step: int = 1) -> np.ndarray:
    """Every ``step``-th pixel of every ``step``-th row of an image decoded on the GPU, BGR uint8 on the host. Only
    those rows cross the bus (one copy whose source pitch is ``step`` rows), synchronously on the legacy default
    stream: after the decode queued there, and after the work of every blocking stream (the preprocessor's)."""
    rows = -(-image.height // step)
    out = np.empty((rows, image.width * image.channels), np.uint8)
    with context.active() as cuda:
        copy = cuda.Memcpy2D()
        copy.set_src_device(image.ptr)
        copy.src_pitch = image.pitch * step
        copy.set_dst_host(out)
        copy.dst_pitch = copy.width_in_bytes = image.width * image.channels
        copy.height = rows
        copy(aligned=False)
    px = out.reshape(rows, image.width, image.channels)[:, ::step]
    return np.ascontiguousarray(px if image.bgr else px[..., ::-1])


class GpuJpegDecoder:
    """``decode_file(data, name, max_pixels)``: a one-page, unrotated JPEG on the GPU, or None (the CPU decodes it).
    Its work is ordered on CUDA's legacy default stream, which the preprocessor's stream waits for."""

    def __init__(self, device: int = 0, backends: tuple[str, ...] = ("GPU_ONLY", "HYBRID_CPU_GPU")) -> None:
        self.lock = threading.Lock()
        self.context: Any = None  # runtime/gpu/context.py's, made on first use (sparse)
        os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")  # its per-file errors would go, unattributed, to stderr
        with decoder_messages() as said:  # what loading its codec libraries prints, kept for the reason below
            try:
                from nvidia import nvimgcodec
            except ImportError:
                raise NvImageCodecMissing("nvImageCodec is not installed (pip install "
                                          "'breakhis-edge[gpu-decode]')") from None
            try:
                self.decoder = nvimgcodec.Decoder(device_id=device, backends=[
                    nvimgcodec.Backend(getattr(nvimgcodec, kind)) for kind in backends])
            except RuntimeError as e:
                raise GpuDecodeUnavailable(f"nvImageCodec cannot start on GPU {device} ({e})") from None
            self.params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.SRGB,
                                                  sample_format=nvimgcodec.I_RGB)
            why = self.refusal()  # its decoders' complaints about the damaged samples stay off the console
        if why:
            codecs = "; ".join(m for m in said if "nvjpeg" in m.lower())[:200]
            raise GpuDecodeUnavailable(f"nvImageCodec {why}, so JPEGs are decoded on the CPU" +
                                       (f" (it said: {codecs})" if codecs else ""))

    def _decode(self, data: bytes) -> Any:
        with self.lock:  # one decode at a time: the decode workers share one decoder (its thread safety unstated)
            return self.decoder.decode(data, params=self.params, cuda_stream=0)

    def refusal(self) -> str | None:
        """Why this decoder must not be used (it decodes a truncated or corrupt JPEG, or a clean one wrongly), or
        None. Checked on a synthetic image with the damage of the decoder tests: the second half cut off, and two
        thirds of the scan zeroed (libjpeg decodes both, and says they are damaged)."""
        rng = np.random.default_rng(0)
        bgr = cv2.GaussianBlur(rng.integers(0, 256, (256, 384, 3), np.uint8), (7, 7), 0)
        clean = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        img = self._decode(clean)
        if img is None:
            return "does not decode a clean JPEG on the GPU"
        want = np.asarray(cv2.imdecode(np.frombuffer(clean, np.uint8), cv2.IMREAD_COLOR))[:, :, ::-1]  # RGB
        got = np.asarray(img.cpu())
        if got.shape != want.shape or np.abs(got.astype(int) - want).max() > MAX_DIFF:
            return "decodes a clean JPEG to other pixels than libjpeg's"
        sos = clean.find(b"\xff\xda")
        start = sos + 2 + int.from_bytes(clean[sos + 2:sos + 4], "big")
        cut = start + (len(clean) - 2 - start) // 3
        for kind, data in (("truncated", clean[:len(clean) // 2]),
                           ("corrupt", clean[:cut] + bytes(len(clean) - 2 - cut) + clean[-2:])):
            if self._decode(data) is not None:
                return f"decodes a {kind} JPEG without an error (libjpeg refuses it)"
        return None

    def sparse(self, image: DeviceImage, step: int) -> np.ndarray:
        """Every ``step``-th pixel of every ``step``-th row of an image decoded here, BGR on the host: what the
        field-quality measures read (runtime/pipeline/quality.py)."""
        from runtime.gpu.context import Context

        if self.context is None:
            self.context = Context()
        return to_host(image, self.context, step)

    def decode_file(self, data: bytes, name: str, max_pixels: int) -> DeviceImage | None:
        """The header checks of every decoder (size limit, pages; ImageError as on the CPU), then the GPU decode
        of a one-page JPEG without an orientation tag; None: the CPU decodes it (other formats, a tag to apply, or
        data this decoder refuses, whose damage the CPU decoder then names)."""
        if not data.startswith(b"\xff\xd8\xff"):  # not a JPEG (a PNG field): the CPU decoder reads its header once
            return None
        info, _ = header(data, name, max_pixels)
        if info.format != "JPEG" or len(info.pages) != 1 or info.orientation != 1:
            return None
        img = self._decode(data)
        if img is None:
            return None
        cai = img.__cuda_array_interface__
        h, w, c = cai["shape"]
        strides = cai.get("strides") or (w * c, c, 1)
        if c != 3 or cai["typestr"] != "|u1" or tuple(strides[1:]) != (3, 1) or (w, h) != info.pages[0]:
            return None
        return DeviceImage(int(cai["data"][0]), int(h), int(w), int(strides[0]), img)
