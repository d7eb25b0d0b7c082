"""Static check that an ONNX graph is within what TensorRT's ONNX parser imports, without TensorRT installed.

The table holds the operators this project's exports can contain, with the restrictions stated for them in the
onnx-tensorrt operator support matrix (docs/operators.md) and the TensorRT 10 ONNX parser documentation.
An operator outside the table is reported rather than assumed to work.
"""
from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import helper

MIN_OPSET, MAX_OPSET = 9, 21  # opsets whose LSTM/Conv semantics the TensorRT 10 parser documents

Check = Callable[[onnx.NodeProto, set[str]], list[str]]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _weights_are_initializers(node: onnx.NodeProto, consts: set[str]) -> list[str]:
    return [] if len(node.input) > 1 and node.input[1] in consts else [f"{node.name}: weights W must be an initializer"]


def _pool_2d(node: onnx.NodeProto, consts: set[str]) -> list[str]:
    a = _attrs(node)
    problems = [] if len(a.get("kernel_shape", [])) in (2, 3) else [f"{node.name}: only 2D/3D pooling is supported"]
    if len(node.output) > 1 and node.output[1]:
        problems.append(f"{node.name}: the Indices output is not supported")
    return problems


def _lstm(node: onnx.NodeProto, consts: set[str]) -> list[str]:
    a = _attrs(node)
    problems = []
    if a.get("layout", 0) != 0:
        problems.append(f"{node.name}: LSTM layout must be 0 (sequence-first)")
    if a.get("input_forget", 0) != 0:
        problems.append(f"{node.name}: LSTM input_forget must be 0")
    acts = [x.decode() if isinstance(x, bytes) else x for x in a.get("activations", [])]
    if len(acts) == 6 and acts[:3] != acts[3:]:
        problems.append(f"{node.name}: bidirectional LSTM needs the same activations in both directions")
    if "clip" in a:
        problems.append(f"{node.name}: LSTM clip is not supported")
    if len(node.input) > 4 and node.input[4]:
        problems.append(f"{node.name}: LSTM sequence_lens input is not supported with dynamic shapes here")
    if any(i and i not in consts for i in node.input[1:3]):
        problems.append(f"{node.name}: LSTM weights W and R must be initializers")
    return problems


def _axes_constant(node: onnx.NodeProto, consts: set[str]) -> list[str]:
    if len(node.input) > 1 and node.input[1] and node.input[1] not in consts:
        return [f"{node.name}: {node.op_type} axes must be a constant"]
    return []


def _none(node: onnx.NodeProto, consts: set[str]) -> list[str]:
    return []


SUPPORTED: dict[str, Check] = {
    "Conv": _weights_are_initializers, "MaxPool": _pool_2d, "AveragePool": _pool_2d, "LSTM": _lstm,
    "QuantizeLinear": _none, "DequantizeLinear": _none, "Unsqueeze": _axes_constant,
    "Squeeze": _axes_constant, "Slice": _none,
    **{op: _none for op in ("Add", "BatchNormalization", "Cast", "Concat", "Constant", "ConstantOfShape", "Div",
                            "Flatten", "Gather", "Gemm", "GlobalAveragePool", "Identity", "MatMul", "Mul",
                            "ReduceMean", "Relu", "Reshape", "Shape", "Sigmoid", "Sub", "Tanh", "Transpose")},
}


def check_onnx(model: onnx.ModelProto) -> list[str]:
    """Every reason TensorRT's ONNX parser would refuse this graph (empty list: none found)."""
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        problems.append(f"opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}")
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    # Explicitly quantised weights (initializer -> DequantizeLinear) count as constant weights for the parser.
    consts |= {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts}
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        check = SUPPORTED.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if check is None:
            problems.append(f"{node.name}: operator {node.domain or 'ai.onnx'}::{node.op_type} is not in the table "
                            "of TensorRT-supported operators")
            continue
        problems += check(node, consts)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is None or any(onnx.numpy_helper.to_array(zp).ravel() != 0):
                problems.append(f"{node.name}: zero point must be a zero initializer")
    return problems
