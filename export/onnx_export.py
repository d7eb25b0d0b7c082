"""PyTorch model -> ONNX (dynamic batch, simplified, checked, contract in metadata), its FP16 variant, parity."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from export.model import BreakHisNet
from export.verify import OUTPUTS  # one definition, in the torch-free module
from runtime.model.manifest import Contract, Provenance

OPSET = 17  # supported by TensorRT 10's ONNX parser and ONNX Runtime >= 1.14
INPUT = "fields"
FP16_OPS = ("Conv", "Relu", "MaxPool")  # the convolution chain: float16 in the FP16 variant

def export_onnx(model: BreakHisNet, path: Path, contract: Contract, provenance: Provenance) -> onnx.ModelProto:
    """Export with a dynamic batch axis, simplify with onnxslim, check, and store the contract in metadata_props.

    Deterministic: the same weights give byte-identical files (no timestamps, sorted metadata).
    """
    import onnxslim

    dummy = torch.zeros(1, *contract.field_shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter warns that it is legacy, and about LSTM batch sizes (our h0/c0 follow the input's
        # batch through Shape -> ConstantOfShape, which the parity check at two batch sizes confirms).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (dummy,), buf, dynamo=False, opset_version=OPSET,  # type: ignore[arg-type]
            input_names=[INPUT], output_names=list(OUTPUTS),
            dynamic_axes={name: {0: "batch"} for name in (INPUT, *OUTPUTS)},
        )
    m = without_shape_arithmetic(onnxslim.slim(onnx.load_from_string(buf.getvalue())))
    m.producer_name, m.producer_version = "breakhis-edge export", "1"
    _set_metadata(m, {"contract": json.dumps(contract.to_dict(), sort_keys=True),
                      "trained": json.dumps(provenance.trained),
                      "weights_sha256": provenance.sha256})
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return m


SHAPE_OPS = ("Shape", "Gather", "ConstantOfShape", "Unsqueeze", "Squeeze", "Size")  # what ONNX Runtime puts on the CPU


def without_shape_arithmetic(m: onnx.ModelProto) -> onnx.ModelProto:
    """The LSTM's initial states left to ONNX's default (zeros, the spec's value for an absent initial_h /
    initial_c) instead of zeros built from the input's shape, its unused full-sequence output dropped, and the nodes
    that only fed them removed: nothing left that ONNX Runtime must compute on the CPU between GPU kernels (which
    keeps CUDA graphs from capturing the model)."""
    g = m.graph
    consumed = {name for n in g.node for name in n.input} | {o.name for o in g.output}
    for n in g.node:
        if n.op_type != "LSTM":
            continue
        for k in (5, 6):  # initial_h, initial_c
            if len(n.input) > k and n.input[k] and _zeros(g, n.input[k]):
                n.input[k] = ""
        while n.input and not n.input[-1]:
            n.input.pop()
        for k, out in enumerate(n.output):  # Y (every step's state) and Y_c (the last cell state): unused
            if out not in consumed:
                n.output[k] = ""
        while n.output and not n.output[-1]:
            n.output.pop()
    while True:  # dead nodes: outputs nobody reads
        live = {name for n in g.node for name in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o and o in live for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {name for n in g.node for name in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return m


def _zeros(g: onnx.GraphProto, name: str) -> bool:
    """Whether ``name`` is made by a ConstantOfShape of value 0 (or of its default, which is 0)."""
    node = next((n for n in g.node if name in n.output), None)
    if node is None or node.op_type != "ConstantOfShape":
        return False
    value = next((a for a in node.attribute if a.name == "value"), None)
    return value is None or not numpy_helper.to_array(value.t).any()


def _set_metadata(m: onnx.ModelProto, props: dict[str, str]) -> None:
    del m.metadata_props[:]
    for k in sorted(props):
        m.metadata_props.add(key=k, value=props[k])


def make_fp16(src: Path, dst: Path) -> onnx.ModelProto:
    """The FP16 variant: the convolution chain (Conv, ReLU, MaxPool from the first Conv to the last MaxPool) in
    float16, everything after it (global average pool, Dense, BatchNorm, LSTM, sigmoid) in float32, float32 I/O.

    The casts are placed here, by hand, at the two boundaries of the chain: a BatchNorm whose statistics were
    rescaled, or a sum over 49 pooled values, does not belong in float16, and converters that block ops by type
    could not express this layout on this graph.
    """
    m = onnx.load(str(src))
    g = m.graph
    nodes = list(g.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    pools = [i for i, n in enumerate(nodes) if n.op_type == "MaxPool"]
    if not convs or not pools:
        raise ValueError(f"{src}: no convolution chain found")
    region = {i for i in range(convs[0], pools[-1] + 1) if nodes[i].op_type in FP16_OPS}
    produced = {o for i in region for o in nodes[i].output}
    inits = {t.name: t for t in g.initializer}
    half: dict[str, str] = {}  # float32 tensor name -> its float16 twin
    new_nodes: list[onnx.NodeProto] = []
    for i, n in enumerate(nodes):
        if i in region:
            for k, name in enumerate(n.input):
                if name in produced or not name:
                    continue
                if name not in half:
                    half[name] = f"{name}_fp16"
                    if name in inits:
                        arr = numpy_helper.to_array(inits[name]).astype(np.float16)
                        g.initializer.append(numpy_helper.from_array(arr, half[name]))
                    else:
                        new_nodes.append(helper.make_node("Cast", [name], [half[name]], to=onnx.TensorProto.FLOAT16,
                                                               name=f"{name}/CastToFp16"))
                n.input[k] = half[name]
        else:  # a float32 consumer of the chain's output reads its float32 twin
            for k, name in enumerate(n.input):
                if name in produced:
                    n.input[k] = f"{name}_fp32"
        new_nodes.append(n)
        if i in region:
            for out in n.output:
                if any(out in nodes[j].input for j in range(len(nodes)) if j not in region):
                    new_nodes.append(helper.make_node("Cast", [out], [f"{out}_fp32"], to=onnx.TensorProto.FLOAT,
                                                           name=f"{out}/CastToFp32"))
    del g.node[:]
    g.node.extend(new_nodes)
    used = {name for n in g.node for name in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.value_info[:]
    f = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    onnx.checker.check_model(f, full_check=True)
    onnx.save(f, str(dst))
    return f


def fp16_structure(m: onnx.ModelProto) -> list[str]:
    """Problems with an FP16 variant's precision layout (empty list = as intended)."""
    inits = {i.name: i.data_type for i in m.graph.initializer}
    problems = []
    for io_ in [*m.graph.input, *m.graph.output]:
        if io_.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            problems.append(f"graph {io_.name} is not float32")
    for n in m.graph.node:
        weights = [i for i in n.input[1:3] if i in inits]
        want = onnx.TensorProto.FLOAT16 if n.op_type == "Conv" else onnx.TensorProto.FLOAT
        if n.op_type in ("Conv", "Gemm", "MatMul", "LSTM", "BatchNormalization"):
            problems += [f"{n.name}: weight {w} is not {onnx.TensorProto.DataType.Name(want).lower()}"
                         for w in weights if inits[w] != want]
    if not any(n.op_type == "LSTM" for n in m.graph.node):
        problems.append("no LSTM node found")
    return problems


def conv_outputs(m: onnx.ModelProto) -> list[str]:
    """Names of the convolution outputs, in graph order (the k-th is the k-th Conv2d of the VGG16 chain)."""
    return [n.output[0] for n in m.graph.node if n.op_type == "Conv"]


@torch.no_grad()
def torch_outputs(model: BreakHisNet, fields: np.ndarray, batch: int = 4) -> dict[str, np.ndarray]:
    res = [model(torch.from_numpy(fields[i:i + batch])) for i in range(0, len(fields), batch)]
    return {name: torch.cat([r[k] for r in res]).numpy() for k, name in enumerate(OUTPUTS)}
