"""ONNX Runtime INT8 recipes tried on the trained model, each gated like a shipped variant (every field of every
shared image vs FP32, the one tolerance table) and timed on ONNX Runtime CPU at batch 1. Research record: none keeps
every label; NNCF's accuracy-controlled recipe (export/int8.py) replaced them in the export, and its run on the
trained model is recorded beside these (benchmarks/results/int8-nncf-trained-2026-12-02.log); docs/models.md has
both.

  python -m benchmarks.int8_trials --json benchmarks/results/int8-trials.json --record models/breakhis-scratch-v1
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from benchmarks import write_json
from export import onnx_export as ox
from export import range_safe as rs
from export.model import CONTRACT, BreakHisNet
from export.verify import ort_outputs
from export.weights import load_checkpoint
from runtime.io.fields import folder_fields
from runtime.model.fidelity import compare
from runtime.model.manifest import Provenance, sha256_file
from runtime.model.model_dir import ModelDir
from runtime.model.paths import sample_images, trained_weights


@torch.no_grad()
def channel_maxima(model: BreakHisNet, fields: np.ndarray) -> list[np.ndarray]:
    """Per output channel, the max activation after each convolution's ReLU over all fields."""
    acts: list = [None] * 13
    hooks = [conv.register_forward_hook(lambda _m, _i, out, k=k: acts.__setitem__(
        k, out.clamp(min=0).amax(dim=(0, 2, 3)) if acts[k] is None else
        torch.maximum(acts[k], out.clamp(min=0).amax(dim=(0, 2, 3)))))
        for k, (_, conv) in enumerate(rs.convs(model))]
    for i in range(0, len(fields), 4):
        model(torch.from_numpy(fields[i:i + 4]))
    for h in hooks:
        h.remove()
    return [a.numpy().astype(np.float64) for a in acts]


@torch.no_grad()
def equalise(model: BreakHisNet, acts: list[np.ndarray], alpha: float) -> BreakHisNet:
    """Per-channel scaling between consecutive layers (SmoothQuant-style, s = a^alpha / w^(1-alpha)): convolution
    k's output channel c divided by s_c, the next layer's input channel c multiplied by it. Exact through ReLU and
    max-pool (positive scales), like the FP16 rescaling."""
    out = copy.deepcopy(model)
    convs = rs.convs(out)
    for k, (_, conv) in enumerate(convs):
        nxt = convs[k + 1][1].weight if k + 1 < len(convs) else out.encoder.dense.weight
        w = (nxt.abs().amax(dim=(0, 2, 3)) if nxt.dim() == 4 else nxt.abs().amax(dim=0)).numpy().astype(np.float64)
        live = (acts[k] > 0) & (w > 0)  # a channel never active on the calibration fields is left alone
        s = np.ones_like(w)
        s[live] = acts[k][live] ** alpha / w[live] ** (1 - alpha)
        s[live] /= np.exp(np.mean(np.log(s[live])))
        st = torch.from_numpy(s.astype(np.float32))
        conv.weight.div_(st[:, None, None, None])
        assert conv.bias is not None  # VGG16 convolutions have biases
        conv.bias.div_(st)
        nxt.mul_(st[None, :, None, None] if nxt.dim() == 4 else st[None, :])
    return out


def trial(name: str, model: BreakHisNet, fields: np.ndarray, ref: dict, work: Path, symmetric: bool = True,
          fp32_convs: tuple[int, ...] = ()) -> dict:
    """One recipe: convolutions quantised except those numbered in ``fp32_convs`` (0-12)."""
    fp32, q = work / f"{name}.onnx", work / f"{name}.int8.onnx"
    ox.export_onnx(model, fp32, CONTRACT, Provenance(source="int8 trial", sha256="-", trained=True))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(fields[i:i + 1] for i in range(len(fields)))

        def get_next(self) -> dict | None:
            x = next(self.it, None)
            return None if x is None else {"fields": x}

    convs = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"]
    exclude = [convs[i] for i in fp32_convs]
    quantize_static(str(fp32), str(q), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, op_types_to_quantize=["Conv"], nodes_to_exclude=exclude,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    got = ort_outputs(q, fields)
    c = compare({k: ref[k] for k in ox.OUTPUTS}, {k: got[k] for k in ox.OUTPUTS}, "int8", CONTRACT.threshold, name)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
    times = []
    for i in range(7):
        t0 = time.perf_counter()
        sess.run(None, {"fields": fields[i % len(fields):i % len(fields) + 1]})
        times.append(time.perf_counter() - t0)
    return {"recipe": name, "fields": c.fields, "flips": c.flips, "probability_max_abs": c.outputs[1].max_abs,
            "passes_gate": c.ok, "ms_per_field": float(np.median(times[1:]) * 1e3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the table here as JSON")
    ap.add_argument("--record", type=Path, default=None, metavar="MODEL_DIR",
                    help="also record the trials in that export of the same weights (its export_report.json): "
                         "`--precision int8` then names them when it refuses")
    args = ap.parse_args()
    if args.record is not None and ModelDir.open(args.record).manifest.provenance.sha256 != sha256_file(
            trained_weights() / "weights.pt"):
        ap.error(f"--record {args.record}: not an export of {trained_weights() / 'weights.pt'}")
    torch.set_num_threads(2)
    model = load_checkpoint(trained_weights() / "weights.pt").eval()
    fields = folder_fields(sample_images(), CONTRACT)  # calibrated and gated on all of them: the best case
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ox.export_onnx(model, work / "ref.onnx", CONTRACT, Provenance(source="ref", sha256="-", trained=True))
        ref = ort_outputs(work / "ref.onnx", fields)
        acts = channel_maxima(model, fields)
        runs: list[tuple[str, BreakHisNet, dict[str, Any]]] = [
                ("minmax, per-channel weights, convolutions only", model, {}),
                ("the same, first convolution kept FP32", model, {"fp32_convs": (0,)}),
                ("the same, blocks 4-5 kept FP32 (where the spread is)", model, {"fp32_convs": tuple(range(7, 13))}),
                ("the same, asymmetric uint8 activations", model, {"symmetric": False}),
                ("channel equalisation alpha 0.5", equalise(model, acts, 0.5), {}),
                ("channel equalisation alpha 0.75", equalise(model, acts, 0.75), {}),
                ("channel equalisation alpha 0.5, uint8 activations", equalise(model, acts, 0.5),
                 {"symmetric": False})]
        for i, (name, m, kw) in enumerate(runs):
            rows.append(trial(f"t{i}", m, fields, ref, work, **kw) | {"recipe": name})
            print(json.dumps(rows[-1]), flush=True)
    table = {"fields": len(fields), "trials": rows}
    write_json(args.json, table)
    if args.record is not None:
        model = ModelDir.open(args.record)
        if any(r["passes_gate"] for r in rows):
            model.write_report(model.report() | {"int8_trials": table})
        else:
            best = min(rows, key=lambda r: r["flips"])
            model.reject("int8", f"none of {len(rows)} INT8 recipes kept every label on {len(fields)} fields (fewest "
                         f"flips: {best['flips']}, {best['recipe']}); see int8_trials in export_report.json",
                         int8_trials=table)


if __name__ == "__main__":
    main()
