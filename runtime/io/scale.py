"""The physical scale of an input against the model's: where it is stated (OME-XML, Aperio SVS description, TIFF
resolution tags, a BreakHis file name, a flag), how many input pixels make one model pixel, and what to warn."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from runtime.model.manifest import Contract

# BreakHis names state the magnification: SOB_M_DC-14-10926-100-003.png is a 100X image.
_BREAKHIS = re.compile(r"^SOB_[BM]_[A-Z]+-\d+-[0-9A-Za-z]+-(\d+)-\d+\.\w+$")


@dataclass(frozen=True)
class Scale:
    """What is known of an input's scale, and where that came from."""

    magnification: float | None = None
    mpp: float | None = None  # microns per level-0 pixel
    source: str = "unknown"  # "flag", "OME-XML", "SVS description", "TIFF resolution", "BreakHis file name"


def breakhis_magnification(name: str) -> float | None:
    m = _BREAKHIS.match(Path(name).name)
    return float(m.group(1)) if m else None


def from_name(name: str) -> Scale:
    mag = breakhis_magnification(name)
    return Scale(magnification=mag, source="BreakHis file name") if mag else Scale()


def resample_factor(scale: Scale, contract: Contract) -> tuple[float, list[str]]:
    """(input pixels per model pixel, warnings). Microns per pixel where both sides state them, else the
    magnifications; where neither pair is known the input is assumed to be at the model's scale, and said so."""
    if scale.mpp and contract.mpp:
        f = contract.mpp / scale.mpp
        mag = f", {scale.magnification:g}X" if scale.magnification else ""
        warn = [] if abs(f - 1) < 1e-6 else [
            f"input is {scale.mpp:g} microns per pixel{mag} ({scale.source}), the model was trained on "
            f"{contract.mpp:g}: " + ("resampled to the model's scale" if f > 1 else
                                     f"upsampled {1 / f:.3g}x, with less detail than it was trained on")]
        return f, warn
    if scale.magnification and contract.magnification:
        f = scale.magnification / contract.magnification
        warn = [] if abs(f - 1) < 1e-6 else [
            f"input is {scale.magnification:g}X ({scale.source}), the model was trained on "
            f"{contract.magnification:g}X fields: " + ("resampled to the model's scale" if f > 1 else
                                                       f"upsampled {1 / f:.3g}x, with less detail than it was "
                                                       "trained on")]
        return f, warn
    model = f"{contract.magnification:g}X" if contract.magnification else "the model's"
    if scale.mpp and not contract.mpp:
        return 1.0, [f"the input's scale is known only in microns per pixel ({scale.mpp:g}, {scale.source}) and the "
                     f"model's only as a magnification: assumed to be {model} scale (--magnification states it)"]
    return 1.0, [f"scale unknown (no magnification or microns per pixel in the file; --magnification or --mpp "
                 f"states it): assumed to be {model} scale"]


def name_warning(name: str, contract: Contract) -> str | None:
    """For a single field image (no resampling): a warning where its BreakHis name states another magnification."""
    mag = breakhis_magnification(name)
    if mag is None or contract.magnification is None or mag == contract.magnification:
        return None
    return (f"{Path(name).name}: the file name says {mag:g}X, this model was trained on {contract.magnification:g}X "
            "fields: the verdict is not at the model's scale")


def magnification_advice(scale: Scale, contract: Contract, resampled: bool) -> str | None:
    """What to do where the focus check flags an image that is not at the model's scale (None where it is, or where
    that is unknown): a field at another scale, an upsampled one above all, looks out of focus to a check made for
    the model's, and re-focusing would not help. ``resampled``: the image was brought to the model's scale (a region
    or slide; a single field image is classified as it is)."""
    by_mpp = bool(scale.mpp and contract.mpp)
    if not by_mpp and not (scale.magnification and contract.magnification):
        return None
    f = resample_factor(scale, contract)[0]
    if abs(f - 1) < 1e-6:
        return None
    model = f"{contract.magnification:g}X" if contract.magnification else f"{contract.mpp:g} microns per pixel"
    mag = f"{scale.magnification:g}X" if scale.magnification else f"{scale.mpp:g} microns per pixel"
    what = (f"this image was upsampled x{1 / f:.3g} from {mag} ({scale.source})" if resampled and f < 1 else
            f"this image is {mag} ({scale.source}) and the model reads {model} fields")
    return f"out of focus at the model's scale: {what}: capture at {model} (re-focus only if it already is {model})"
