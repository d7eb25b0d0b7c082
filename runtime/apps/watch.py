"""python -m runtime.watch DIR --out results.jsonl|results.csv: classify images as capture software writes them.

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
import csv
import hashlib
import io
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from runtime.io.formats import SLIDE_SUFFIXES, is_image, is_slide
from runtime.io.inputs import ImageInput

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


def _same(rec: dict[str, Any], size: int, mtime_ns: int) -> bool:
    """Whether a record describes the file as it is now (records without an identity count as done)."""
    if rec.get("size") in (None, ""):
        return True
    return int(rec["size"]) == size and int(rec["mtime_ns"]) == mtime_ns


class Watcher:
    def __init__(self, folder: Path, out: Path, classifier: Any, settle: float = 1.0,
                 slides: Path | None = None) -> None:
        self.folder = Path(os.path.realpath(folder))  # one spelling, however the folder was named
        self.out, self.clf, self.settle, self.slides = out, classifier, settle, slides
        self.latest = latest_records(out)
        self.seen: dict[str, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, first time seen so)
        self.noted: set[str] = set()  # slide files named once as not classified (no --slides)
        self.failed = 0  # records of this run without a verdict (an error, or fields withheld): the exit status

    def accepts(self, name: str) -> bool:
        """Images; slide formats too with --slides (without it, each one is named once on stderr, not waited for,
        and nothing is recorded that would keep a later run with --slides from classifying it)."""
        if name.startswith(".") or not (is_image(name) or is_slide(name)):
            return False
        if is_image(name) or self.slides is not None:
            return True
        if name not in self.noted:
            self.noted.add(name)
            print(f"note: {name!r}: a slide format ({', '.join(SLIDE_SUFFIXES)}): not classified; start the watch "
                  "with --slides DIR to classify slides", file=sys.stderr)
        return False

    def ready(self) -> list[str]:
        """Inputs, new or changed since their latest record, whose size and mtime have held for `settle` s. Files
        that went away stop being waited for, so ``seen`` holds only files still settling."""
        now = time.monotonic()
        ready, present = [], set()
        for entry in sorted(os.scandir(self.folder), key=lambda e: e.name):
            if not self.accepts(entry.name):
                continue
            key = str(self.folder / entry.name)
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if not entry.is_file() or (key in self.latest and _same(self.latest[key], st.st_size, st.st_mtime_ns)):
                continue
            present.add(key)
            sig = (st.st_size, st.st_mtime_ns)
            prev = self.seen.get(key)
            if prev is None or prev[:2] != sig:
                self.seen[key] = (*sig, now)
            elif now - prev[2] >= (self.settle if st.st_size else 10 * self.settle):  # empty: wait longer
                ready.append(key)
        for gone in self.seen.keys() - present:  # vanished, or recorded meanwhile
            del self.seen[gone]
        return ready

    def poll(self) -> int:
        """Classify what is ready, reading each file's bytes once (lazily: memory stays bounded); returns how
        many records were written. With ``slides``, TIFF-family files go through the slide path instead."""
        idents: deque[dict[str, Any]] = deque()
        ready = self.ready()
        n = 0
        if self.slides is not None:
            for key in [k for k in ready if is_slide(k)]:
                ready.remove(key)
                self._write(self._slide(key))
                n += 1

        def inputs() -> Iterator[ImageInput]:
            for key in ready:
                try:
                    with open(key, "rb") as f:
                        st, data = os.fstat(f.fileno()), f.read()
                except OSError as e:
                    idents.append({})
                    yield ImageInput(key, error=f"{key}: cannot read ({e.strerror or e})")
                    continue
                sha = hashlib.sha256(data).hexdigest()
                prev = self.latest.get(key)
                if prev is not None and prev.get("sha256") == sha:  # touched, not changed: nothing to redo
                    self.latest[key] = prev | {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
                    self.seen.pop(key, None)
                    continue
                idents.append({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha,
                               "supersedes": prev.get("sha256") if prev else None})
                yield ImageInput(key, data=data)

        for r in self.clf.classify_iter(inputs()):
            self._write(r.to_dict() | idents.popleft())
            n += 1
        return n

    def _write(self, rec: dict[str, Any]) -> None:
        rec["finished_at"] = time.time()
        record(self.out, rec)
        self.failed += rec["error"] is not None
        self.latest[rec["path"]] = rec
        self.seen.pop(rec["path"], None)
        status = rec["error"] or (f"{rec['label']} {rec['probability']:.4f}" if rec["probability"] is not None
                                  else "no tissue field to classify")
        if rec.get("advice"):
            status += f" (QUALITY: {'; '.join(rec['advice'])})"
        print(f"{os.path.basename(rec['path'])!r}: {status}", file=sys.stderr)

    def _slide(self, key: str) -> dict[str, Any]:
        """A slide: hashed while streamed (never whole in memory), classified lazily from the file; its GeoJSON,
        CSV, overlay and JSON written to the slides folder; the record holds the region verdict and its rule."""
        from runtime.errors import BreakhisError
        from runtime.model.manifest import sha256_file
        from runtime.slides.classify import classify_slide
        from runtime.slides.files import output_stem

        assert self.slides is not None
        rec: dict[str, Any] = {"path": key, "label": None, "probability": None, "fields": [], "error": None}
        try:
            st, sha = os.stat(key), sha256_file(Path(key))
        except OSError as e:
            return rec | {"error": f"{key}: cannot read ({e.strerror or e})"}
        prev = self.latest.get(key)
        rec |= {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha,
                "supersedes": prev.get("sha256") if prev else None}
        stem = output_stem(self.slides, key, sha)  # a reused name never overwrites an earlier capture's results
        try:
            res = classify_slide(self.clf, Path(key), overlay=Path(f"{stem}.overlay.png"))
        except BreakhisError as e:
            return rec | {"error": str(e)}
        res.sha256 = sha
        res.save(stem)
        return rec | {"label": res.aggregate["label"], "probability": res.aggregate["value"],
                      "model": res.model.to_dict() if res.model else {},
                      "error": res.aggregate["note"] if res.left_out else
                      f"{res.counts['errors']} fields could not be read" if res.counts["errors"] else None,
                      "fields": [asdict(f) for f in res.fields if f.status in ("classified", "withheld")],
                      "rechecked": res.counts["rechecked"],
                      "warnings": res.warnings, "slide": {"aggregate": res.aggregate, "counts": res.counts,
                                                          "outputs": f"{stem}.*"}}


def main(argv: list[str] | None = None) -> int:
    from runtime.apps.options import add_model_options

    ap = argparse.ArgumentParser(prog="python -m runtime.watch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="the folder the microscope camera writes into")
    ap.add_argument("--out", type=Path, required=True, help="results file: .jsonl (full results) or .csv")
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
        ap.error("--out must end in .jsonl or .csv")
    from runtime.apps.options import open_classifier
    from runtime.errors import BreakhisError, report

    try:
        clf = open_classifier(args)
    except BreakhisError as e:
        return report(e)
    w = Watcher(args.folder, args.out, clf, args.settle, args.slides)
    print(f"watching {w.folder} -> {args.out} ({len(w.latest)} already done); Ctrl-C to stop", file=sys.stderr)
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
    return 1 if w.failed else 0  # as every command: 1 where an input got no verdict
