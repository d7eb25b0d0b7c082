"""python -m benchmarks.cohort: slides per hour and fields per second for one process against Ray with 1 and 2
actors, on the same synthetic cohort (mosaics of real shared fields among glass), the same model and backend.

  python -m benchmarks.cohort --images ../shared/data/breakhis-100x --slides 8 --json benchmarks/results/cohort-cpu.json
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_json
from benchmarks.synthetic_slide import write_mosaic


def main(argv: list[str] | None = None) -> int:
    from runtime.cohort import main as cohort

    ap = argparse.ArgumentParser(prog="python -m benchmarks.cohort", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="folder of 700x460 images to build the slides from")
    ap.add_argument("--slides", type=int, default=8, help="slides in the cohort (default 8)")
    ap.add_argument("--grid", type=int, default=4, help="fields a side per slide (default 4, half of them tissue)")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the runtime's default)")
    ap.add_argument("--backend", default="cpu", help="backend every run uses (default cpu)")
    ap.add_argument("--cpus-per-actor", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="cores each Ray actor and the single process use (default: half the cores)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    import ray

    images = sorted(args.images.glob("*.png"))
    if not images:
        ap.error(f"--images {args.images}: no PNG images")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="cohort-bench-") as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        for i in range(args.slides):
            layout = [[images[int(rng.integers(len(images)))] if rng.random() < 0.5 else None
                       for _ in range(args.grid)] for _ in range(args.grid)]
            write_mosaic(root / "in" / f"s{i}.tif", layout, levels=2)
        common = [str(root / "in"), "--backend", args.backend, "--no-progress", "--threads",
                  str(args.cpus_per_actor)] + (["--model", str(args.model)] if args.model else [])
        runs: dict[str, list[str]] = {"one process": []}
        ray.init(num_cpus=2 * args.cpus_per_actor, include_dashboard=False, log_to_driver=False)
        try:
            for actors in (1, 2):
                runs[f"ray, {actors} actor{'s' * (actors > 1)}"] = ["--ray", "local", "--actors", str(actors),
                                                                   "--cpus-per-actor", str(args.cpus_per_actor)]
            results: dict[str, dict[str, Any]] = {}
            for name, extra in runs.items():
                out = root / name.replace(" ", "-").replace(",", "")
                t0 = time.perf_counter()
                cohort([*common, "--out", str(out), *extra])  # the Ray runs include starting their actors
                seconds = time.perf_counter() - t0
                with open(out / "cohort.csv", newline="") as f:
                    rows = list(csv.DictReader(f))
                fields = sum(int(r["classified"] or 0) for r in rows)
                results[name] = {"seconds": seconds, "slides": len(rows), "fields": fields,
                                 "slides_per_hour": len(rows) / seconds * 3600, "fields_per_second": fields / seconds,
                                 "probabilities": [r["probability"] for r in rows]}
                print(f"{name:16s} {seconds:7.1f} s  {results[name]['slides_per_hour']:8.0f} slides/h  "
                      f"{results[name]['fields_per_second']:6.2f} fields/s")
        finally:
            ray.shutdown()
    same = len({tuple(r["probabilities"]) for r in results.values()}) == 1
    print(f"identical probabilities in every run: {same}")
    if args.json:
        write_json(args.json, {"runs": results, "identical_probabilities": same, "slides": args.slides,
                               "grid": args.grid, "cpus_per_actor": args.cpus_per_actor, "backend": args.backend,
                               "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")})
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
