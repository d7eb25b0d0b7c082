"""A cohort's units of work: its inputs, one unit per slide (or band of field rows), the key a slide's result
is resumed by, and the scale the options state."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runtime.errors import BreakhisError
from runtime.io.inputs import expand_inputs
from runtime.io.scale import Scale
from runtime.io.slide_source import slide_identity
from runtime.slides.bands import field_rows
from runtime.slides.files import output_stem

RECORD = ".result.json"  # a slide's record: written last, so its presence means the slide's outputs are whole


class CohortError(BreakhisError):
    """The cohort cannot run as asked (no inputs, no Ray); the message says why."""


@dataclass
class Unit:
    """One slide of the cohort: where it is, what its bytes are, where its outputs go."""

    path: str
    size_bytes: int
    sha256: str
    stem: str  # DIR/slides/NAME.<sha256[:12]>
    rows: tuple[int, int] | None = None  # a band of field rows (start, stop); None: the whole slide
    part: int = 0  # which band of the slide's ``parts``
    parts: int = 1


def cohort_inputs(items: list[str], notes: list[str]) -> list[tuple[Path, str | None]]:
    """[(path, error)]: files, folders (their slides and images, recursively; a folder of DICOM instances is one
    slide), globs, or .csv / .txt lists of paths (a "path" column, or the first; relative paths from the list's
    folder), in the order given, each once. A missing path, an empty folder or a glob matching nothing keeps its
    error (runtime/io/inputs.py: expand_inputs, as every CLI reads its inputs)."""
    expanded: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_file() and p.suffix.lower() in (".csv", ".txt"):
            rows = list(csv.reader(io.StringIO(p.read_text(errors="surrogateescape"))))
            header = bool(rows) and "path" in rows[0]
            col = rows[0].index("path") if header else 0
            listed = [Path(r[col].strip()) for r in rows[header:] if len(r) > col and r[col].strip()]
            expanded += [str(q if q.is_absolute() else p.parent / q) for q in listed]
        else:
            expanded.append(item)
    unique: dict[str, tuple[Path, str | None]] = {}
    for path, error in expand_inputs(expanded, recursive=True, skipped=notes, slides=True):
        unique.setdefault(os.path.realpath(path), (Path(path), error))  # one slide, however often it was named
    return list(unique.values())


def run_key(model: dict[str, Any], options: dict[str, Any]) -> str:
    """What a slide's result depends on besides its bytes: the model's weights, the variant's file and precision,
    whether borderline fields are re-checked at FP32, and every option that changes a probability or a verdict."""
    keep = {k: model.get(k) for k in ("sha256", "file_sha256", "precision", "recheck")}
    return hashlib.sha256(json.dumps({"model": keep, "options": options}, sort_keys=True).encode()).hexdigest()


def finished(unit: Unit, key: str, retry_errors: bool) -> dict[str, Any] | None:
    """The row of an earlier complete result of this slide for this model and these options, or None."""
    try:
        record = json.loads(Path(f"{unit.stem}{RECORD}").read_text())
    except (OSError, ValueError):
        return None
    row = record.get("row") if isinstance(record, dict) and record.get("key") == key else None
    if row is None or (retry_errors and row.get("status") == "error"):
        return None
    return row | {"resumed": True}


def plan_units(paths: list[tuple[Path, str | None]], slides: Path, key: str,
               retry_errors: bool) -> tuple[list[Unit], list[dict]]:
    """(units to classify, rows already done or unreadable), in input order by path."""
    todo, rows = [], []
    for p, error in paths:
        if error is not None:
            rows.append({"path": str(p), "status": "error", "error": error, "resumed": False})
            continue
        try:
            unit = Unit(str(p), *slide_identity(p), "")
        except OSError as e:
            rows.append({"path": str(p), "status": "error", "error": f"{p}: cannot read ({e.strerror or e})",
                         "resumed": False})
            continue
        unit.stem = str(output_stem(slides, p.name, unit.sha256))
        done = finished(unit, key, retry_errors)
        if done is not None:
            rows.append(done | {"path": unit.path})
        else:
            todo.append(unit)
    return todo, rows


def split_bands(units: list[Unit], band_rows: int, contract: Any, options: dict[str, Any]) -> list[Unit]:
    """Each slide as bands of ``band_rows`` field rows (one unit each); a slide whose rows cannot be counted here
    stays whole (its error, if it has one, comes from classifying it)."""
    out = []
    scale = options_scale(options)
    for u in units:
        try:
            n = field_rows(u.path, contract, scale, options["max_pixels"])
        except BreakhisError:
            n = 0
        starts = list(range(0, n, band_rows)) or [0]
        out += [replace(u, rows=(r, r + band_rows) if n else None, part=i, parts=len(starts))
                for i, r in enumerate(starts)]
    return out


def options_scale(options: dict[str, Any]) -> Scale | None:
    """The scale --magnification / --mpp state for every input; None: what each file says."""
    return Scale(options["magnification"], options["mpp"], "flag") if options["magnification"] or options["mpp"] \
        else None
