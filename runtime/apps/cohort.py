"""python -m runtime.cohort INPUTS... --out DIR: a cohort of slides, mosaics and large images through the slide
path, in one process or on a Ray cluster, resumable, with one table of every slide.

Each slide's outputs land in DIR/slides/ under NAME.<sha256[:12]> (GeoJSON for QuPath, CSV, overlay PNG, JSON, a
probability map as OME-TIFF); DIR/cohort.csv (and cohort.parquet where pyarrow is installed) has a row per slide, and
DIR/run.json the run's versions, model, options, hosts and times. A slide whose file (by sha256) already has a
complete result for the same model, variant and options is skipped; every file is written under a temporary name and
renamed, and a slide's record last, so an interrupted run (even kill -9) never leaves a half result taken as done.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import platform
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runtime.apps.slide import field_bar
from runtime.errors import BreakhisError
from runtime.io.inputs import expand_inputs
from runtime.io.scale import Scale
from runtime.io.slide_source import slide_identity
from runtime.model.model_dir import ModelDir
from runtime.model.paths import default_model_dir
from runtime.pipeline.quality import MIN_TISSUE
from runtime.slides.aggregate import AGGREGATES
from runtime.slides.bands import field_rows, merge_bands, merge_overlays
from runtime.slides.classify import classify_slide
from runtime.slides.files import output_stem, write_atomic

COLUMNS = ("path", "size_bytes", "sha256", "magnification", "mpp", "scale_source", "verdict", "probability", "rule",
           "fields", "classified", "background", "errors", "rechecked", "flagged", "withheld", "seconds", "status",
           "error", "warnings", "model", "resumed", "outputs")
RECORD = ".result.json"  # a slide's record: written last, so its presence means the slide's outputs are whole
MAX_ATTEMPTS = 3  # a slide whose worker died this often is recorded as an error


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


def classify_part(clf: Any, unit: Unit, options: dict[str, Any],
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """One slide, or one band of its field rows: {"result": SlideResult or None, "error", "overlay" (PNG bytes),
    "threshold", "labels", "seconds"}. A slide that cannot be read gives its error, never an exception: the other
    slides go on."""
    t0 = time.perf_counter()
    scale = _scale(options)
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
            "error": "; ".join(([a["note"]] if res.withheld_verdict else []) + (res.warnings if n["errors"] else []))
            or None,
            # withheld: no verdict, the quality check withheld fields and the counted ones are not Malignant
            "status": "withheld" if res.withheld_verdict else "classified with errors" if n["errors"] else "classified"}
    files = res.outputs() | {".overlay.png": overlay}
    if options.get("geojson_gz"):
        files[".geojson.gz"] = gzip.compress(files[".geojson"], mtime=0)
    return {"row": row, "files": files}


class SlideWorker:
    """What a Ray actor holds: one Classifier, the model loaded once for every slide the actor is given."""

    def __init__(self, classifier_kw: dict[str, Any]) -> None:
        from runtime.pipeline.classifier import Classifier

        self.clf = Classifier(**classifier_kw)

    def classify(self, unit: Unit, options: dict[str, Any]) -> dict[str, Any]:
        return classify_part(self.clf, unit, options)

    def model_info(self) -> dict[str, Any]:
        return self.clf.model_info.to_dict() | {"host": socket.gethostname()}


def run_local(clf: Any, units: list[Unit], options: dict[str, Any],
              field_progress: bool) -> Iterator[tuple[Unit, dict[str, Any]]]:
    """Slides one after another in this process."""
    for unit in units:
        bar = field_bar(Path(unit.path), position=1) if field_progress else None
        part = classify_part(clf, unit, options, bar)
        if bar is not None:
            bar(-1, -1)
        yield unit, part


class RayPool:
    """Long-lived Ray actors (one per GPU, else one per ``cpus_per_actor`` cores), each holding one Classifier.
    Work units are slides; a unit whose actor dies goes to another (a new actor takes the dead one's place), and
    after MAX_ATTEMPTS it is recorded as an error. Results come back to this process, which alone writes them."""

    def __init__(self, classifier_kw: dict[str, Any], address: str, actors: int | None, cpus_per_actor: int) -> None:
        ray = self.ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        n = actors or (gpus if gpus else max(1, int(resources.get("CPU", 1)) // cpus_per_actor))
        self.worker = ray.remote(num_cpus=cpus_per_actor, num_gpus=1 if gpus else 0)(SlideWorker)
        self.kw = classifier_kw | {"threads": classifier_kw.get("threads") or cpus_per_actor}
        self.started = 0
        self.idle = [self._start() for _ in range(n)]
        infos = ray.get([w.model_info.remote() for w in self.idle])  # each actor's model, loaded once
        self.model = {k: v for k, v in infos[0].items() if k != "host"}
        self.info: dict[str, Any] = {"address": address, "actors": n, "cpus_per_actor": cpus_per_actor, "gpus": gpus,
                     "hosts": sorted({i["host"] for i in infos}), "worker_restarts": 0}

    def _start(self) -> Any:
        self.started += 1
        return self.worker.options(name=f"breakhis-cohort-{os.getpid()}-{self.started}").remote(self.kw)

    def run(self, units: list[Unit], options: dict[str, Any]) -> Iterator[tuple[Unit, dict[str, Any]]]:
        ray = self.ray
        queue, attempts = deque(units), {(u.stem, u.part): 0 for u in units}
        pending: dict[Any, tuple[Unit, Any]] = {}  # Ray object ref -> (its slide, the actor working on it)
        while queue or pending:
            while queue and self.idle:
                w, u = self.idle.pop(), queue.popleft()
                attempts[u.stem, u.part] += 1
                pending[w.classify.remote(u, options)] = (u, w)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            u, w = pending.pop(ref)
            try:
                payload = ray.get(ref)
                self.idle.append(w)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                self.info["worker_restarts"] += 1
                self.idle.append(self._start())
                if attempts[u.stem, u.part] < MAX_ATTEMPTS:
                    queue.appendleft(u)
                    continue
                payload = {"result": None, "overlay": b"", "seconds": 0.0,
                           "error": f"its worker died {MAX_ATTEMPTS} times ({type(e).__name__})"}
            yield u, payload

    def close(self) -> None:
        for w in self.idle:
            self.ray.kill(w)
        self.idle = []


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise CohortError("--ray needs Ray: pip install -e '.[cluster]' (or pip install 'ray>=2.40'); without "
                          "--ray the cohort runs in this process") from None
    return ray


def write_unit(unit: Unit, payload: dict[str, Any], key: str) -> dict[str, Any]:
    """The slide's outputs, then its record (last: a record means every output beside it is whole)."""
    for suffix, data in payload["files"].items():
        write_atomic(Path(f"{unit.stem}{suffix}"), data)
    write_atomic(Path(f"{unit.stem}{RECORD}"), (json.dumps({"key": key, "row": payload["row"]}) + "\n").encode())
    return payload["row"]


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
    scale = _scale(options)
    for u in units:
        try:
            n = field_rows(u.path, contract, scale, options["max_pixels"])
        except BreakhisError:
            n = 0
        starts = list(range(0, n, band_rows)) or [0]
        out += [replace(u, rows=(r, r + band_rows) if n else None, part=i, parts=len(starts))
                for i, r in enumerate(starts)]
    return out


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


EPILOG = """examples:
  python -m runtime.cohort slides/ --out cohort-2026-12/                 # every slide under slides/, here
  python -m runtime.cohort list.csv --out results/ --retry-errors        # a list of paths; failed ones again
  python -m runtime.cohort /data/slides --out /data/out --ray local      # a Ray cluster on this machine
  python -m runtime.cohort /shared/slides --out /shared/out --ray auto   # the Ray cluster this node is part of
"""


def main(argv: list[str] | None = None) -> int:
    from runtime.apps.options import add_model_options, classifier_options, open_classifier
    from runtime.errors import report

    ap = argparse.ArgumentParser(prog="python -m runtime.cohort", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="slides, images, folders (searched recursively), globs, or .csv/.txt "
                                              "lists of paths")
    ap.add_argument("--out", type=Path, required=True, help="folder for cohort.csv, run.json and slides/")
    ap.add_argument("--aggregate", choices=AGGREGATES, default="max", help="each slide's verdict rule (default max)")
    ap.add_argument("--top-k", type=int, default=3, help="fields averaged by --aggregate topk (default: 3)")
    ap.add_argument("--magnification", type=float, default=None, help="every input's magnification, overriding "
                                                                       "what the files state")
    ap.add_argument("--mpp", type=float, default=None, help="every input's microns per pixel, overriding the files")
    ap.add_argument("--no-tissue-mask", action="store_true", help="classify every field, background too")
    ap.add_argument("--min-tissue", type=float, default=MIN_TISSUE,
                    help=f"tissue fraction a field needs to be classified (default: {MIN_TISSUE})")
    ap.add_argument("--retry-errors", action="store_true", help="classify again the slides that failed before")
    ap.add_argument("--ray", metavar="local|auto|ADDRESS", default=None,
                    help="run on Ray: local (a cluster on this machine), auto (the cluster this node belongs to) or "
                         "a cluster's address (ray://HOST:10001 or HOST:6379); needs the cluster extra")
    ap.add_argument("--actors", type=int, default=None,
                    help="Ray actors, each holding the model once (default: one per GPU, else one per "
                         "--cpus-per-actor cores)")
    ap.add_argument("--cpus-per-actor", type=int, default=2, help="cores each CPU actor uses (default: 2)")
    ap.add_argument("--geojson-gz", action="store_true", help="also write each slide's GeoJSON gzipped (.geojson.gz)")
    ap.add_argument("--band-rows", type=int, default=0, metavar="N",
                    help="split each slide into bands of N field rows, classified as separate units (so one large "
                         "slide uses several Ray actors; the results are the same); default 0: whole slides")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_model_options(ap, max_pixels=100_000_000, max_pixels_why="tiled slides are read tile by tile whatever their size; this bounds images without tiles, decoded whole")
    args = ap.parse_args(argv)
    if args.top_k < 1 or not 0 <= args.min_tissue <= 1 or (args.actors is not None and args.actors < 1) \
            or args.cpus_per_actor < 1 or args.band_rows < 0:
        ap.error("--top-k, --actors and --cpus-per-actor must be at least 1, --min-tissue between 0 and 1")
    options = {"aggregate": args.aggregate, "top_k": args.top_k, "magnification": args.magnification,
               "mpp": args.mpp, "tissue_mask": not args.no_tissue_mask, "min_tissue": args.min_tissue,
               "max_pixels": args.max_pixels, "geojson_gz": args.geojson_gz, "qc": args.qc}
    classifier_kw = classifier_options(args)
    started = time.time()
    pool: RayPool | None = None
    clf = None
    try:
        if args.ray:  # the model as the actors run it: its identity keys the results
            pool = RayPool(classifier_kw, args.ray, args.actors, args.cpus_per_actor)
            model, info = pool.model, {"hosts": pool.info["hosts"], "ray": pool.info}
        else:
            clf = open_classifier(args)
            model, info = clf.model_info.to_dict(), {"hosts": [socket.gethostname()]}
        notes: list[str] = []
        paths = cohort_inputs(args.inputs, notes)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        if not paths:
            raise CohortError("no inputs to classify")
        slides = args.out / "slides"
        slides.mkdir(parents=True, exist_ok=True)
        for tmp in slides.glob(".*.tmp"):  # what an interrupted run was writing (never a result): gone when stale
            if time.time() - tmp.stat().st_mtime > 600:
                tmp.unlink(missing_ok=True)
        key = run_key(model, options)
        todo, rows = plan_units(paths, slides, key, args.retry_errors)
        slides_todo = len(todo)
        if args.band_rows:
            contract = clf.contract if clf is not None else \
                ModelDir.open(args.model or default_model_dir()).contract
            todo = split_bands(todo, args.band_rows, contract, options)
        resumed = sum(bool(r.get("resumed")) for r in rows)
        print(f"{len(paths)} inputs: {slides_todo} to classify ({len(todo)} units), {resumed} done before (same "
              f"file, model and options), {len(rows) - resumed} unreadable", file=sys.stderr)
        stream = pool.run(todo, options) if pool else run_local(clf, todo, options, not args.no_progress)
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=slides_todo, unit="slide", file=sys.stderr, position=0)
        parts: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for unit, part in stream:  # a slide is written once every band of it is in
            parts.setdefault(unit.stem, []).append((unit.part, part))
            if len(parts[unit.stem]) == unit.parts:
                done = [p for _, p in sorted(parts.pop(unit.stem), key=lambda t: t[0])]
                rows.append(write_unit(unit, finish_slide(unit, done, options), key))
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    except BreakhisError as e:
        return report(e)
    finally:
        if clf is not None:
            clf.close()
        if pool is not None:
            pool.close()
    order = {str(p): i for i, (p, _) in enumerate(paths)}
    rows.sort(key=lambda r: order.get(r["path"], len(order)))
    tables = write_table(args.out, rows)
    run = {"started": _iso(started), "finished": _iso(time.time()), "versions": versions(), "model": model,
           "options": options, "band_rows": args.band_rows, "key": key, "inputs": len(paths),
           "classified": slides_todo,
           "resumed": sum(bool(r.get("resumed")) for r in rows),
           "errors": sum(r.get("status") == "error" for r in rows),
           "withheld": sum(r.get("status") == "withheld" for r in rows), "tables": tables, "argv": sys.argv[1:]} | info
    write_atomic(args.out / "run.json", (json.dumps(run, indent=1) + "\n").encode())
    print(f"{len(rows)} slides: {run['classified']} classified now, {run['resumed']} skipped (done before), "
          f"{run['errors']} errors, {run['withheld']} without a verdict (fields withheld by the quality check); "
          f"{args.out / 'cohort.csv'}", file=sys.stderr)
    return 1 if run["errors"] or run["withheld"] else 0


def _scale(options: dict[str, Any]) -> Scale | None:
    """The scale --magnification / --mpp state for every input; None: what each file says."""
    return Scale(options["magnification"], options["mpp"], "flag") if options["magnification"] or options["mpp"] \
        else None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
