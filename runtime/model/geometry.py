"""Where the fields and patches of an image lie, a contract of the model's input: pure arithmetic shared by the CPU
path and the GPU offset table."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import BreakhisError
from runtime.model.manifest import Contract


class TilingError(BreakhisError, ValueError):
    """The image cannot be tiled under the contract (too small)."""


@dataclass(frozen=True)
class FieldPlan:
    """Fields of one image, row-major from the top-left; each field holds ``contract.seq_len`` patches."""

    height: int
    width: int
    field_origins: np.ndarray  # (F, 2) int64: (y, x) of each field's top-left pixel
    patch_offsets: np.ndarray  # (T, 2) int64: (y, x) of each patch relative to its field, row-major
    grid: tuple[int, int]  # (field rows, field cols)

    @property
    def n_fields(self) -> int:
        return len(self.field_origins)

    def patch_origins(self) -> np.ndarray:
        """(F * T, 2) absolute (y, x) origin of every patch, field-major then row-major within a field."""
        return (self.field_origins[:, None, :] + self.patch_offsets[None, :, :]).reshape(-1, 2)


def plan_fields(height: int, width: int, contract: Contract, field_stride: tuple[int, int] | None = None) -> FieldPlan:
    """Tile an image into fields. Non-overlapping by default (stride = field size); the remainder at the right and
    bottom is dropped, exactly as the original system dropped the last 28 columns and 12 rows of a 700x460 image."""
    fh, fw = contract.field_size
    if height < fh or width < fw:
        raise TilingError(f"image is {width}x{height}; the model needs at least {fw}x{fh} pixels "
                          f"({contract.grid[1]}x{contract.grid[0]} patches of {contract.patch} px)")
    sy, sx = field_stride or (fh, fw)
    ys = np.arange(0, height - fh + 1, sy, dtype=np.int64)
    xs = np.arange(0, width - fw + 1, sx, dtype=np.int64)
    origins = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
    rows, cols = contract.grid
    pr, pc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    offsets = np.stack([pr.ravel(), pc.ravel()], axis=-1).astype(np.int64) * contract.stride
    return FieldPlan(height, width, origins, offsets, (len(ys), len(xs)))


def plan_image(image: np.ndarray, contract: Contract) -> FieldPlan:
    """plan_fields for an HxWxC array."""
    return plan_fields(int(image.shape[0]), int(image.shape[1]), contract)
