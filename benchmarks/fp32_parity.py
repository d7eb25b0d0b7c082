"""python -m benchmarks.fp32_parity: how far apart two FP32 runtimes (PyTorch, ONNX Runtime CPU) put this network's
outputs on this CPU, on flat and steep models, against the FP32 parity tolerance (runtime/model/fidelity.py). Run it on
each kind of CPU (AVX-512, AVX2-only; ONEDNN_MAX_CPU_ISA=AVX2 makes PyTorch's oneDNN use AVX2 kernels)."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks import write_json
from export import onnx_export as ox
from export.artefacts import gate_fields
from export.model import CONTRACT
from export.reference import reference_model
from export.verify import ort_outputs
from export.weights import load_checkpoint
from runtime.model.manifest import Provenance
from runtime.model.paths import sample_images, trained_weights
from runtime.model.precisions import PRECISIONS


def models() -> dict[str, torch.nn.Module]:
    out = {"reference (flat)": reference_model()}
    weights = trained_weights() / "weights.pt"
    if weights.is_file():
        out["trained"] = load_checkpoint(weights)
        for k in (10.0, 100.0):  # a steeper output layer: larger logits, the same features
            m = load_checkpoint(weights)
            with torch.no_grad():
                m.head.dense.weight *= k
            out[f"trained, output layer x{k:g} (steep)"] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fp32_parity", description=__doc__)
    ap.add_argument("--images", type=Path, default=sample_images(), help="folder of real images (default: shared)")
    ap.add_argument("--fields", type=int, default=12, help="fields compared (default 12)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    fields = gate_fields(args.images, args.fields)[0][:args.fields]  # the first images, every field of each
    tol = PRECISIONS["fp32"].tolerance
    rows = {}
    for name, model in models().items():
        with tempfile.TemporaryDirectory() as d, torch.no_grad():
            path = Path(d) / "m.onnx"
            ox.export_onnx(model.eval(), path, CONTRACT, Provenance("parity check", "0" * 64, False))
            want = {k: v.reshape(-1) for k, v in ox.torch_outputs(model, fields).items()}
            got = ort_outputs(path, fields, batch=4)
        d_logit = np.abs(want["logit"] - got["logit"])
        rows[name] = {"max_abs_logit": float(d_logit.max()), "max_logit": float(np.abs(want["logit"]).max()),
                      "max_abs_probability": float(np.abs(want["probability"] - got["probability"]).max()),
                      "worst_of_bound": float((d_logit / (tol.logit + tol.rtol * np.abs(want["logit"]))).max())}
        print(f"{name:40s} max|d logit| {rows[name]['max_abs_logit']:.2e} (logits up to {rows[name]['max_logit']:.3g})"
              f"  worst {rows[name]['worst_of_bound']:.3f} of the bound")
    if args.json:
        write_json(args.json, {"onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
                               "fields": len(fields), "tolerance": vars(tol), "models": rows})


if __name__ == "__main__":
    main()
