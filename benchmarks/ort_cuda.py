"""python -m benchmarks.ort_cuda: ONNX Runtime CUDA inference alone, per field, for each of the settings it offers
(TF32, NHWC preference, CUDA graphs), FP32 and FP16 variants, at batch 1 and 32. Inputs and outputs stay on the
GPU (I/O binding), so only the engine is timed. Needs onnxruntime-gpu and a GPU.

examples:
  python -m benchmarks.ort_cuda --json benchmarks/results/device/ort_cuda.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import write_json

# name -> (precision, make_session's settings beyond the runtime's defaults): "runtime-<precision>[-<option>]" are
# the sessions the runtime ships (runtime/backends/ort.py: make_session; graphs are what it runs with pycuda, NHWC
# where that layout passed its gate), "-tf32" one setting away from them for comparison.
CONFIGS = {
    "runtime-fp32": ("fp32", {}),
    "runtime-fp32-tf32": ("fp32", {"extra_cuda_options": {"use_tf32": "1"}}),
    "runtime-fp16": ("fp16", {}),
    "runtime-fp16-nhwc": ("fp16", {"nhwc": True}),
    "runtime-fp16-graph": ("fp16", {"graphs": True}),
    "runtime-fp16-nhwc-graph": ("fp16", {"nhwc": True, "graphs": True}),
}


def time_config(path: Path, precision: str, settings: dict, batch: int, field_shape: tuple, runs: int) -> float:
    """Median ms per field of ``runs`` inferences of one resident batch, outputs on the device at fixed addresses
    (what a CUDA graph replays)."""
    import onnxruntime as ort

    from runtime.backends.ort import make_session

    sess = make_session(path, precision, cuda=True, **settings)
    x = ort.OrtValue.ortvalue_from_numpy(np.random.default_rng(0).normal(0, 50, (batch, *field_shape))
                                         .astype(np.float32), "cuda", 0)
    io = sess.io_binding()
    io.bind_ortvalue_input(sess.get_inputs()[0].name, x)
    for o in sess.get_outputs():
        io.bind_ortvalue_output(o.name, ort.OrtValue.ortvalue_from_shape_and_type((batch, 1), np.float32, "cuda", 0))
    for _ in range(5):
        sess.run_with_iobinding(io)
    times = []
    for _ in range(runs):
        io.synchronize_inputs()
        t0 = time.perf_counter()
        sess.run_with_iobinding(io)
        io.synchronize_outputs()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3 / batch


def time_torch(model_dir: Path, batch: int, field_shape: tuple, runs: int) -> float:
    """PyTorch's own best on the same GPU for comparison: FP16, channels-last, the whole batch as one CUDA graph."""
    import torch

    from export.weights import load_checkpoint

    model = load_checkpoint(model_dir / "weights.pt").cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(batch, *field_shape, device="cuda", dtype=torch.half)
    with torch.no_grad():
        for _ in range(3):
            model(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(x)
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3 / batch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ort_cuda", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: as runtime.classify)")
    ap.add_argument("--batches", default="1,32", help="batch sizes, comma-separated (default 1,32)")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per setting (default 20)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    from runtime.backends.ort import cuda_options
    from runtime.model.model_dir import ModelDir
    from runtime.model.paths import default_model_dir

    model = args.model or default_model_dir()
    m = ModelDir.open(model)
    out: dict = {"model": str(model), "configs": {}}
    for name, (precision, settings) in CONFIGS.items():
        try:
            path = model / m.variant(precision).file
            row = {str(b): time_config(path, precision, settings, int(b), m.contract.field_shape, args.runs)
                   for b in args.batches.split(",")}
        except Exception as e:  # ORT raises its own types (Fail, ...): a setting that cannot run is reported
            row = {"error": str(e).splitlines()[0][:300]}
        options = cuda_options(precision, settings.get("nhwc", False), settings.get("graphs", False))
        out["configs"][name] = {"precision": precision, "options": options | settings.get("extra_cuda_options", {}),
                                "ms_per_field": row}
        print(f"{name:24s} {json.dumps(row)}", flush=True)
    try:
        row = {str(b): time_torch(model, int(b), m.contract.field_shape, args.runs) for b in args.batches.split(",")}
    except Exception as e:  # no CUDA torch here: reported, not fatal
        row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    out["configs"]["pytorch-fp16-channels-last-graph"] = {"precision": "fp16", "ms_per_field": row}
    print(f"{'pytorch-fp16-cl-graph':24s} {json.dumps(row)}", flush=True)
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
