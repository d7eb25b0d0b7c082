"""python -m benchmarks.device_check: every GPU check and benchmark of the project in one go, results written with
the machine's description (run it through benchmarks/device_check.sh, which installs carried wheels first).

Steps: describe the machine; export the trained and the reference models where missing; the GPU, kernel and
TensorRT tests; `export verify` for every GPU backend and precision on the trained model (all shared images); the
CLI on the trained model; the GPU benchmark suite; the kernel benchmark; the slide benchmark. A step that fails is
recorded and the next one runs. --dry-run checks the plan without a GPU (every command's --help must work) and
prints its summary instead of writing results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from runtime.model.paths import MODELS, REPO, TRAINED_NAME, sample_images, trained_weights


def plan(images: Path, out: Path, trained: Path, limit: int) -> list[tuple[str, list[str]]]:
    """(name, argv) of every step, most important first (a run cut short keeps those). Results go under ``out``."""
    py = [sys.executable, "-m"]
    steps: list[tuple[str, list[str]]] = []
    weights = trained_weights()
    if not (trained / "manifest.json").is_file() and (weights / "weights.pt").is_file():
        # as setup.sh exports it, so that the GPU tests' fixture reuses this export (export/cache.py)
        steps.append(("export-trained", [*py, "export", "trained", "-o", str(trained), "--parity-images", str(images)]))
    for backend in ("onnxruntime-cuda", "tensorrt"):
        for precision in ("fp32", "fp16"):
            steps.append((f"verify-{backend}-{precision}",
                          [*py, "export", "verify", "-m", str(trained), "--images", str(images), "--backend", backend,
                           "--precision", precision, "--json", str(out / f"verify-{backend}-{precision}.json")]))
    steps.append(("verify-onnxruntime-cuda-fp16-nhwc",  # recorded in the model: the runtime prefers NHWC if it passed
                  [*py, "export", "verify", "-m", str(trained), "--images", str(images), "--backend",
                   "onnxruntime-cuda", "--precision", "fp16", "--layout", "nhwc", "--json",
                   str(out / "verify-onnxruntime-cuda-fp16-nhwc.json")]))
    steps.append(("classify-trained", [*py, "runtime.classify", "--no-progress", "--json", "--model", str(trained),
                                       str(images)]))
    steps.append(("bench-decode", [*py, "benchmarks.decode", "--images", str(images), "--json",
                                   str(out / "decode.json")]))
    steps.append(("bench-decode-jpeg", [*py, "benchmarks.decode", "--images", str(images), "--as-jpeg", "95",
                                        "--json", str(out / "decode-jpeg.json")]))
    steps.append(("bench-gpu", [*py, "benchmarks", "--suite", "gpu", "--model", str(trained), "--images", str(images),
                                "--limit", str(limit), "--no-memory", "--json", str(out / "gpu.json")]))
    steps.append(("bench-gpu-jpeg", [*py, "benchmarks", "--suite", "gpu", "--model", str(trained), "--images",
                                     str(images), "--as-jpeg", "95", "--limit", str(limit), "--no-memory", "--json",
                                     str(out / "gpu-jpeg.json")]))
    steps.append(("bench-ort-cuda", [*py, "benchmarks.ort_cuda", "--model", str(trained),
                                     "--json", str(out / "ort_cuda.json")]))
    steps.append(("bench-kernel", [*py, "benchmarks.gpu_preprocess", "--model", str(trained), "--images", str(images),
                                   "--json", str(out / "kernel.json")]))
    steps.append(("bench-slide", [*py, "benchmarks.slide", "--model", str(trained), "--images", str(images),
                                  "--backend", "onnxruntime-cuda", "--batch-size", "16", "--json",
                                  str(out / "slide-gpu.json")]))
    # with the GPU tests, those of the trained model's FP16 variant, which the export makes only where a GPU is
    steps.append(("tests-gpu", [*py, "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
                                "tests/test_gpu.py", "tests/test_real_weights.py", "tests/test_trt.py",
                                f"--junitxml={out / 'tests-gpu.xml'}"]))
    return steps


def describe() -> dict:
    """The machine: GPU (nvidia-smi), CPU, Python and the versions of what ran."""
    info: dict = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count(),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["gpu"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["gpu"] = f"none ({e})"
    try:
        from runtime.backends.engines import import_tensorrt

        info["tensorrt"] = import_tensorrt().__version__
    except Exception as e:  # TrtUnavailable, or a broken install: a fact about the machine
        info["tensorrt"] = f"missing ({str(e)[:120]})"
    for mod in ("onnxruntime", "torch", "pycuda", "numpy", "cv2", "imagecodecs"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # a missing or broken package is a fact about the machine, not a failure here
            info[mod] = f"missing ({type(e).__name__})"
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=sample_images(),
                    help="real images (default: $BREAKHIS_SHARED/data/breakhis-100x)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "device",
                    help="where results go (default: benchmarks/results/device)")
    ap.add_argument("--limit", type=int, default=16, help="images for the GPU benchmark suite (default 16)")
    ap.add_argument("--only", default=None, help="run only the steps whose name contains this")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check each command's --help")
    args = ap.parse_args(argv)
    if not args.dry_run:  # a dry run writes nothing: results/device/ holds what a GPU machine measured, only that
        args.out.mkdir(parents=True, exist_ok=True)
    steps = plan(args.images, args.out, MODELS / TRAINED_NAME, args.limit)
    if args.only:
        steps = [s for s in steps if args.only in s[0] or s[0].startswith("export")]  # models first
    machine = describe()
    if not args.dry_run:
        (args.out / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    print(json.dumps(machine), file=sys.stderr)
    summary = []
    for name, cmd in steps:
        print(f"== {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        if args.dry_run:
            mod = cmd[cmd.index("-m") + 1]
            sub = [cmd[cmd.index("-m") + 2]] if mod == "export" else []
            proc = subprocess.run([sys.executable, "-m", mod, *sub, "--help"], capture_output=True, text=True, cwd=REPO)
            summary.append({"step": name, "dry_run": True, "rc": proc.returncode})
            continue
        if "tensorrt" in name and str(machine.get("tensorrt", "")).startswith("missing"):
            summary.append({"step": name, "rc": 0, "skipped": "TensorRT is not installed here"})
            print("   skipped: TensorRT is not installed here", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        (args.out / f"{name}.log").write_text(f"$ {shlex.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
        summary.append({"step": name, "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                        "tail": (proc.stdout + proc.stderr).strip().splitlines()[-3:]})
        print(f"   rc {proc.returncode} in {summary[-1]['seconds']} s: {' | '.join(summary[-1]['tail'])[:400]}",
              file=sys.stderr, flush=True)
    report = json.dumps({"machine": machine, "steps": summary}, indent=2) + "\n"
    if args.dry_run:
        print(report, end="")
    else:
        (args.out / "summary.json").write_text(report)
    return 0 if all(s["rc"] == 0 for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
