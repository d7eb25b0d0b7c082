"""Every preprocessed field of a folder's images: what INT8 calibration (runtime/backends/trt_build.py, export/) and
the fidelity gates run on."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.io.decode import ImageError, read_image
from runtime.io.inputs import image_files
from runtime.model.geometry import TilingError
from runtime.model.manifest import Contract
from runtime.model.preprocess import preprocess_image


def folder_fields(folder: Path, contract: Contract, n_images: int | None = None, start: int = 0) -> np.ndarray:
    """Every preprocessed field of images ``start .. start + n_images`` of ``folder`` (sorted by name), for
    calibration and fidelity gates. Unreadable or too-small images are skipped. (N, T, 3, P, P); N may be 0."""
    return image_fields(folder, contract, n_images, start)[0]


def image_fields(folder: Path, contract: Contract, n_images: int | None = None,
                 start: int = 0) -> tuple[np.ndarray, list[tuple[Path, int]]]:
    """``folder_fields`` and where they came from: each image used and its number of fields, in order."""
    out: list[np.ndarray] = []
    sources: list[tuple[Path, int]] = []
    for path in image_files(folder)[start:][:n_images]:
        try:
            fields = preprocess_image(read_image(path).bgr, contract)
        except (ImageError, TilingError):
            continue
        out.extend(fields)
        sources.append((path, len(fields)))
    return (np.stack(out) if out else np.empty((0, *contract.field_shape), np.float32)), sources
