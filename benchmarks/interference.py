"""python -m benchmarks.interference: what the PyTorch baseline's threads cost whatever runs after it in the same
process, and which way of timing is clean. The runtime's per-image time (the tier `auto` picks) is taken three ways,
each in a fresh process: alone; right after a baseline image, image by image, in the same process (how
``python -m benchmarks`` used to interleave them); and the same with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP's workers
sleep at once instead of spinning). The runner now gives each phase its own process; this shows why.

  python -m benchmarks.interference --images ../shared/data/breakhis-100x --limit 8 --json benchmarks/results/interference-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import write_json
from benchmarks.stats import summarise

MODES = {"alone": ({}, False), "after each baseline image": ({}, True),
         "after each baseline image, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, True)}


def child(model: Path | None, images: list[Path], threads: int, interleave: bool) -> list[float]:
    from benchmarks.variants import BASELINE, RUNTIME_AUTO, open_variant
    from runtime.model.paths import default_model_dir

    model = model or default_model_dir()
    rt = open_variant(RUNTIME_AUTO, model, threads)
    base = open_variant(BASELINE, model, threads) if interleave else None
    samples = []
    for i, p in enumerate([images[0], *images]):  # the first image once more, untimed: the warm-up
        if base is not None:
            base.run(p)
        t0 = time.perf_counter()
        rt.run(p)
        if i:
            samples.append(time.perf_counter() - t0)
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.interference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=8, help="images (default 8)")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", choices=sorted(MODES), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from runtime.io.inputs import image_files

    images = image_files(args.images)[: args.limit]
    if args.child:
        print(json.dumps(child(args.model, images, args.threads, MODES[args.child][1])))
        return 0
    rows, load = {}, os.getloadavg()[0]
    for mode, (env, _) in MODES.items():
        cmd = [sys.executable, "-m", "benchmarks.interference", "--images", str(args.images), "--limit",
               str(args.limit), "--threads", str(args.threads), "--child", mode,
               *(["--model", str(args.model)] if args.model else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=True)
        rows[mode] = summarise(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[mode]
        print(f"{mode:52s} mean {r['mean_ms']:7.1f}  p50 {r['p50_ms']:7.1f}  p95 {r['p95_ms']:7.1f} ms  "
              f"spread {r['spread']:.1%}")
    from benchmarks.__main__ import machine

    write_json(args.json, {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                           "command": "python -m benchmarks.interference " + " ".join(argv or sys.argv[1:]),
                           "load_average_1min": {"start": load, "end": os.getloadavg()[0]},
                           "images": len(images), "threads": args.threads, "runtime": "the tier auto picks",
                           "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
