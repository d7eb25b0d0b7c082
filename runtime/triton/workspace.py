"""What one run of ``python -m runtime.triton_server`` leaves on the machine, and its removal however the run ends.

A run owns one folder, ``<PYTRITON_HOME>/breakhis-triton-<random>`` (mode 0700), with a marker file naming the run's
pid, the prefix of the shared memory Triton's Python backend makes (/dev/shm/pytrtion<pid>-<random>...) and the
folders Triton writes the models PyTriton loads into (``/tmp/folderXXXXXX``, read from the stubs' command lines);
PyTriton's workspace (its copy of tritonserver, the model store) and a random access token live inside the folder.
When the run stops, whoever sent the signal to whom, ``remove`` kills what is left of its processes (Triton, its
Python-backend stubs, PyTriton's helpers: every descendant of the run's process), then removes the shared memory,
Triton's model folders and the folder. At the next start ``remove_stale`` does the same for the folders of runs that
were killed (SIGKILL, a power cut): only folders with the marker, of this user, whose pid is not running; a folder
whose pid runs, or without a marker, is left alone."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

PREFIX = "breakhis-triton-"
MARKER = "breakhis-triton.json"
SHM = Path("/dev/shm")
SHM_PREFIX = re.compile(r"pytrtion\d+-[0-9a-f]+")  # PyTriton 0.7.0's Triton._shm_prefix: pytrtion<pid>-<8 hex>
TRITON_FOLDER = re.compile(r"folder[A-Za-z0-9]{6}")  # Triton's MakeTemporaryDirectory: <dir>/folderXXXXXX
STUB = "triton_python_backend_stub"


class RunFolder:
    """This run's folder and marker (made at once, so that a run killed at any later moment is recognised)."""

    def __init__(self, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
        self.record: dict[str, Any] = {"pid": os.getpid(), "shm_prefix": "", "folders": []}
        self._write()

    def _write(self) -> None:
        part = self.path / (MARKER + ".part")
        part.write_text(json.dumps(self.record))
        part.replace(self.path / MARKER)

    def note(self, shm_prefix: str | None = None, folders: list[Path] | None = None) -> None:
        """Record the shared-memory prefix and Triton's model folders of this run (before they exist is fine)."""
        if shm_prefix is not None:
            self.record["shm_prefix"] = shm_prefix
        if folders:
            self.record["folders"] = sorted({*self.record["folders"], *(str(f) for f in folders)})
        self._write()

    def secret(self, name: str, text: str) -> Path:
        """A file of this folder only this user can read (0600, made so: never readable in between)."""
        path = self.path / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        return path

    def remove(self) -> list[str]:
        """Kill this run's remaining processes, then remove what it left (see ``clear``)."""
        self.note(folders=triton_folders(os.getpid()))
        kill_descendants(os.getpid())
        return clear(self.path, self.record)


def triton_folders(pid: int) -> list[Path]:
    """Triton's model folders in use by the descendants of ``pid``: the stubs run ``<folder>/<version>/model.py``."""
    found = []
    for child in descendants(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[0].decode(errors="replace").endswith(STUB):
            model = Path(argv[1].decode(errors="replace"))
            if model.name == "model.py" and len(model.parents) > 2 and TRITON_FOLDER.fullmatch(model.parents[1].name):
                found.append(model.parents[1])
    return found


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, their children, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])  # after the command, which may hold spaces and ")"
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def kill_descendants(pid: int, wait_s: float = 5.0) -> None:
    """SIGKILL every descendant of ``pid`` still running, and wait (at most ``wait_s``) until none runs."""
    for _ in range(3):  # a process may start another between the scan and the kill: scan again
        alive = [p for p in descendants(pid) if running(p)]
        if not alive:
            return
        for p in alive:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s / 3
        while any(running(p) for p in alive) and time.monotonic() < deadline:
            time.sleep(0.05)


def _ours(path: Path) -> bool:
    try:
        return path.lstat().st_uid == os.getuid()
    except OSError:
        return False


def clear(folder: Path, record: dict[str, Any]) -> list[str]:
    """Remove a run's shared memory (the names with its prefix), Triton's model folders it recorded (only folders named
    as Triton names them, of this user) and ``folder``; the paths removed."""
    removed = []
    prefix = str(record.get("shm_prefix") or "")
    if SHM_PREFIX.fullmatch(prefix) and SHM.is_dir():
        for name in os.listdir(SHM):
            if name.startswith(prefix) and _ours(SHM / name):
                (SHM / name).unlink(missing_ok=True)
                removed.append(str(SHM / name))
    for f in map(Path, record.get("folders") or []):
        if TRITON_FOLDER.fullmatch(f.name) and f.is_dir() and not f.is_symlink() and _ours(f):
            shutil.rmtree(f, ignore_errors=True)
            removed.append(str(f))
    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(str(folder))
    return removed


def remove_stale(base: Path) -> list[str]:
    """Remove what runs that were killed left under ``base``: folders named ``breakhis-triton-*`` of this user with a
    readable marker whose pid is not running. The paths removed."""
    removed: list[str] = []
    if not base.is_dir():
        return removed
    for folder in base.glob(PREFIX + "*"):
        if not folder.is_dir() or folder.is_symlink() or not _ours(folder):
            continue
        try:
            record = json.loads((folder / MARKER).read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no marker (yet): not recognisably ours, left alone
        if pid != os.getpid() and not running(pid):
            removed += clear(folder, record)
    return removed
