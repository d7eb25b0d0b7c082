"""Reuse of an identical earlier export: a model directory's files and gate results, keyed by everything they
depend on (weights, gate images, options, this code, the libraries, this CPU). The same export asked for twice
(setup.sh, then the tests' fixtures) is made once. Only an export that passed its gates is stored; a stored entry
is checked against its own manifest before it is used, and a damaged one is dropped and made anew.

Location: $BREAKHIS_EXPORT_CACHE (``off`` disables it), default models/.export-cache (inside the checkout, so a
fresh clone starts without one); at most ``KEEP`` entries (~200 MB each), oldest dropped first.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from runtime.model.manifest import Manifest, ModelError, Provenance, sha256_file
from runtime.model.model_dir import MANIFEST_NAME, REPORT_NAME, ModelDir
from runtime.model.paths import MODELS, REPO
from runtime.model.precisions import PRECISIONS
from runtime.model.stain_reference import STAIN_REFERENCE_NAME

KEEP = 4
LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxslim", "openvino", "numpy", "opencv-python-headless", "imagecodecs",
             "pillow")
DONE = "complete"  # written last into an entry: an entry without it was cut short and is never used


def cache_dir() -> Path | None:
    """$BREAKHIS_EXPORT_CACHE, or models/.export-cache; None where it is "off"."""
    where = os.environ.get("BREAKHIS_EXPORT_CACHE", "")
    if where.lower() in ("off", "0", "no"):
        return None
    return Path(where) if where else MODELS / ".export-cache"


def export_key(provenance: Provenance, images: Path | None, options: dict[str, Any]) -> str:
    """sha256 of what the files and gate results depend on. Not the model's name or provenance text, which only
    the manifest holds (the ONNX files carry the weights' sha256 and the trained flag, both in the key)."""
    from runtime.io.inputs import image_files

    gate_images = image_files(images) if images is not None and images.is_dir() else []
    n = options.get("gate_count")
    parts = {
        "weights_sha256": provenance.sha256, "trained": provenance.trained, "options": options,
        "images": [[p.name, sha256_file(p)] for p in gate_images[:n]],
        "code": _code_sha256(), "libraries": {lib: _version(lib) for lib in LIBRARIES}, "cpu": _cpu(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def reuse(key: str, out_dir: Path, name: str, provenance: Provenance, log: Any = print) -> Manifest | None:
    """Write the stored export ``key`` into ``out_dir`` under this export's name and provenance; None where
    there is none (or it was damaged, and is now dropped)."""
    root = cache_dir()
    entry = root / key[:32] if root is not None else None
    if entry is None or not (entry / DONE).is_file():
        return None
    try:
        cached = ModelDir.open(entry)
        stored, report = cached.manifest, cached.report()
        for f, sha in stored.files.items():
            if sha256_file(entry / f) != sha:
                raise ModelError(f"{f} does not match its sha256")
    except (ModelError, OSError, ValueError) as e:
        log(f"export cache: entry {entry.name} is damaged ({e}): dropped, the export runs")
        shutil.rmtree(entry, ignore_errors=True)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    report["export_cache"] = {"key": key, "reused": True}
    tmp = {f: out_dir / f".{f}.tmp" for f in stored.files}
    try:
        for f, t in tmp.items():
            shutil.copyfile(entry / f, t)
        for f, t in tmp.items():
            t.replace(out_dir / f)
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)
    for f in ({p.file for p in PRECISIONS.values()} | {STAIN_REFERENCE_NAME}) - set(stored.files):  # none older left
        (out_dir / f).unlink(missing_ok=True)
    manifest = replace(stored, name=name, provenance=provenance)
    ModelDir.create(out_dir, manifest, report)
    os.utime(entry / DONE)  # recently used: kept longest
    log(f"export cache: the same export (same weights, images, options, code, libraries, CPU) was made before and "
        f"passed its gates; its files were reused ({entry}); --no-cache makes it again")
    return manifest


def store(key: str, out_dir: Path, log: Any = print) -> None:
    """Keep a copy of a finished export (its gates passed: it was written) for an identical export later."""
    root = cache_dir()
    if root is None:
        return
    tmp: Path | None = None
    try:
        manifest = ModelDir.open(out_dir).manifest
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
        for f in [*manifest.files, MANIFEST_NAME, REPORT_NAME]:
            shutil.copyfile(out_dir / f, tmp / f)
        (tmp / DONE).write_text(key + "\n")
        entry = root / key[:32]
        shutil.rmtree(entry, ignore_errors=True)
        tmp.rename(entry)
    except OSError as e:  # a cache that cannot be written costs the next export time, nothing else
        log(f"export cache: not stored ({e})")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    entries = sorted((p for p in root.iterdir() if (p / DONE).is_file()), key=lambda p: (p / DONE).stat().st_mtime)
    for old in entries[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def _code_sha256() -> str:
    """sha256 of the code an export can run: every module of export/ and every runtime/ module they can import,
    directly or through each other (``code_files``)."""
    h = hashlib.sha256()
    for p in code_files():
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def code_files() -> list[Path]:
    """export/*.py and the closure of runtime/ modules named by any import statement in them (at module level or
    inside a function: every import that could run), with each package's ``__init__.py`` on the way. A runtime/
    module outside it (the apps, slides, cohorts) is never imported by an export, so it cannot change one; nothing
    in export/ or runtime/ imports by a computed name, which ``test_the_export_key_covers_every_module_an_export_
    imports`` checks."""
    todo = sorted((REPO / "export").rglob("*.py"))
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path):
            parts = name.split(".")
            if parts[0] not in ("export", "runtime"):
                continue
            for i in range(1, len(parts) + 1):  # each package on the way, and the module itself
                base = REPO.joinpath(*parts[:i])
                for candidate in (base / "__init__.py", base.with_suffix(".py")):
                    if candidate.is_file() and candidate not in seen:
                        todo.append(candidate)
    return sorted(seen)


def _imported_names(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names; for ``from a.b import c`` both a.b and a.b.c (c may be
    a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu() -> dict[str, str]:
    """The CPU the gates ran on: FP32 summation order and BF16 support differ between CPUs' kernels."""
    info = {"machine": platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags", "Features") and key.strip() not in info:
                info[key.strip()] = value.strip()
    except OSError:
        info["processor"] = platform.processor()
    return info
