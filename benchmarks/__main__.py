"""python -m benchmarks: the runtime against the PyTorch FP32 eager baseline, interleaved on the same images.

Per-image variants run one after another on each image (baseline, runtime, baseline, ...) so that machine noise
hits all alike; throughput variants run the whole list per repeat. Warm-up passes are excluded. Peak RSS is
measured per variant in a fresh child process. A variant that cannot run here is reported with the reason.
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

import numpy as np

from benchmarks import write_json
from benchmarks.variants import RUNTIME_TRT_FP16, SUITES, open_variant
from runtime.model.fidelity import compare

EPILOG = """examples:
  python -m benchmarks --images ../shared/data/breakhis-100x --json benchmarks/results/cpu.json
  python -m benchmarks --images DIR --limit 8 --repeats 1                   # quick look
  python -m benchmarks --suite gpu --images DIR --json benchmarks/results/gpu.json --fp16-tflops 989
"""
GFLOP_PER_FIELD = 184.0  # 6 VGG16 passes at 224x224 (2 x 15.4 GMAC each) plus the head
# datasheet dense FP16 tensor rates, matched as substrings of the device name ("NVIDIA H200", ...); PCIe first
FP16_DENSE_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0}


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
        cv2.imwrite(str(out[-1]), cv2.imread(str(p)), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return out


def summarise(total_s: list[float], stages: dict[str, list[float]]) -> dict:
    """p50/p95 of the total, images/s, and p50/p95/p99 of every stage (ms)."""
    ms = np.asarray(total_s) * 1e3
    return {"p50_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
            "images_per_s": float(1e3 / np.median(ms)), "samples": len(ms),
            "stages_ms": {k: {f"p{q}": float(np.percentile(np.asarray(v) * 1e3, q)) for q in (50, 95, 99)}
                          for k, v in stages.items()}}


def peak_rss(variant: str, model: Path, threads: int, images: list[Path]) -> float | None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memprobe", variant, "--model", str(model),
                           "--threads", str(threads), *map(str, images)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  peak RSS of {variant} not measured: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def tensor_core_floor(variant, gpu_name: str | None, tflops: float | None, batch: int = 32) -> dict:
    """TensorRT FP16 at a full batch against the tensor-core floor: GFLOP per field / the GPU's dense FP16 rate."""
    backend = variant.keep.backend
    n = min(batch, backend.max_batch)
    times = []
    for _ in range(3):
        backend.run_device(n)
    for _ in range(20):
        t0 = time.perf_counter()
        backend.run_device(n)
        times.append(time.perf_counter() - t0)
    ms_per_field = float(np.median(times)) * 1e3 / n
    rate = tflops or next((v for k, v in FP16_DENSE_TFLOPS.items() if k in (gpu_name or "")), None)
    out = {"batch": n, "ms_per_field": ms_per_field}
    if rate:
        floor = GFLOP_PER_FIELD / (rate * 1e3) * 1e3  # ms per field
        out |= {"fp16_dense_tflops": rate, "floor_ms_per_field": floor, "vs_floor": ms_per_field / floor}
    else:
        out["note"] = "pass --fp16-tflops (the GPU's dense FP16 tensor rate) for the floor"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="folder of images (all must be classifiable)")
    ap.add_argument("--model", type=Path, default=None,
                    help="model directory (default: the trained model where setup.sh exported it, else the reference)")
    ap.add_argument("--suite", choices=sorted(SUITES), default="cpu", help="cpu (default) or gpu variants")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes over the images (default: 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed images per variant first (default: 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every variant")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant peak RSS children")
    ap.add_argument("--fp16-tflops", type=float, default=None, help="GPU dense FP16 rate for the floor (gpu suite)")
    ap.add_argument("--as-jpeg", type=int, default=None, metavar="QUALITY",
                    help="time JPEG copies of the images at this quality instead (as a camera writes them)")
    args = ap.parse_args(argv)
    from runtime.io.inputs import image_files
    from runtime.model.paths import default_model_dir

    args.model = args.model or default_model_dir()

    images = image_files(args.images)[: args.limit]
    if not images:
        ap.error(f"--images {args.images}: no images found")
    if args.as_jpeg is not None:
        images = jpeg_copies(images, Path(tempfile.mkdtemp(prefix="bench-jpeg-")), args.as_jpeg)
    baseline, wanted_per_image, wanted_throughput = SUITES[args.suite]
    variants, skipped = {}, {}
    for v in (*wanted_per_image, *wanted_throughput):
        try:
            variants[v] = open_variant(v, args.model, args.threads)
        except Exception as e:  # each backend fails in its own way where it cannot run; report, don't crash
            skipped[v] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"  {v} skipped: {skipped[v]}", file=sys.stderr)
    if baseline not in variants:
        print(f"error: the baseline {baseline} cannot run here: {skipped[baseline]}", file=sys.stderr)
        return 1
    per_image = [v for v in wanted_per_image if v in variants]
    throughput = [v for v in wanted_throughput if v in variants]
    for v in per_image:
        for p in images[: args.warmup]:
            variants[v].run(p)
    probs: dict[str, list[float]] = {v: [] for v in per_image}  # first pass: fidelity against the baseline
    for v in throughput:  # the whole list once: every batch shape (and a GPU's per-shape tuning) is seen
        variants[v].run_all(images)

    times: dict[str, tuple[list[float], dict[str, list[float]]]] = {v: ([], {}) for v in variants}
    n = len(images) * args.repeats
    print(f"timing {len(per_image)} per-image variants on {len(images)} images x {args.repeats} repeats "
          f"({args.threads} threads) ...", file=sys.stderr)
    for rep in range(args.repeats):
        for i, p in enumerate(images):
            order = per_image if (i + rep) % 2 == 0 else per_image[::-1]  # alternate who goes first
            for v in order:
                t0 = time.perf_counter()
                stages, prob = variants[v].run(p)
                times[v][0].append(time.perf_counter() - t0)
                if rep == 0:
                    probs[v].append(prob)
                for k, sec in stages.items():
                    times[v][1].setdefault(k, []).append(sec)
            print(f"\r  {rep * len(images) + i + 1}/{n} images", end="", file=sys.stderr)
        for v in throughput:
            t0 = time.perf_counter()
            variants[v].run_all(images)
            times[v][0].append((time.perf_counter() - t0) / len(images))
    print(file=sys.stderr)

    m = machine()
    result = {"machine": m, "suite": args.suite, "model": str(args.model), "images": len(images),
              "format": f"JPEG quality {args.as_jpeg} copies" if args.as_jpeg is not None else "as given",
              "repeats": args.repeats, "warmup_images": args.warmup, "threads": args.threads, "baseline": baseline,
              "variants": {v: summarise(*times[v]) for v in variants}, "skipped": skipped}
    for v in per_image:
        fid = compare({"probability": np.asarray(probs[baseline])}, {"probability": np.asarray(probs[v])},
                      variants[v].precision, variants[baseline].keep.contract.threshold, v)
        result["variants"][v]["fidelity"] = {"precision": fid.precision, "probability_max_abs": fid.outputs[0].max_abs,
                                             "label_agreement": fid.label_agreement, "flips": fid.flips,
                                             "label_differences": fid.flips + fid.in_band_flips,
                                             "within_tolerance": fid.ok}
    for v in variants:  # the share of fields re-checked at FP32 (a faster tier's borderline fields)
        n = variants[v].fields
        if n.get("classified"):
            result["variants"][v]["recheck_share"] = n["rechecked"] / n["classified"]
    for v in throughput:
        result["variants"][v]["note"] = "folder throughput: the whole list per call; ms are per image, amortised"
    base_p50 = result["variants"][baseline]["p50_ms"]
    folder_p50 = result["variants"].get(f"{baseline}_folder", {}).get("p50_ms", base_p50)
    for v, r in result["variants"].items():  # folder variants against the baseline's own folder time
        r["speedup_vs_baseline"] = (folder_p50 if v in throughput else base_p50) / r["p50_ms"]
    if RUNTIME_TRT_FP16 in variants:
        result["tensor_core_floor"] = tensor_core_floor(variants[RUNTIME_TRT_FP16], m["gpu"], args.fp16_tflops)
    if not args.no_memory:
        print("measuring peak RSS per variant (one child process each) ...", file=sys.stderr)
        for v in variants:
            result["variants"][v]["peak_rss_mb"] = peak_rss(v, args.model, args.threads, images[:8])
    print(table(result))
    write_json(args.json, result)
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"{m['gpu'] or m['cpu']}, {m['cores']} cores; {result['images']} images x {result['repeats']} "
             f"repeats, {result['threads']} threads",
             f"{'variant':40s} {'p50 ms':>8s} {'p95 ms':>8s} {'img/s':>7s} {'pre ms':>7s} {'inf ms':>7s} "
             f"{'RSS MB':>7s} {'speedup':>8s} {'max|d|p':>8s} {'labels':>7s} {'rechk':>6s}"]

    def f(x: float | None, fmt: str) -> str:
        return format(x, fmt) if x is not None else "-"

    for v, r in result["variants"].items():
        st = {k: x["p50"] for k, x in r["stages_ms"].items()}
        pre = sum(x for k, x in st.items() if k != "inference") if st else None
        lines.append(f"{v:40s} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['images_per_s']:7.2f} "
                     f"{f(pre, '7.1f'):>7s} {f(st.get('inference'), '7.1f'):>7s} "
                     f"{f(r.get('peak_rss_mb'), '7.0f'):>7s} {r['speedup_vs_baseline']:7.2f}x "
                     f"{f(r.get('fidelity', {}).get('probability_max_abs'), '8.1e'):>8s} "
                     f"{f(r.get('fidelity', {}).get('label_agreement'), '7.1%'):>7s} "
                     f"{f(r.get('recheck_share'), '6.1%'):>6s}")
    lines += [f"{v:40s} skipped: {why}" for v, why in result["skipped"].items()]
    lines.append("max|d|p, labels: per-image variants' probabilities against the baseline's on the same images; "
                 "rechk: share of fields re-checked at fp32")
    if "tensor_core_floor" in result:
        lines.append(f"tensor-core floor: {json.dumps(result['tensor_core_floor'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
