"""Writing a slide's outputs: whole or not at all, named by the file's content."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process's umask (read once, at import: setting it to read it is not thread-safe later)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()


def write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` whole or not at all: written under a temporary name in its folder, then renamed;
    its mode is the user's umask's, as any file the user writes (mkstemp's own is 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:80]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~UMASK)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_stem(folder: Path, name: str, sha256: str) -> Path:
    """FOLDER/NAME.<first 12 hex of the file's sha256>: two inputs of one name (other folders, a reused name) never
    write over each other's results, and the same file always lands on the same names."""
    return folder / f"{Path(name).name}.{sha256[:12]}"
