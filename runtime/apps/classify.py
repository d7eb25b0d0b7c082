"""python -m runtime.classify: Benign / Malignant for 100X H&E images (files, folders, globs).

Exit status: 0 every input classified, 1 some inputs failed (the others are still reported),
2 usage error, unusable model or unavailable backend.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.io.decode import DEFAULT_MAX_PIXELS
from runtime.pipeline.results import ModelInfo

EPILOG = f"""examples:
  python -m runtime.classify slide.png
  python -m runtime.classify ../shared/data/breakhis-100x --batch-size 8
  python -m runtime.classify 'captures/*.png' --json > results.json
  python -m runtime.classify /data/run42 --recursive --jsonl > results.jsonl      # one line per image, as done
  python -m runtime.classify img.tif --model models/breakhis-v1 --backend cpu --threads 2
  python -m runtime.classify img.png --backend tensorrt --precision fp16 --build-engine   # Jetson / GPU
  python -m runtime.classify --camera 0 --rate 2 --out-video session.mp4
  python -m runtime.classify --video capture.avi --out-video annotated.avi

Large images are tiled into non-overlapping fields (2x3 patches of 224 px each for the shipped contract);
every field is classified and the image is Malignant if any field is (screening rule).
Images above --max-pixels (default {DEFAULT_MAX_PIXELS:,}) are refused before decoding.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from runtime.apps.options import add_model_options

    ap = argparse.ArgumentParser(prog="python -m runtime.classify", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", metavar="PATH", help="image files, folders of images, or glob patterns")
    src = ap.add_argument_group("camera / video (instead of PATHs)")
    src.add_argument("--camera", type=int, default=None, metavar="N", help="classify frames of camera N")
    src.add_argument("--video", type=Path, default=None, help="classify frames of a video file")
    src.add_argument("--rate", type=float, default=2.0, help="classifications per second (default 2)")
    src.add_argument("--out-video", type=Path, default=None, help="write the annotated stream (.mp4 or .avi)")
    src.add_argument("--show", action="store_true", help="show the annotated stream in a window")
    src.add_argument("--max-frames", type=int, default=None, help="stop after N frames")
    add_model_options(ap)
    ap.add_argument("--recursive", action="store_true", help="read sub-folders of folders too")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list (one object per input) instead of a table")
    fmt.add_argument("--jsonl", action="store_true",
                     help="print one JSON object per line, as each input is done (for long runs and pipes)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="say on stderr how the backend and precision were chosen, and what is re-checked at FP32")
    args = ap.parse_args(argv)
    streams = (args.camera is not None) + (args.video is not None)
    if streams > 1 or (streams and args.inputs) or not (streams or args.inputs):
        ap.error("give image PATHs, or one of --camera / --video")
    if args.rate <= 0:
        ap.error("--rate must be positive")
    return args


def table(results: list, model: ModelInfo) -> str:
    """A short, fixed-width table for people (stdout): the model, a row per image, a summary, the model's standing.
    Why an image has no verdict goes to stderr (``problems``)."""
    lines = [f"model: {model.name} ({'trained' if model.trained else 'UNTRAINED'}; backend {model.backend}, precision "
             f"{model.precision}, preprocessing on {model.preprocess.upper()})"]
    if model.warning:
        lines.append(f"WARNING: {model.warning}")
    lines.append(f"{'image':40s} {'verdict':10s} {'p(malig)':>8s} {'fields':>6s} {'ms':>8s}")
    for r in results:
        name = Path(r.path).name.encode("utf-8", "backslashreplace").decode()[-40:]  # any bytes, printable
        if r.error:
            lines.append(f"{name:40s} {'NO VERDICT' if r.withheld else 'ERROR':10s} (why: on stderr)")
            lines += [f"{'':40s}   QUALITY: {a}" for a in r.advice]
        else:
            lines.append(f"{name:40s} {r.label:10s} {r.probability:8.4f} {len(r.fields):6d} "
                         f"{r.timings_ms['total']:8.1f}")
            if r.rechecked:
                lines.append(f"{'':40s}   re-checked at fp32: " + ", ".join(
                    f"field {i + 1} {f.fast_probability:.4f} -> {f.probability:.4f}"
                    for i, f in enumerate(r.fields) if f.rechecked))
            lines += [f"{'':40s}   QUALITY: {a}" for a in r.advice]
            if r.withheld:
                lines.append(f"{'':40s}   withheld: {r.withheld} of {len(r.fields)} fields, kept out of the verdict")
            lines += [f"{'':40s}   note: {c}" for c in r.conversions]
            lines += [f"{'':40s}   WARNING: {w}" for w in r.warnings]
    lines.append(summary(results, bool(model.recheck)))
    lines.append(model.standing)
    return "\n".join(lines).encode("utf-8", "backslashreplace").decode()  # names of any bytes stay printable


def summary(results: list, recheck: bool) -> str:
    """One line: how many images got a verdict, how many not and why, and what a reader must know of the others."""
    n_err = sum(r.error is not None for r in results)
    n_held = sum(r.error is not None and r.withheld > 0 for r in results)
    flagged = sum(bool(r.advice) for r in results if r.error is None)
    warned = sum(bool(r.warnings) for r in results if r.error is None)
    return (f"{len(results) - n_err} classified ({flagged} flagged by the quality check, {warned} with warnings), "
            f"{n_err - n_held} failed"
            + (f", {n_held} without a verdict (fields withheld by the quality check)" if n_held else "")
            + (f"; {sum(r.rechecked for r in results)} fields re-checked at fp32" if recheck else ""))


def problems(results: list, model: ModelInfo, verbose: bool) -> None:
    """stderr: why each image without a verdict has none, and why the stain check is off where it is; with
    ``verbose``, how the backend was chosen."""
    if model.stain_check:
        print(f"note: {model.stain_check}", file=sys.stderr)
    if verbose:
        for n in model.backend_notes:
            print(f"note: {n}", file=sys.stderr)
        if model.recheck:
            print(f"re-check: {model.recheck}", file=sys.stderr)
    for r in results:
        if r.error:
            print(f"error: {r.error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from runtime.apps.options import open_classifier
    from runtime.errors import BreakhisError, report
    from runtime.io.inputs import ImageInput, expand_inputs

    try:
        clf = open_classifier(args)
    except BreakhisError as e:
        return report(e)
    if args.camera is not None or args.video is not None:
        from runtime.pipeline.stream import run_stream

        try:
            stats = run_stream(clf, args.camera if args.camera is not None else str(args.video), args.rate,
                               args.out_video, args.max_frames, args.show)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            clf.close()
        print(json.dumps(stats.summary() | {"verdicts": stats.verdicts}) if args.json else
              "\n".join(f"{k:18s} {v:.2f}" if isinstance(v, float) else f"{k:18s} {v}"
                        for k, v in stats.summary().items()))
        return 0
    skipped: list[str] = []
    items = [ImageInput(p, error=err) for p, err in expand_inputs(args.inputs, args.recursive, skipped)]
    for note in skipped:
        print(f"note: {note}", file=sys.stderr)
    stream = clf.classify_iter(items)
    if not args.no_progress:
        from tqdm import tqdm

        stream = tqdm(stream, total=len(items), unit="img", file=sys.stderr, disable=None, leave=False)
    if args.jsonl:  # streamed: memory stays bounded whatever the number of inputs
        failed = False
        problems([], clf.model_info, args.verbose)
        for r in stream:
            print(json.dumps(r.to_dict()), flush=True)
            problems([r], clf.model_info, False)
            failed |= r.error is not None
        clf.close()
        return 1 if failed else 0
    results = list(stream)
    clf.close()
    if args.json:
        json.dump([r.to_dict() for r in results], sys.stdout, indent=2)
        print()
    else:
        print(table(results, clf.model_info))
    problems(results, clf.model_info, args.verbose)
    return 1 if any(r.error for r in results) else 0
