"""The preprocessing kernel's ABI in numpy: its structs, its job table, and the packed source buffer layout.

Pure numpy (no CUDA): shared by the pycuda path (runtime/gpu/preprocessor.py) and the CPU-side host harness tests, so
both feed the kernel exactly the same bytes. Field positions come from runtime/model/geometry.py, like the CPU path.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.model.geometry import FieldPlan
from runtime.model.manifest import Contract

# struct bhx::FieldJob and struct bhx::Params in runtime/gpu/kernels/preprocess.cuh (checked against sizeof in tests)
FIELDJOB = np.dtype([("src_offset", "<i8"), ("pitch", "<i4"), ("channels", "<i4"), ("origin_y", "<i4"),
                     ("origin_x", "<i4"), ("src_bgr", "<i4"), ("pad_", "<i4")])
PARAMS = np.dtype([("patch", "<i4"), ("stride", "<i4"), ("rows", "<i4"), ("cols", "<i4"), ("dst_bgr", "<i4"),
                   ("fp16", "<i4"), ("n_fields", "<i4"), ("dst_field0", "<i4"), ("mean", "<f4", 3),
                   ("scale", "<f4", 3)])
VEC = 8  # kVec: outputs per channel per thread
BLOCK = 256  # threads per block
ALIGN = 16  # each image starts on a 16-byte boundary in the source buffer


@dataclass(frozen=True)
class SourceImage:
    """One image as the kernel reads it: ``height`` rows of ``pitch`` bytes, ``channels`` bytes per pixel."""

    height: int
    width: int
    channels: int  # 3 or 4
    bgr: bool  # first three channels are B, G, R (OpenCV) rather than R, G, B
    pitch: int = 0  # bytes per row; 0 = width * channels

    @property
    def row_bytes(self) -> int:
        return self.pitch or self.width * self.channels

    @property
    def nbytes(self) -> int:
        return self.row_bytes * (self.height - 1) + self.width * self.channels


def layout(images: list[SourceImage]) -> tuple[list[int], int]:
    """Byte offset of each image in the packed source buffer, and the buffer's total size."""
    offsets, pos = [], 0
    for im in images:
        offsets.append(pos)
        pos += -(-im.nbytes // ALIGN) * ALIGN
    return offsets, pos


def job_table(images: list[SourceImage], offsets: list[int], plans: list[FieldPlan]) -> np.ndarray:
    """One FieldJob per field, image after image, fields row-major: the batch order of the CPU path."""
    rows = []
    for im, off, plan in zip(images, offsets, plans):
        if im.channels not in (3, 4):
            raise ValueError(f"the kernel reads 3- or 4-channel images, not {im.channels}")
        for y, x in plan.field_origins:
            rows.append((off, im.row_bytes, im.channels, int(y), int(x), int(im.bgr), 0))
    return np.array(rows, dtype=FIELDJOB)


def params(contract: Contract, n_fields: int, fp16: bool, dst_field0: int = 0) -> np.ndarray:
    p = np.zeros((), PARAMS)
    p["patch"], p["stride"] = contract.patch, contract.stride
    p["rows"], p["cols"] = contract.grid
    p["dst_bgr"] = int(contract.channel_order == "BGR")
    p["fp16"], p["n_fields"], p["dst_field0"] = int(fp16), n_fields, dst_field0
    p["mean"], p["scale"] = contract.mean, contract.scale
    return p


def thread_count(contract: Contract, n_fields: int) -> int:
    """Mirror of bhx::thread_count: one thread per (field, patch, row, group of VEC columns)."""
    return n_fields * contract.seq_len * contract.patch * -(-contract.patch // VEC)
