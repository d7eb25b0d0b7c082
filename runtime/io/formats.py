"""What each path reads, by file name: the one list behind the CLI's folders, the watch folder and the slide reader."""
from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")  # decoded whole (runtime/io/decode.py)
# read lazily, tile by tile, by tifffile (runtime/io/slide_source.py)
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".ome.tif", ".ome.tiff")
OPENSLIDE_SUFFIXES = (".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide")  # vendor formats: OpenSlide
DICOM_SUFFIXES = (".dcm",)  # a DICOM slide is the folder of its instances (runtime/io/slide_source.py)
SLIDE_SUFFIXES = TIFF_SUFFIXES + OPENSLIDE_SUFFIXES  # what the slide path reads lazily


def is_image(name: str) -> bool:
    """A file the single-image path decodes (PNG, JPEG, TIFF, BMP)."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def is_slide(name: str) -> bool:
    """A file the slide path reads lazily (TIFF family, vendor slide formats); .tif/.tiff are both."""
    return name.lower().endswith(SLIDE_SUFFIXES)


def is_dicom(path: Path) -> bool:
    """A DICOM slide: a .dcm instance, or a folder holding them (the whole series is one slide)."""
    return path.name.lower().endswith(DICOM_SUFFIXES) or (path.is_dir() and any(path.glob("*.dcm")))
