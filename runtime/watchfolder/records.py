"""The watch folder's records: one line per classified file, appended with a single write() and fsync'd (a crash
never leaves half a record; a torn line is ignored on reading), JSON lines or CSV; names of any bytes kept exactly
(JSONL escapes undecodable bytes as \\udcXX, Python's surrogateescape; CSV holds the file system's bytes); the latest
record of each file read back at start."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

# advice: what the quality check says to do; rechecked: fields re-checked at FP32; warnings: the decoder's and the
# scale's; model: name@sha256 (first 12) and the precision that ran; withheld: fields --qc withhold kept out of the
# verdict. A CSV begun by an older version keeps its own header (its rows go on without the columns it lacks).
CSV_FIELDS = ("path", "label", "probability", "fields", "rechecked", "advice", "error", "size", "mtime_ns", "sha256",
              "supersedes", "finished_at", "warnings", "model", "withheld")
ENCODING = ("utf-8", "surrogateescape")  # file names are bytes: undecodable ones round-trip exactly


def latest_records(out: Path) -> dict[str, dict[str, Any]]:
    """path -> its latest record in the output file (a torn last line from a crash is ignored)."""
    if not out.is_file():
        return {}
    text = out.read_bytes().decode(*ENCODING)
    rows: list[Any] = list(csv.DictReader(io.StringIO(text))) if out.suffix == ".csv" else []
    if out.suffix != ".csv":
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    # a complete record has finished_at (a torn CSV line parses, short of its last fields)
    return {r["path"]: r for r in rows if isinstance(r, dict) and r.get("path") and r.get("finished_at")}


def _header(out: Path) -> list[str]:
    """The columns of an existing CSV (its first line)."""
    with open(out, newline="", encoding=ENCODING[0], errors=ENCODING[1]) as f:
        return next(csv.reader(f), None) or list(CSV_FIELDS)


def record(out: Path, result: dict[str, Any]) -> None:
    """Append one result as one line, atomically with respect to crashes (single O_APPEND write + fsync)."""
    if out.suffix == ".csv":
        buf = io.StringIO()
        fresh = not out.is_file() or out.stat().st_size == 0
        w = csv.DictWriter(buf, CSV_FIELDS if fresh else _header(out), extrasaction="ignore")
        if fresh:
            w.writeheader()
        model = result.get("model") or {}
        w.writerow(result | {"fields": len(result["fields"]), "advice": "; ".join(result.get("advice") or []),
                             "warnings": "; ".join(result.get("warnings") or []),
                             "model": f"{model.get('name')}@{str(model.get('sha256'))[:12]} {model.get('precision')}"
                             if model else ""})
        line = buf.getvalue()
    else:
        line = json.dumps(result) + "\n"  # ensure_ascii: undecodable name bytes become \\udcXX escapes
    if out.is_file() and out.stat().st_size:
        with open(out, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line  # a crash left a torn line: start afresh, the fragment is ignored on reading
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode(*ENCODING))
        os.fsync(fd)
    finally:
        os.close(fd)


def same(rec: dict[str, Any], size: int, mtime_ns: int) -> bool:
    """Whether a record describes the file as it is now (records without an identity count as done)."""
    if rec.get("size") in (None, ""):
        return True
    return int(rec["size"]) == size and int(rec["mtime_ns"]) == mtime_ns
