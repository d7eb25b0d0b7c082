"""Turn command-line inputs (files, folders, globs) into image paths, keeping a reason for each one that yields none."""
from __future__ import annotations

import glob
from pathlib import Path

from runtime.imageio import IMAGE_SUFFIXES


def expand_inputs(items: list[str]) -> list[tuple[str, str | None]]:
    """[(path, error)] in the order given: folders expand to their images (sorted, not recursive), globs to their
    matches. A folder without images, a glob without matches, or a missing path stays as one entry with an error."""
    out: list[tuple[str, str | None]] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(c) for c in p.iterdir() if c.is_file() and c.suffix.lower() in IMAGE_SUFFIXES)
            out += [(f, None) for f in found] or [(item, f"{item}: directory contains no images "
                                                          f"({', '.join(IMAGE_SUFFIXES)})")]
        elif p.exists():
            out.append((item, None))
        elif glob.has_magic(item):
            found = sorted(glob.glob(item))
            out += [(f, None) for f in found] or [(item, f"{item}: pattern matches no files")]
        else:
            out.append((item, f"{item}: file not found"))
    return out


def image_files(folder: Path) -> list[Path]:
    """The images directly inside ``folder``, sorted by name."""
    return [Path(p) for p, err in expand_inputs([str(folder)]) if err is None]
