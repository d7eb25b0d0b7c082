"""TensorRT FP16 at a full batch against the tensor-core floor: the GFLOP of a field over the GPU's dense FP16 rate
(the GPU suite's ``runtime_tensorrt_fp16`` phase reports it)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

GFLOP_PER_FIELD = 184.0  # 6 VGG16 passes at 224x224 (2 x 15.4 GMAC each) plus the head
# datasheet dense FP16 tensor rates, matched as substrings of the device name ("NVIDIA H200", ...); PCIe first
FP16_DENSE_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0}


def tensor_core_floor(variant: Any, gpu_name: str | None, tflops: float | None, batch: int = 32) -> dict:
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
    out: dict[str, Any] = {"batch": n, "ms_per_field": ms_per_field}
    if rate:
        floor = GFLOP_PER_FIELD / (rate * 1e3) * 1e3  # ms per field
        out |= {"fp16_dense_tflops": rate, "floor_ms_per_field": floor, "vs_floor": ms_per_field / floor}
    else:
        out["note"] = "pass --fp16-tflops (the GPU's dense FP16 tensor rate) for the floor"
    return out
