"""The watch folder's loop: a file is taken once its size and modification time have held for ``settle`` seconds,
its bytes read once, hashed and classified from those bytes; a file whose size and mtime match its latest record is
done, one that changes later is classified again (its record names the sha256 it supersedes). With ``slides``,
TIFF-family files go through the slide path (runtime/slides/), their outputs into that folder. Polling, not
inotify: it works the same on network shares. The command is runtime/apps/watch.py."""
from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from runtime.io.formats import SLIDE_SUFFIXES, is_image, is_slide
from runtime.io.inputs import ImageInput
from runtime.watchfolder.records import latest_records, record, same


class Watcher:
    def __init__(self, folder: Path, out: Path, classifier: Any, settle: float = 1.0,
                 slides: Path | None = None) -> None:
        self.folder = Path(os.path.realpath(folder))  # one spelling, however the folder was named
        self.out, self.clf, self.settle, self.slides = out, classifier, settle, slides
        self.latest = latest_records(out)
        self.seen: dict[str, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, first time seen so)
        self.noted: set[str] = set()  # slide files named once as not classified (no --slides)
        self.failed = 0  # records of this run without a verdict (an error, or fields withheld): the exit status
        # a long-running service: the re-checks' FP32 reference opened (and run once) at start, so that the first
        # borderline capture does not wait for it, and one that cannot run stops the start
        classifier.open_recheck()

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
            if not entry.is_file() or (key in self.latest and same(self.latest[key], st.st_size, st.st_mtime_ns)):
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

    def run(self, interval: float, exit_when_idle: float | None, stop: list[int]) -> None:
        """Poll every ``interval`` s until ``stop`` holds something, or, with ``exit_when_idle``, until that many
        seconds passed without a file to classify or settling."""
        last = time.monotonic()
        while not stop:
            if self.poll() or self.seen:
                last = time.monotonic()
            elif exit_when_idle is not None and time.monotonic() - last > exit_when_idle:
                break
            time.sleep(interval)

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
