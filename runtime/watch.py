"""python -m runtime.watch DIR --out results.jsonl|results.csv: classify images as capture software writes them.

A file is taken once its size and modification time have stayed the same for --settle seconds (the writer has
finished). Each result is appended as one line, written with a single write() and fsync'd, so a crash never leaves
half a record. On start the output file is read back and every path already in it is skipped: a restart neither
redoes nor loses work. Bad files get a line with their error and the watch goes on.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from runtime.imageio import IMAGE_SUFFIXES

CSV_FIELDS = ("path", "label", "probability", "fields", "error", "finished_at")


def done_paths(out: Path) -> set[str]:
    """Paths already recorded in the output file (a torn last line from a crash is ignored)."""
    if not out.is_file():
        return set()
    seen = set()
    text = out.read_text(errors="replace")
    if out.suffix == ".csv":
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("path"):
                seen.add(row["path"])
    else:
        for line in text.splitlines():
            try:
                seen.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                continue
    return seen


def record(out: Path, result: dict[str, Any]) -> None:
    """Append one result as one line, atomically with respect to crashes (single O_APPEND write + fsync)."""
    row = {"path": result["path"], "label": result["label"], "probability": result["probability"],
           "fields": len(result["fields"]), "error": result["error"], "finished_at": time.time()}
    if out.suffix == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, CSV_FIELDS)
        if not out.is_file() or out.stat().st_size == 0:
            w.writeheader()
        w.writerow(row)
        line = buf.getvalue()
    else:
        line = json.dumps(result | {"finished_at": row["finished_at"]}) + "\n"
    if out.is_file() and out.stat().st_size:
        with open(out, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line  # a crash left a torn line: start afresh, the fragment is ignored on reading
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class Watcher:
    def __init__(self, folder: Path, out: Path, classifier: Any, settle: float = 1.0) -> None:
        self.folder, self.out, self.clf, self.settle = folder, out, classifier, settle
        self.done = done_paths(out)
        self.seen: dict[str, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, first time seen so)

    def ready(self) -> list[Path]:
        """New images whose size and mtime have not changed for `settle` seconds."""
        now = time.monotonic()
        ready = []
        for p in sorted(self.folder.iterdir()):
            key = str(p)
            if key in self.done or p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            prev = self.seen.get(key)
            if prev is None or prev[:2] != sig:
                self.seen[key] = (*sig, now)
            elif now - prev[2] >= (self.settle if st.st_size else 10 * self.settle):  # empty: wait longer
                ready.append(p)
        return ready

    def poll(self) -> int:
        """Classify what is ready; returns how many results were recorded."""
        ready = self.ready()
        for r in self.clf.classify_iter(ready):
            record(self.out, r.to_dict())
            self.done.add(r.path)
            self.seen.pop(r.path, None)
            status = r.error or f"{r.label} {r.probability:.4f}"
            print(f"{Path(r.path).name}: {status}", file=sys.stderr)
        return len(ready)


def main(argv: list[str] | None = None) -> int:
    from runtime.cli import add_model_options

    ap = argparse.ArgumentParser(prog="python -m runtime.watch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="the folder the microscope camera writes into")
    ap.add_argument("--out", type=Path, required=True, help="results file: .jsonl (full results) or .csv")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between folder scans (default 0.5)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds a file must stay unchanged (default 1)")
    ap.add_argument("--exit-when-idle", type=float, default=None, metavar="S",
                    help="stop after S seconds without new files (for scripts and tests)")
    add_model_options(ap)
    args = ap.parse_args(argv)
    if not args.folder.is_dir():
        ap.error(f"{args.folder}: not a directory")
    if args.out.suffix not in (".jsonl", ".csv"):
        ap.error("--out must end in .jsonl or .csv")
    from runtime.cli import open_classifier
    from runtime.errors import BreakhisError, report

    try:
        clf = open_classifier(args)
    except BreakhisError as e:
        return report(e)
    w = Watcher(args.folder, args.out, clf, args.settle)
    print(f"watching {args.folder} -> {args.out} ({len(w.done)} already done); Ctrl-C to stop", file=sys.stderr)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    last = time.monotonic()
    try:
        while not stop:
            if w.poll() or w.seen:
                last = time.monotonic()
            elif args.exit_when_idle is not None and time.monotonic() - last > args.exit_when_idle:
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    clf.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
