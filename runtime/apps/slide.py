"""Slides, stage mosaics and large regions: fields tiled at the model's scale, background skipped, every field's
probability with its level-0 coordinates, a named region verdict, and GeoJSON (QuPath), CSV and an overlay image.

Memory: a tiled TIFF is read tile by tile; what is held at once is the thumbnail (<= 1024 px side, made block by block),
one chunk of field crops (CHUNK x 0.9 MB) and the classifier's batch, whatever the slide's size. PNG/JPEG and other
formats without tiles are decoded whole, within --max-pixels.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.errors import BreakhisError
from runtime.io.scale import Scale
from runtime.io.slide_source import slide_identity
from runtime.pipeline.quality import MIN_TISSUE
from runtime.slides.aggregate import AGGREGATES
from runtime.slides.classify import classify_slide
from runtime.slides.files import output_stem
from runtime.slides.result import SlideResult

EPILOG = """examples:
  python -m runtime.slide mosaic.ome.tif --out results/        # GeoJSON, CSV, overlay PNG and JSON per input
  python -m runtime.slide region.png --magnification 100 --aggregate topk --top-k 5
  python -m runtime.slide slide.svs --no-tissue-mask --json    # every field, JSON on stdout
"""


def main(argv: list[str] | None = None) -> int:
    from runtime.apps.options import add_model_options, open_classifier
    from runtime.errors import report

    ap = argparse.ArgumentParser(prog="python -m runtime.slide", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path,
                    help="slides, mosaics or large images (TIFF family read lazily), or DICOM slides (the folder of "
                         "a slide's instances)")
    ap.add_argument("--out", type=Path, default=Path("slide-results"),
                    help="folder for STEM.geojson, STEM.csv, STEM.overlay.png and STEM.json, STEM being the file's "
                         "name and the start of its sha256 (default: slide-results)")
    ap.add_argument("--aggregate", choices=AGGREGATES, default="max",
                    help="the region verdict's rule (default: max, the screening rule); named in every output")
    ap.add_argument("--top-k", type=int, default=3, help="fields averaged by --aggregate topk (default: 3)")
    ap.add_argument("--magnification", type=float, default=None,
                    help="the input's objective magnification, overriding what the file states (e.g. 200)")
    ap.add_argument("--mpp", type=float, default=None,
                    help="the input's microns per pixel at level 0, overriding what the file states")
    ap.add_argument("--no-tissue-mask", action="store_true", help="classify every field, background too")
    ap.add_argument("--min-tissue", type=float, default=MIN_TISSUE,
                    help=f"fraction of a field that must be tissue for it to be classified (default: {MIN_TISSUE})")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the results as a JSON list instead of a table")
    fmt.add_argument("--jsonl", action="store_true",
                     help="print one JSON object per line, as each slide is done (as runtime.classify --jsonl)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_model_options(ap, max_pixels=100_000_000, max_pixels_why="tiled slides are read tile by tile "
                      "whatever their size; this bounds images without tiles, decoded whole")
    args = ap.parse_args(argv)
    if args.top_k < 1 or not 0 <= args.min_tissue <= 1:
        ap.error("--top-k must be at least 1 and --min-tissue between 0 and 1")
    scale = Scale(args.magnification, args.mpp, "flag") if args.magnification or args.mpp else None
    try:
        clf = open_classifier(args)
    except BreakhisError as e:
        return report(e)
    args.out.mkdir(parents=True, exist_ok=True)
    results, failed = [], 0
    with clf:
        for path in args.inputs:
            bar = None if args.no_progress else field_bar(path)
            try:
                _, sha = slide_identity(path)  # a file, or a DICOM slide's folder
            except OSError as e:
                print(f"error: {path}: cannot read ({e.strerror or e})", file=sys.stderr)
                failed += 1
                continue
            stem = output_stem(args.out, path.name, sha)
            try:
                res = classify_slide(clf, path, args.aggregate, args.top_k, scale, not args.no_tissue_mask,
                                     args.min_tissue, args.max_pixels, Path(f"{stem}.overlay.png"), progress=bar)
            except BreakhisError as e:
                print(f"error: {e}", file=sys.stderr)
                failed += 1
                continue
            finally:
                if bar:
                    bar(-1, -1)
            res.sha256 = sha
            res.save(stem)
            if args.jsonl:
                print(json.dumps(res.to_dict()), flush=True)
            failed += res.counts["errors"] > 0 or res.left_out  # no verdict: like an error, exit 1
            if not args.jsonl:  # streamed: nothing held
                results.append(res)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    elif not args.jsonl:
        for r in results:  # names of any bytes stay printable
            print(_summary(r, args.out).encode("utf-8", "backslashreplace").decode())
    return 1 if failed else 0


def _summary(r: SlideResult, out: Path) -> str:
    a, n, s = r.aggregate, r.counts, r.scale
    verdict = f"{a['label']} ({a['rule']} = {a['value']:.4f})" if a["value"] is not None else a["note"]
    model = f"{s['model_magnification']:g}X" if s["model_magnification"] else "the model's"
    given = f"{s['magnification']:g}X" if s["magnification"] else "?"
    lines = [f"{r.path}: {verdict}",
             f"  {n['fields']} fields at {model} scale (input {given} from {s['source']}, factor {s['factor']:.3g}, "
             f"level {s['level']}): "
             f"{n['classified']} classified, {n['background']} background, {n['errors']} errors, "
             f"{n['flagged']} flagged and {n['withheld']} withheld by the quality check; "
             f"{r.timings_ms['total'] / 1e3:.1f} s",
             f"  wrote {output_stem(out, r.path, r.sha256 or '')}.geojson / .csv / .overlay.png / .json / "
             ".probability.ome.tif"]
    lines += [f"  WARNING: {w}" for w in r.warnings]
    if r.model and r.model.warning:
        lines.append(f"  WARNING: {r.model.warning}")
    return "\n".join(lines)


def field_bar(path: Path, position: int = 0) -> Callable[[int, int], None]:
    """A tqdm bar on stderr over a slide's fields, fed (done, total); (-1, -1) closes it."""
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if done < 0:
            if "bar" in state:
                state["bar"].close()
            return
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=path.name[-30:], unit="field", file=sys.stderr, position=position,
                                leave=position == 0)
        state["bar"].update(done - state["bar"].n)

    return update
