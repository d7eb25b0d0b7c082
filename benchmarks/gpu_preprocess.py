"""python -m benchmarks.gpu_preprocess: the preprocessing kernel against its memory-bandwidth floor, and GPU vs CPU
preprocessing per image (upload included). Needs pycuda and a CUDA GPU.

  kernel time   CUDA events around re-launches of one batch launch (median of --launches)
  floor         (uint8 bytes read + output bytes written) / device bandwidth, bandwidth measured here by a
                device-to-device copy (2 x bytes per copy)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import write_json
from runtime.io.decode import read_image
from runtime.model.geometry import plan_image
from runtime.model.model_dir import ModelDir
from runtime.model.paths import default_model_dir
from runtime.model.preprocess import preprocess_fields


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_preprocess", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None,
                    help="model directory whose contract is used (default: as runtime.classify)")
    ap.add_argument("--batch", type=int, default=32, help="fields per kernel launch (default: 32)")
    ap.add_argument("--launches", type=int, default=200)
    ap.add_argument("--fp16", action="store_true", help="write FP16 (the TensorRT FP16 engine's input)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from runtime.gpu.context import GpuUnavailable
    from runtime.gpu.preprocessor import GpuPreprocessor
    from runtime.io.inputs import image_files

    contract = ModelDir.open(args.model or default_model_dir()).contract
    paths = image_files(args.images)
    imgs = [read_image(p).bgr for p in paths[: args.batch]]
    while len(imgs) < args.batch:  # one field per BreakHis image: repeat them to fill the batch
        imgs += imgs[: args.batch - len(imgs)]
    plans = [plan_image(i, contract) for i in imgs]
    try:
        gpu = GpuPreprocessor(contract, fp16=args.fp16)
    except GpuUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cuda = gpu.cuda
    with gpu.active():
        # Device bandwidth: a large device-to-device copy reads and writes its size once each.
        n = 512 << 20
        a, b = cuda.mem_alloc(n), cuda.mem_alloc(n)
        start, end = cuda.Event(), cuda.Event()
        cuda.memcpy_dtod(b, a, n)
        bw = []
        for _ in range(10):
            start.record()
            cuda.memcpy_dtod(b, a, n)
            end.record()
            end.synchronize()
            bw.append(2 * n / (end.time_since(start) / 1e3))
        bandwidth = float(np.median(bw))
        a.free()
        b.free()
    gpu.submit(imgs, plans)
    kernel_ms = []
    with gpu.active():
        for _ in range(args.launches):
            start.record(gpu.stream)
            gpu.kernel.prepared_async_call(*gpu.last_launch)
            end.record(gpu.stream)
            end.synchronize()
            kernel_ms.append(end.time_since(start))
    fields = sum(p.n_fields for p in plans)
    elems = fields * contract.seq_len * 3 * contract.patch ** 2
    bytes_moved = elems * (1 + (2 if args.fp16 else 4))  # each used source byte read once, each output written
    floor_ms = bytes_moved / bandwidth * 1e3
    # Per image, upload included: GPU (pack + H2D + kernel, waited for) vs the CPU path.
    gpu_ms, cpu_ms = [], []
    for img, plan in zip(imgs * 3, plans * 3):
        t0 = time.perf_counter()
        gpu.submit([img], [plan])
        with gpu.active():
            gpu.stream.synchronize()
        gpu_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        preprocess_fields(img, plan, contract)
        cpu_ms.append((time.perf_counter() - t0) * 1e3)
    gpu.close()
    res = {"device": gpu.device.name(), "arch": gpu.arch, "fp16": args.fp16, "fields": fields,
           "kernel_p50_ms": float(np.median(kernel_ms)), "bandwidth_gb_s": bandwidth / 1e9,
           "floor_ms": floor_ms, "kernel_vs_floor": float(np.median(kernel_ms)) / floor_ms,
           "gpu_preprocess_per_image_p50_ms": float(np.median(gpu_ms)),
           "cpu_preprocess_per_image_p50_ms": float(np.median(cpu_ms))}
    for k, v in res.items():
        print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
