"""PyTorch model -> ONNX (dynamic batch, simplified, checked, contract in metadata), its FP16 variant, parity."""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from export.model import BreakHisNet
from runtime.manifest import Contract, Provenance

OPSET = 17  # supported by TensorRT 10's ONNX parser and ONNX Runtime >= 1.14
INPUT = "fields"
OUTPUTS = ("logit", "probability")
FP32_TOLERANCE = 1e-4  # max |logit difference| PyTorch vs ONNX Runtime, FP32
FP16_TOLERANCE = 1e-2  # max |probability difference| FP16 variant vs FP32 ONNX


def export_onnx(model: BreakHisNet, path: Path, contract: Contract, provenance: Provenance) -> onnx.ModelProto:
    """Export with a dynamic batch axis, simplify with onnxslim, check, and store the contract in metadata_props.

    Deterministic: the same weights give byte-identical files (no timestamps, sorted metadata).
    """
    import onnxslim

    p = contract.patch
    dummy = torch.zeros(1, contract.seq_len, 3, p, p)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter warns that it is legacy, and about LSTM batch sizes (our h0/c0 follow the input's
        # batch through Shape -> ConstantOfShape, which the parity check at two batch sizes confirms).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (dummy,), buf, dynamo=False,  # type: ignore[arg-type]  # accepts file objects opset_version=OPSET,
            input_names=[INPUT], output_names=list(OUTPUTS),
            dynamic_axes={name: {0: "batch"} for name in (INPUT, *OUTPUTS)},
        )
    m = onnxslim.slim(onnx.load_from_string(buf.getvalue()))
    m.producer_name, m.producer_version = "breakhis-edge export", "1"
    _set_metadata(m, {"contract": json.dumps(contract.to_dict(), sort_keys=True),
                      "trained": json.dumps(provenance.trained),
                      "weights_sha256": provenance.sha256})
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return m


def _set_metadata(m: onnx.ModelProto, props: dict[str, str]) -> None:
    del m.metadata_props[:]
    for k in sorted(props):
        m.metadata_props.add(key=k, value=props[k])


def make_fp16(src: Path, dst: Path) -> onnx.ModelProto:
    """Mixed precision for GPU runtimes: convolutions and dense layers FP16; LSTM and sigmoid FP32; float32 I/O."""
    from onnxconverter_common import float16

    m = onnx.load(str(src))
    del m.graph.value_info[:]  # stale FP32 value_info confuses the converter around the blocked LSTM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values truncated to fp16" notices for tiny weights
        f = float16.convert_float_to_float16(
            m, keep_io_types=True, op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, "LSTM", "Sigmoid"])
    _keep_outputs_float32(f)
    onnx.checker.check_model(f, full_check=True)
    onnx.save(f, str(dst))
    return f


def _keep_outputs_float32(m: onnx.ModelProto) -> None:
    """The converter casts an output computed by a blocked (FP32) op back to FP16; keep it FP32 as promised."""
    producers = {o: n for n in m.graph.node for o in n.output}
    for out in m.graph.output:
        node = producers.get(out.name)
        if node is not None and node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == onnx.TensorProto.FLOAT16:
                    a.i = onnx.TensorProto.FLOAT
        out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def fp16_structure(m: onnx.ModelProto) -> list[str]:
    """Problems with an FP16 variant's precision layout (empty list = as intended)."""
    inits = {i.name: i.data_type for i in m.graph.initializer}
    problems = []
    for io_ in [*m.graph.input, *m.graph.output]:
        if io_.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            problems.append(f"graph {io_.name} is not float32")
    for n in m.graph.node:
        weights = [i for i in n.input[1:3] if i in inits]
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            problems += [f"{n.name}: weight {w} is not float16" for w in weights if inits[w] != onnx.TensorProto.FLOAT16]
        if n.op_type == "LSTM":
            problems += [f"{n.name}: weight {w} is not float32" for w in weights if inits[w] != onnx.TensorProto.FLOAT]
    if not any(n.op_type == "LSTM" for n in m.graph.node):
        problems.append("no LSTM node found")
    return problems


@dataclass
class Parity:
    """A comparison of one output between a reference and a candidate, with its tolerance (Polygraphy-style)."""

    output: str
    max_abs: float
    median_abs: float
    tolerance: float | None
    n: int

    @property
    def ok(self) -> bool:
        return self.tolerance is None or self.max_abs <= self.tolerance

    def line(self) -> str:
        tol = "reported only" if self.tolerance is None else f"tolerance {self.tolerance:g}"
        return (f"{self.output:12s} max|d|={self.max_abs:.3e} median|d|={self.median_abs:.3e} over {self.n} fields "
                f"({tol}) {'PASS' if self.ok else 'FAIL'}")


def compare(name: str, ref: np.ndarray, got: np.ndarray, tolerance: float | None) -> Parity:
    d = np.abs(np.asarray(ref, np.float64).ravel() - np.asarray(got, np.float64).ravel())
    return Parity(name, float(d.max()), float(np.median(d)), tolerance, d.size)


def onnx_outputs(path: Path, fields: np.ndarray, batch: int = 4) -> dict[str, np.ndarray]:
    """Run an ONNX file on ONNX Runtime CPU in batches; returns each output concatenated over the batches."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [sess.run(list(OUTPUTS), {INPUT: fields[i:i + batch]}) for i in range(0, len(fields), batch)]
    return {name: np.concatenate([o[k] for o in outs]).astype(np.float32) for k, name in enumerate(OUTPUTS)}


@torch.no_grad()
def torch_outputs(model: BreakHisNet, fields: np.ndarray, batch: int = 4) -> dict[str, np.ndarray]:
    res = [model(torch.from_numpy(fields[i:i + batch])) for i in range(0, len(fields), batch)]
    return {name: torch.cat([r[k] for r in res]).numpy() for k, name in enumerate(OUTPUTS)}


def fp32_parity(model: BreakHisNet, path: Path, fields: np.ndarray) -> list[Parity]:
    """PyTorch vs ONNX Runtime CPU on the same fields; the logit gates the export. Run at batch 1 and batch 4 so
    that the dynamic batch axis (and the LSTM's batch-shaped initial state) is exercised too."""
    ref = torch_outputs(model, fields)
    one = onnx_outputs(path, fields, batch=1)
    many = onnx_outputs(path, fields, batch=4)
    return [compare("logit", ref["logit"], one["logit"], FP32_TOLERANCE),
            compare("logit@batch4", ref["logit"], many["logit"], FP32_TOLERANCE),
            compare("probability", ref["probability"], one["probability"], None)]
