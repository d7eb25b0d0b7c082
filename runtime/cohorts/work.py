"""One unit of a cohort classified (a slide, or a band of its field rows), a slide's outputs made from its parts,
and written: its files, then its record."""
from __future__ import annotations

import gzip
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.cohorts.units import RECORD, Unit, options_scale
from runtime.errors import BreakhisError
from runtime.slides.bands import merge_bands, merge_overlays
from runtime.slides.classify import classify_slide
from runtime.slides.files import write_atomic


def classify_part(clf: Any, unit: Unit, options: dict[str, Any],
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """One slide, or one band of its field rows: {"result": SlideResult or None, "error", "overlay" (PNG bytes),
    "threshold", "labels", "seconds"}. A slide that cannot be read gives its error, never an exception: the other
    slides go on."""
    t0 = time.perf_counter()
    scale = options_scale(options)
    part: dict[str, Any] = {"threshold": clf.contract.threshold, "labels": clf.contract.labels, "result": None,
                            "error": None, "overlay": b""}
    with tempfile.TemporaryDirectory(prefix="cohort-") as tmp:
        overlay = Path(tmp) / "overlay.png"
        try:
            part["result"] = classify_slide(clf, unit.path, options["aggregate"], options["top_k"], scale,
                                            options["tissue_mask"], options["min_tissue"], options["max_pixels"],
                                            overlay, progress, rows=unit.rows)
            part["overlay"] = overlay.read_bytes()
        except BreakhisError as e:
            part["error"] = str(e)
    return part | {"seconds": time.perf_counter() - t0}


def finish_slide(unit: Unit, parts: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    """{"row": the slide's table row, "files": {suffix: bytes}} from its parts (bands merged, in row order)."""
    row: dict[str, Any] = {"path": unit.path, "size_bytes": unit.size_bytes, "sha256": unit.sha256,
                           "outputs": Path(unit.stem).name, "resumed": False,
                           "seconds": sum(p.get("seconds", 0.0) for p in parts)}
    failed = next((p["error"] for p in parts if p["error"]), None)
    if failed:
        return {"row": row | {"status": "error", "error": failed}, "files": {}}
    results = [p["result"] for p in parts]
    res = results[0] if len(parts) == 1 else merge_bands(results, options["aggregate"], options["top_k"],
                                                         parts[0]["threshold"], tuple(parts[0]["labels"]))
    # a whole slide's overlay has its legend; bands' are joined under the slide's (a lone band's too)
    overlay = parts[0]["overlay"] if unit.rows is None else merge_overlays(
        [(p["result"], p["overlay"]) for p in parts], res.aggregate)
    res.sha256 = unit.sha256
    a, n, s = res.aggregate, res.counts, res.scale
    row |= {"magnification": s["magnification"], "mpp": s["mpp"], "scale_source": s["source"],
            "verdict": a["label"], "probability": a["value"], "rule": a["rule"], **n,
            "warnings": "; ".join(res.warnings), "model": res.model_tag(),
            "error": "; ".join(([a["note"]] if res.left_out else []) + (res.warnings if n["errors"] else [])) or None,
            # no verdict: fields were left out (withheld or unread) and the counted ones do not make it Malignant
            "status": "no verdict" if res.left_out else "classified with errors" if n["errors"] else "classified"}
    files = res.outputs() | {".overlay.png": overlay}
    if options.get("geojson_gz"):
        files[".geojson.gz"] = gzip.compress(files[".geojson"], mtime=0)
    return {"row": row, "files": files}


def write_unit(unit: Unit, payload: dict[str, Any], key: str) -> dict[str, Any]:
    """The slide's outputs, then its record (last: a record means every output beside it is whole)."""
    for suffix, data in payload["files"].items():
        write_atomic(Path(f"{unit.stem}{suffix}"), data)
    write_atomic(Path(f"{unit.stem}{RECORD}"), (json.dumps({"key": key, "row": payload["row"]}) + "\n").encode())
    return payload["row"]
