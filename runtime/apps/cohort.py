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
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from runtime.apps.slide import field_bar
from runtime.cohorts.pools import RayPool, run_local
from runtime.cohorts.table import versions, write_table
from runtime.cohorts.units import CohortError, cohort_inputs, plan_units, run_key, split_bands
from runtime.cohorts.work import finish_slide, write_unit
from runtime.errors import BreakhisError
from runtime.model.model_dir import ModelDir
from runtime.model.paths import default_model_dir
from runtime.pipeline.quality import MIN_TISSUE
from runtime.slides.aggregate import AGGREGATES
from runtime.slides.files import write_atomic

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
    add_model_options(ap, max_pixels=100_000_000, max_pixels_why="tiled slides are read tile by tile "
                      "whatever their size; this bounds images without tiles, decoded whole")
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
        stream = pool.run(todo, options) if pool else run_local(clf, todo, options, None if args.no_progress else lambda p: field_bar(p, position=1))
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
           "no_verdict": sum(r.get("status") == "no verdict" for r in rows), "tables": tables,
           "argv": sys.argv[1:]} | info
    write_atomic(args.out / "run.json", (json.dumps(run, indent=1) + "\n").encode())
    print(f"{len(rows)} slides: {run['classified']} classified now, {run['resumed']} skipped (done before), "
          f"{run['errors']} errors, {run['no_verdict']} without a verdict (fields withheld or unread); "
          f"{args.out / 'cohort.csv'}", file=sys.stderr)
    return 1 if run["errors"] or run["no_verdict"] else 0


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
