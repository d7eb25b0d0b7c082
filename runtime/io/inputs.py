"""Turn command-line inputs (files, folders, globs) into image paths, keeping a reason for each one that yields none."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.io.formats import IMAGE_SUFFIXES, SLIDE_SUFFIXES, is_dicom, is_image, is_slide


@dataclass
class ImageInput:
    """One input and the name it is reported under: encoded bytes (a watched file read once, an upload), a decoded
    BGR array (a camera frame), or an error found before decoding (a missing path). ``min_tissue``: the tissue
    share below which the quality check flags a field as mostly glass, where the caller has its own (a slide's
    --min-tissue: one tissue rule for the slide's mask and its fields' check); None: the check's default."""

    name: str
    data: bytes | None = None
    array: np.ndarray | None = None
    error: str | None = None
    min_tissue: float | None = None


def expand_inputs(items: list[str], recursive: bool = False, skipped: list[str] | None = None,
                  slides: bool = False) -> list[tuple[str, str | None]]:
    """[(path, error)] in the order given: folders expand to their images (sorted; with ``recursive``, their
    sub-folders too, links to folders not followed), globs to their matches; with ``slides``, slide formats too,
    and a folder of DICOM instances is one input. A folder without any, a glob without matches, or a missing path
    stays as one entry with an error. What a folder holds but is not read (other file types, sub-folders, broken
    links) is described in ``skipped``, when given."""
    out: list[tuple[str, str | None]] = []
    notes = skipped if skipped is not None else []
    for item in items:
        p = Path(item)
        if slides and is_dicom(p):
            out.append((item, None))
        elif p.is_dir():
            found = _folder_images(p, recursive, notes, slides)
            kinds = IMAGE_SUFFIXES + (SLIDE_SUFFIXES + (".dcm",) if slides else ())
            out += [(f, None) for f in found] or [(item, f"{item}: directory contains no "
                                                          f"{'slides or images' if slides else 'images'} "
                                                          f"({', '.join(dict.fromkeys(kinds))})")]
        elif p.exists():
            out.append((item, None))
        elif glob.has_magic(item):
            found = sorted(glob.glob(item))
            out += [(f, None) for f in found] or [(item, f"{item}: pattern matches no files")]
        elif p.is_symlink():
            out.append((item, f"{item}: broken link (points to {os.readlink(p)})"))
        else:
            out.append((item, f"{item}: file not found"))
    return out


def _folder_images(folder: Path, recursive: bool, notes: list[str], slides: bool = False) -> list[str]:
    found = []
    for c in sorted(folder.iterdir()):
        if c.is_symlink() and not c.exists():
            notes.append(f"{c}: skipped, broken link")
        elif c.is_dir():
            if c.is_symlink():
                notes.append(f"{c}: skipped, a link to a folder (not followed)")
            elif slides and is_dicom(c):
                found.append(str(c))
            elif recursive:
                found += _folder_images(c, recursive, notes, slides)
            else:
                notes.append(f"{c}: skipped, a folder (use --recursive)")
        elif is_image(c.name) or (slides and is_slide(c.name)):
            found.append(str(c))
        elif not c.name.startswith("."):
            notes.append(f"{c}: skipped, not a supported image type ({', '.join(IMAGE_SUFFIXES)})")
    return found


def image_files(folder: Path) -> list[Path]:
    """The images directly inside ``folder``, sorted by name."""
    return [Path(p) for p, err in expand_inputs([str(folder)]) if err is None]
