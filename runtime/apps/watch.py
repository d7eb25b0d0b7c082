"""python -m runtime.watch DIR --results results.jsonl|results.csv: classify images as capture software writes them.

A file is taken once its size and modification time have stayed the same for --settle seconds. Its bytes are read
once, hashed, and classified from those bytes. Every record carries what was classified: the canonical path (the
folder resolved, however it was spelled), size, mtime_ns and sha256. On start the output is read back, and a file
whose size and mtime match its latest record is done. A file that changes afterwards (a writer that paused longer
than --settle and then finished, a name reused for a new capture) is classified again; its new record names the
sha256 it supersedes. Each record is one line, written with a single write() and fsync'd, so a crash never leaves
half a record. Names of any bytes are kept exactly: JSONL escapes undecodable bytes (\\udcXX, Python's
surrogateescape), CSV holds the file system's bytes as they are. Bad files get a record with their error.
(Polling, not inotify: it works the same on network shares, where change events are not delivered.)
With --slides DIR, TIFF-family files (slides, mosaics, large regions) are read lazily through the slide path
instead (runtime/slides/) and their GeoJSON, CSV, overlay and JSON land in DIR.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from runtime.watchfolder.watcher import Watcher


def main(argv: list[str] | None = None) -> int:
    from runtime.apps.options import add_model_options

    ap = argparse.ArgumentParser(prog="python -m runtime.watch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="the folder the microscope camera writes into")
    ap.add_argument("--results", "--out", dest="out", type=Path, required=True,
                    help="results FILE: .jsonl (full results) or .csv (--out, the older name, still works; in "
                         "runtime.slide and runtime.cohort --out is a folder, since they write several files)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between folder scans (default 0.5)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds a file must stay unchanged (default 1)")
    ap.add_argument("--exit-when-idle", type=float, default=None, metavar="S",
                    help="stop after S seconds without new files (for scripts and tests)")
    ap.add_argument("--slides", type=Path, default=None, metavar="DIR",
                    help="classify TIFF-family files (slides, mosaics, large regions) through the slide path, read "
                         "lazily, writing their GeoJSON, CSV, overlay and JSON into DIR; the record holds the region "
                         "verdict (rule: max)")
    add_model_options(ap)
    args = ap.parse_args(argv)
    if args.slides is not None:
        args.slides.mkdir(parents=True, exist_ok=True)
    if not args.folder.is_dir():
        ap.error(f"{args.folder}: not a directory")
    if args.out.suffix not in (".jsonl", ".csv"):
        ap.error("--results must end in .jsonl or .csv")
    from runtime.apps.options import open_classifier
    from runtime.errors import BreakhisError, report

    try:
        clf = open_classifier(args)
        w = Watcher(args.folder, args.out, clf, args.settle, args.slides)  # opens the re-checks' reference
    except BreakhisError as e:
        return report(e)
    print(f"watching {w.folder} -> {args.out} ({len(w.latest)} already done); Ctrl-C to stop", file=sys.stderr)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        w.run(args.interval, args.exit_when_idle, stop)
    except KeyboardInterrupt:
        pass
    clf.close()
    return 1 if w.failed else 0  # as every command: 1 where an input got no verdict
