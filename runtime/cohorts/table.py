"""The cohort's table (cohort.csv, and cohort.parquet where pyarrow is installed) and the versions run.json records."""
from __future__ import annotations

import csv
import io
import platform
from pathlib import Path
from typing import Any

from runtime.slides.files import write_atomic

COLUMNS = ("path", "size_bytes", "sha256", "magnification", "mpp", "scale_source", "verdict", "probability", "rule",
           "fields", "classified", "background", "errors", "rechecked", "flagged", "withheld", "seconds", "status",
           "error", "warnings", "model", "resumed", "outputs")


def write_table(out: Path, rows: list[dict[str, Any]]) -> list[str]:
    """cohort.csv, and cohort.parquet where pyarrow is installed; the names written."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_atomic(out / "cohort.csv", buf.getvalue().encode("utf-8", "surrogateescape"))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return ["cohort.csv"]
    table = pa.table({c: [r.get(c) for r in rows] for c in COLUMNS})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(out / "cohort.parquet", sink.getvalue().to_pybytes())
    return ["cohort.csv", "cohort.parquet"]


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for lib in ("breakhis-edge", "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "tifffile", "wsidicom",
                "ray", "pyarrow"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return out
