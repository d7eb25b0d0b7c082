"""python -m benchmarks: the runtime against the PyTorch FP32 eager baseline, interleaved on the same images.

Per-image variants run one after another on each image (baseline, runtime, baseline, ...) so that machine noise
hits both alike; the batch variant runs the whole list per repeat. Warm-up passes are excluded. Peak RSS is measured
per variant in a fresh child process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.variants import BASELINE, RUNTIME_CPU, RUNTIME_CPU_BATCH, VARIANTS, open_variant

EPILOG = """examples:
  python -m benchmarks --images ../shared/data/breakhis-100x --json benchmarks/results/cpu.json
  python -m benchmarks --images DIR --limit 8 --repeats 1     # quick look
"""


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "platform": platform.platform()}


def summarise(total_s: list[float], pre_s: list[float], inf_s: list[float]) -> dict:
    ms = np.asarray(total_s) * 1e3
    return {"p50_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
            "images_per_s": float(1e3 / np.median(ms)),
            "preprocess_p50_ms": float(np.median(pre_s) * 1e3) if pre_s else None,
            "inference_p50_ms": float(np.median(inf_s) * 1e3) if inf_s else None, "samples": len(ms)}


def peak_rss(variant: str, model: Path, threads: int, images: list[Path]) -> float | None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memprobe", variant, "--model", str(model),
                           "--threads", str(threads), *map(str, images)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  peak RSS of {variant} not measured: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="folder of images (all must be classifiable)")
    ap.add_argument("--model", type=Path, default=Path("models/reference"), help="model directory")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes over the images (default: 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed images per variant first (default: 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every variant")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant peak RSS children")
    args = ap.parse_args(argv)
    from runtime.inputs import image_files

    images = image_files(args.images)[: args.limit]
    if not images:
        ap.error(f"--images {args.images}: no images found")
    runners = {}
    for v in VARIANTS:
        runners[v] = open_variant(v, args.model, args.threads)
    per_image = [BASELINE, RUNTIME_CPU]
    for v in per_image:
        for p in images[: args.warmup]:
            runners[v][0](p)
    runners[RUNTIME_CPU_BATCH][1](images[: max(args.warmup, 1) * 4])

    times: dict[str, tuple[list[float], list[float], list[float]]] = {v: ([], [], []) for v in VARIANTS}
    n = len(images) * args.repeats
    print(f"timing {len(per_image)} per-image variants on {len(images)} images x {args.repeats} repeats "
          f"({args.threads} threads) ...", file=sys.stderr)
    for rep in range(args.repeats):
        for i, p in enumerate(images):
            for v in (per_image if (i + rep) % 2 == 0 else per_image[::-1]):  # alternate who goes first
                t0 = time.perf_counter()
                pre, inf = runners[v][0](p)
                times[v][0].append(time.perf_counter() - t0)
                times[v][1].append(pre)
                times[v][2].append(inf)
            done = rep * len(images) + i + 1
            print(f"\r  {done}/{n} images", end="", file=sys.stderr)
        t0 = time.perf_counter()
        runners[RUNTIME_CPU_BATCH][1](images)
        times[RUNTIME_CPU_BATCH][0].append((time.perf_counter() - t0) / len(images))
    print(file=sys.stderr)

    result = {"machine": machine(), "model": str(args.model), "images": len(images), "repeats": args.repeats,
              "warmup_images": args.warmup, "threads": args.threads, "variants": {}}
    for v in VARIANTS:
        result["variants"][v] = summarise(*times[v])
    result["variants"][RUNTIME_CPU_BATCH]["note"] = "throughput: whole list at batch 4; ms are per image, amortised"
    base_p50 = result["variants"][BASELINE]["p50_ms"]
    for v, r in result["variants"].items():
        r["speedup_vs_baseline"] = base_p50 / r["p50_ms"]
    if not args.no_memory:
        print("measuring peak RSS per variant (one child process each) ...", file=sys.stderr)
        for v in VARIANTS:
            result["variants"][v]["peak_rss_mb"] = peak_rss(v, args.model, args.threads, images[:8])
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores; {result['images']} images x {result['repeats']} repeats, "
             f"{result['threads']} threads",
             f"{'variant':34s} {'p50 ms':>8s} {'p95 ms':>8s} {'img/s':>7s} {'pre ms':>7s} {'inf ms':>7s} "
             f"{'RSS MB':>7s} {'speedup':>8s}"]
    for v, r in result["variants"].items():
        def f(x, fmt):
            return format(x, fmt) if x is not None else "-"
        lines.append(f"{v:34s} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['images_per_s']:7.2f} "
                     f"{f(r['preprocess_p50_ms'], '7.1f'):>7s} {f(r['inference_p50_ms'], '7.1f'):>7s} "
                     f"{f(r.get('peak_rss_mb'), '7.0f'):>7s} {r['speedup_vs_baseline']:7.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
