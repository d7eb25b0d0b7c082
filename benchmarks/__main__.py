"""python -m benchmarks: the runtime against the PyTorch FP32 eager baseline, and every path the product runs
against the image-by-image time of the same images, in one run.

Each phase runs alone in its own child process (python -m benchmarks.phase), one after another: a variant image
by image (the baseline, each runtime precision), a variant as a folder, then the product's paths
(benchmarks/paths.py: folder, watch-folder burst, slide, cohort in one process and on Ray, the server under 1 and 8
clients). No phase shares a process with another, so the baseline's OpenMP threads, which keep spinning after each
image, slow nothing else; each phase's peak RSS is its own. Every row is summarised the same way (mean, p50, p95,
spread of per-image samples; benchmarks/stats.py) and every ratio is paired by round: in each round the ratio of the
two rows' means, the row's ratio made of their medians (benchmarks/stats.py ``ratio``; the rounds' kept beside it):
``vs_baseline`` against the baseline image by image, ``vs_image_by_image`` against the runtime image by image at the
same tier. The JSON says how each row was taken. docs/performance.md is made from the JSON: python -m benchmarks.report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_json
from benchmarks.report import compare_text, second_path, table
from benchmarks.report import main as report_main
from benchmarks.stats import RATIO_METHOD, NotMeasured, merge, ratio, round_ratios
from benchmarks.variants import RUNTIME_AUTO, SUITES

RUN = ("python -m benchmarks --images ../shared/data/breakhis-100x --limit 12 --rounds 6 --runs 2 "
       "--json benchmarks/results/cpu-paths.json --doc")
EPILOG = f"""examples:
  {RUN}   # the full run, twice (about 27 min on 2 cores)
  python -m benchmarks --images DIR --limit 2 --rounds 1 --paths folder    # a quick look
  python -m benchmarks.report --compare A.json B.json                       # do two runs agree?
  python -m benchmarks --suite gpu --images DIR --json benchmarks/results/gpu.json --fp16-tflops 989
"""
PATH_NAMES = ("folder", "watch", "slide", "cohort", "serve")
PHASE_TIMEOUT_S = 900  # a phase that has not finished in this long has hung: reported as skipped, the run goes on


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "platform": platform.platform()}


def jpeg_copies(images: list[Path], folder: Path, quality: int) -> list[Path]:
    """JPEG copies of the images (OpenCV, 4:2:0 as cameras write them), named as the originals."""
    import cv2

    out = []
    for p in images:
        out.append(folder / f"{p.stem}.jpg")
        bgr = cv2.imread(str(p))
        if bgr is None:
            raise ValueError(f"{p}: cannot read the image to make its JPEG copy")
        cv2.imwrite(str(out[-1]), bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return out


def run_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """One phase in its own process; its rows, or raises with the reason it could not run."""
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.phase", json.dumps(spec)], capture_output=True,
                              text=True, timeout=PHASE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"did not finish in {PHASE_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
        raise RuntimeError(last[0])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fidelity(base: dict, row: dict, name: str) -> dict:
    from runtime.model.fidelity import compare

    fid = compare({"probability": np.asarray(base["probabilities"])}, {"probability": np.asarray(row["probabilities"])},
                  row["precision"], base["threshold"], name)
    return {"precision": fid.precision, "probability_max_abs": fid.outputs[0].max_abs,
            "label_agreement": fid.label_agreement, "flips": fid.flips,
            "label_differences": fid.flips + fid.in_band_flips, "within_tolerance": fid.ok}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="folder of images (all must be classifiable)")
    ap.add_argument("--model", type=Path, default=None,
                    help="model directory (default: the trained model where setup.sh exported it, else the reference)")
    ap.add_argument("--suite", choices=sorted(SUITES), default="cpu", help="cpu (default) or gpu variants")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds (default 2): every phase runs once per round, in a fresh process, round after round")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes over the images per round (default: 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed images per phase first (default: 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every variant and path")
    ap.add_argument("--paths", default=None,
                    help=f"comma-separated product paths to run ({', '.join(PATH_NAMES)}; default: all with the cpu "
                         "suite, none with the gpu suite; 'none' for none)")
    ap.add_argument("--variants", default=None, help="comma-separated variants to run (default: the suite's)")
    ap.add_argument("--runs", type=int, default=1,
                    help="the whole run this many times, one after another (default 1); run 2 is written beside "
                         "--json as NAME.run2.json and the ratios of runs 1 and 2 are compared")
    ap.add_argument("--doc", action="store_true",
                    help="then regenerate docs/performance.md from this run's --json (and its run 2 where --runs 2)")
    ap.add_argument("--no-memory", action="store_true",
                    help="kept for older commands: peak RSS now comes from each phase's own process, at no cost")
    ap.add_argument("--fp16-tflops", type=float, default=None, help="GPU dense FP16 rate for the floor (gpu suite)")
    ap.add_argument("--as-jpeg", type=int, default=None, metavar="QUALITY",
                    help="time JPEG copies of the images at this quality instead (as a camera writes them)")
    args = ap.parse_args(argv)
    if args.doc and args.json is None:
        ap.error("--doc needs --json: the doc is made from the run just made, which --json writes")
    from runtime.io.inputs import image_files
    from runtime.model.paths import default_model_dir

    args.model = args.model or default_model_dir()
    images = image_files(args.images)[: args.limit]
    if not images:
        ap.error(f"--images {args.images}: no images found")
    if args.as_jpeg is not None:
        images = jpeg_copies(images, Path(tempfile.mkdtemp(prefix="bench-jpeg-")), args.as_jpeg)
    paths = [p for p in (args.paths or ("none" if args.suite == "gpu" else ",".join(PATH_NAMES))).split(",")
             if p and p != "none"]
    if unknown := set(paths) - set(PATH_NAMES):
        ap.error(f"--paths: unknown {', '.join(sorted(unknown))}; known: {', '.join(PATH_NAMES)}")
    m = machine()
    results = []
    for k in range(args.runs):
        if args.runs > 1:
            print(f"run {k + 1} of {args.runs}", file=sys.stderr)
        results.append(one_run(args, argv, images, paths, m))
        if results[-1]["baseline"] not in results[-1]["rows"]:
            return 1
        print(table(results[-1]))
        out = args.json if k == 0 or args.json is None else second_path(args.json) if k == 1 else \
            args.json.with_suffix(f".run{k + 1}.json")
        write_json(out, results[-1])
        if out:
            print(f"wrote {out}", file=sys.stderr)
    if len(results) > 1:
        print(compare_text(results[0], results[1]))
    if args.doc:  # from the run(s) just made: run 2 where there is one, else run 1 alone (never an older run 2)
        again = ["--second", str(second_path(args.json))] if len(results) > 1 else ["--single"]
        return report_main(["--write", "--first", str(args.json), *again])
    return 0


def one_run(args: argparse.Namespace, argv: list[str] | None, images: list[Path], paths: list[str],
            m: dict) -> dict:
    """Every phase once per round, one after another, each in its own process; the run's result."""
    baseline, wanted_per_image, wanted_folder = SUITES[args.suite]
    if args.variants:
        chosen = args.variants.split(",")
        wanted_per_image = tuple(v for v in wanted_per_image if v in chosen or v == baseline)
        wanted_folder = tuple(v for v in wanted_folder if v in chosen)
    common = {"model": str(args.model), "images": [str(p) for p in images], "threads": args.threads,
              "repeats": args.repeats, "warmup": args.warmup, "suite": args.suite, "gpu": m["gpu"],
              "fp16_tflops": args.fp16_tflops}
    # one table of phases: the suite's variants image by image, as folders, then the product's paths
    phases = [("per-image", v) for v in wanted_per_image] + [("folder", v) for v in wanted_folder] + \
        [("path", p) for p in paths]
    raw: dict[str, list[dict[str, Any]]] = {}
    kinds: dict[str, str] = {}
    skipped: dict[str, str] = {}
    load = [os.getloadavg()[0]]
    started = time.time()

    def run(kind: str, name: str, reverse: bool = False) -> None:
        if name in skipped:
            return
        t0 = time.perf_counter()
        print(f"  {kind} {name} ...", end="", flush=True, file=sys.stderr)
        try:
            got = run_phase(common | {"kind": kind, "name": name, "reverse": reverse})
        except Exception as e:  # noqa: BLE001 (a phase that cannot run here is reported, and the run goes on)
            skipped[name] = f"{type(e).__name__}: {e}"
            print(f" skipped: {skipped[name]}", file=sys.stderr)
            return
        for row_name, r in got.items():
            raw.setdefault(row_name, []).append(r)
            kinds[row_name] = kind
        print(f" {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    print(f"{len(phases)} phases on {len(images)} images, {args.rounds} rounds of {args.repeats} pass(es) each "
          f"({args.threads} threads), each phase in its own process:", file=sys.stderr)
    for k in range(args.rounds):  # round by round, every other round backwards (A B C, C B A, ...): a steady drift
        print(f" round {k + 1} of {args.rounds}", file=sys.stderr)  # of the machine's speed hits every phase alike
        for kind, name in phases if k % 2 == 0 else phases[::-1]:
            run(kind, name, reverse=k % 2 == 1)  # a phase of several rows reverses them too
        if k == 0 and RUNTIME_AUTO not in raw and paths_without_reference(raw, kinds):
            # the paths ran a tier no per-image row of the suite has: the runtime image by image at the tier `auto`
            # picks joins the rounds as their last phase, now (round 1) and in every round after, so that it is
            # paired with the paths round by round like every other row
            phases.append(("per-image", RUNTIME_AUTO))
            run("per-image", RUNTIME_AUTO)

    def finished(n: str) -> dict[str, Any]:
        r = merge(raw[n]) | {"kind": kinds[n]}
        r["how"] |= {"process": "its own child process (python -m benchmarks.phase) per round, nothing else running",
                     "threads": args.threads, "warmup": args.warmup, "passes_per_round": args.repeats,
                     "samples": r["samples"], "images": r["images"]}
        return r

    # a row that failed in a later round is not a row (its rounds would not be comparable); one with nothing to
    # summarise (no samples, a net time that is not positive) is skipped with its reason, the other rows kept
    rows: dict[str, dict[str, Any]] = {}
    for n, rs in raw.items():
        if len(rs) == args.rounds and n not in skipped:
            try:
                rows[n] = finished(n)
            except NotMeasured as e:
                skipped[n] = f"not measured: {e}"
    if baseline not in rows:
        print(f"error: the baseline {baseline} cannot run here: {skipped.get(baseline)}", file=sys.stderr)
        return {"baseline": baseline, "rows": rows, "skipped": skipped}
    refs = same_tier_rows(rows)  # each path and folder row against the image-by-image row of its own tier
    load.append(os.getloadavg()[0])
    for name, r in rows.items():
        same_tier = refs.get(name)
        r["vs_baseline"] = ratio(rows[baseline], r)
        r["vs_baseline_rounds"] = round_ratios(rows[baseline], r)
        r["vs_image_by_image"] = ratio(rows[same_tier], r) if same_tier else None
        r["vs_image_by_image_rounds"] = round_ratios(rows[same_tier], r) if same_tier else None
        r["image_by_image_row"] = same_tier
        if r["kind"] == "per-image" and name != baseline and "probabilities" in r:
            r["fidelity"] = fidelity(rows[baseline], r, name)
    for r in rows.values():
        r.pop("probabilities", None)
        r.pop("threshold", None)
    result = {"date": time.strftime("%Y-%m-%d", time.gmtime(started)), "command": "python -m benchmarks " +
              " ".join(argv if argv is not None else sys.argv[1:]), "machine": m,
              "load_average_1min": {"start": load[0], "end": load[1]}, "wall_s": time.time() - started,
              "suite": args.suite, "model": str(args.model), "images": len(images),
              "format": f"JPEG quality {args.as_jpeg} copies" if args.as_jpeg is not None else "as given",
              "repeats": args.repeats, "rounds": args.rounds, "warmup_images": args.warmup, "threads": args.threads,
              "baseline": baseline, "ratio_method": RATIO_METHOD, "rows": rows, "skipped": skipped}
    path_refs = {refs.get(n) for n, r in rows.items() if r["kind"] == "path"}
    result["image_by_image"] = next(iter(path_refs)) if len(path_refs) == 1 else None  # the paths' one reference
    if alone := [n for n, r in rows.items() if r["kind"] != "per-image" and refs.get(n) is None]:
        result["note"] = f"no image-by-image row at the tier of {', '.join(alone)}: no 'vs image by image' for them"
    elif len(path_refs) > 1:
        result["note"] = ("the paths ran different tiers; each is compared with the image-by-image row of its own: "
                          + ", ".join(f"{n} with {refs[n]}" for n, r in rows.items() if r["kind"] == "path"))
    return result


def paths_without_reference(raw: dict[str, list[dict[str, Any]]], kinds: dict[str, str]) -> bool:
    """Whether a path row of the rounds so far ran a tier that no per-image row ran."""
    per_image = [rs[0]["tier"] for n, rs in raw.items() if kinds[n] == "per-image"]
    return any(kinds[n] == "path" and rs[0]["tier"] not in per_image for n, rs in raw.items())


def same_tier_rows(rows: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """For each folder and path row, the per-image row of the same tier (the first, in the run's order), or None
    where the run has none at its tier."""
    per_image = [(n, r["tier"]) for n, r in rows.items() if r["kind"] == "per-image"]
    return {n: next((p for p, tier in per_image if tier == r["tier"]), None) for n, r in rows.items()
            if r["kind"] != "per-image"}


if __name__ == "__main__":
    sys.exit(main())
