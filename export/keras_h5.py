"""Import the original Keras pair (feature extractor .h5 + LSTM classifier .h5) without TensorFlow.

Both files are read with h5py, using their own ``model_config`` JSON and ``layer_names`` / ``weight_names``
attributes (never positions), for Keras 2.x files (weights named ``kernel:0``, VGG16 nested as a functional
``vgg16`` layer) and Keras 3's legacy HDF5 writer (``kernel``). Weight layouts are converted for PyTorch: conv
HWIO -> OIHW, dense kernels transposed, LSTM kernels transposed with the Keras gate order (i, f, c, o) kept, which
is PyTorch's (i, f, g, o); Keras has one LSTM bias, PyTorch two, so the second is zero.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.model import BN_EPS, CONTRACT, VGG16_BLOCKS, BreakHisNet
from runtime.errors import BreakhisError

IGNORED = {"InputLayer", "GaussianNoise", "Dropout", "GaussianDropout", "SpatialDropout2D"}  # identity at inference


class KerasImportError(BreakhisError):
    """The files are not the expected Keras pair; the message names the file and what is wrong."""


@dataclass
class H5Model:
    path: Path
    layers: list[dict[str, Any]]  # model_config layers: {"class_name", "config"}
    weights: dict[str, dict[str, np.ndarray]]  # layer name -> {weight path inside the layer (no ':0'): array}
    keras_version: str


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def read_h5(path: Path) -> H5Model:
    import h5py

    path = Path(path)
    if not path.is_file():
        raise KerasImportError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise KerasImportError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {e}") from None
    with f:
        if "model_config" not in f.attrs:
            raise KerasImportError(f"{path}: no model_config attribute: not a Keras model saved with model.save()")
        config = json.loads(_s(f.attrs["model_config"]))
        version = _s(f.attrs.get("keras_version", "unknown"))
        group = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in group.attrs:
            raise KerasImportError(f"{path}: no layer_names attribute: not a Keras HDF5 weights layout")
        weights: dict[str, dict[str, np.ndarray]] = {}
        try:
            for lname in map(_s, group.attrs["layer_names"]):
                g = group[lname]
                weights[lname] = {}
                for wname in map(_s, g.attrs.get("weight_names", [])):
                    inner = wname.split(":")[0]
                    inner = inner[len(lname) + 1:] if inner.startswith(lname + "/") else inner
                    weights[lname][inner] = np.asarray(g[wname])
        except (KeyError, OSError) as e:
            raise KerasImportError(f"{path}: weights cannot be read (truncated or corrupt file?): {e}") from None
    layers = config.get("config", {}).get("layers")
    if not isinstance(layers, list):
        raise KerasImportError(f"{path}: model_config has no layer list ({config.get('class_name')})")
    return H5Model(path, layers, weights, version)


def _by_class(m: H5Model, kind: str) -> list[dict[str, Any]]:
    return [layer for layer in m.layers if layer["class_name"] == kind]


def _one(m: H5Model, kind: str, role: str) -> dict[str, Any]:
    found = _by_class(m, kind)
    if len(found) != 1:
        raise KerasImportError(f"{m.path}: expected one {kind} layer ({role}), found {len(found)}")
    return found[0]["config"]


def _check_known(m: H5Model, known: set[str]) -> None:
    unknown = sorted({layer["class_name"] for layer in m.layers} - known - IGNORED)
    if unknown:
        raise KerasImportError(f"{m.path}: unsupported layer type(s) {', '.join(unknown)}; this importer maps the "
                               "VGG16-BiLSTM architecture only")


def _w(m: H5Model, layer: str, name: str) -> np.ndarray:
    """A layer's weight by its layer-relative name ("kernel", "block1_conv1/kernel"). Saving Keras versions prefix
    the stored paths differently ("kernel:0", "dense/kernel:0", "sequential/dense/kernel"), so a stored path
    matches when it is the name or ends with "/" + name; more than one match is refused as ambiguous."""
    stored = m.weights.get(layer, {})
    found = [p for p in stored if p == name or p.endswith("/" + name)]
    if len(found) == 1:
        return stored[found[0]]
    have = ", ".join(sorted(stored)) or "none"
    if found:
        raise KerasImportError(f"{m.path}: layer {layer!r}: weight {name!r} is ambiguous ({', '.join(found)})")
    raise KerasImportError(f"{m.path}: layer {layer!r} has no weight {name!r} (it has: {have})")


def _bn(m: H5Model, layer: str) -> list[np.ndarray]:
    return [_w(m, layer, n) for n in ("gamma", "beta", "moving_mean", "moving_variance")]


def _lstm_base(m: H5Model, layer: str, direction: str) -> str:
    """Weight-path prefix of one LSTM cell: "forward_lstm/lstm_cell/" (Keras 2 and 3), "lstm_cell/" (plain)."""
    for p in m.weights.get(layer, {}):
        if p.split("/")[-1] == "kernel" and direction in p:
            return p[: -len("kernel")]
    raise KerasImportError(f"{m.path}: layer {layer!r} has no {direction or 'LSTM'} kernel")


def import_pair(fe_path: Path, cls_path: Path) -> tuple[BreakHisNet, dict[str, Any]]:
    """The PyTorch model holding the Keras weights, and what was read from the configs."""
    fe, cls = read_h5(fe_path), read_h5(cls_path)
    if _by_class(fe, "Bidirectional") or _by_class(fe, "LSTM"):
        raise KerasImportError(f"{fe.path}: has an LSTM: this is the classifier; pass it as --classifier "
                               "(the two files look swapped)")
    if not any(layer["class_name"] in ("Functional", "Model", "Conv2D") for layer in fe.layers):
        raise KerasImportError(f"{fe.path}: has no VGG16 convolutions: not the feature extractor")
    if _by_class(cls, "Functional") or _by_class(cls, "Conv2D"):
        raise KerasImportError(f"{cls.path}: has convolutions: this is the feature extractor; pass it as "
                               "--feature-extractor (the two files look swapped)")
    _check_known(fe, {"Functional", "Model", "GlobalAveragePooling2D", "Dense", "BatchNormalization"})
    _check_known(cls, {"Bidirectional", "LSTM", "BatchNormalization", "Dense"})

    vgg = next((layer for layer in fe.layers if layer["class_name"] in ("Functional", "Model")), None)
    if vgg is None:
        raise KerasImportError(f"{fe.path}: the VGG16 backbone must be a nested model layer")
    convs = [layer["config"] for layer in vgg["config"]["layers"] if layer["class_name"] == "Conv2D"]
    want = [c for block in VGG16_BLOCKS for c in block]
    got = [c.get("filters") for c in convs]
    if got != want or any(tuple(c.get("kernel_size", ())) != (3, 3) or c.get("padding") != "same" for c in convs):
        raise KerasImportError(f"{fe.path}: backbone {vgg['config'].get('name')!r} is not VGG16 (conv filters {got}); "
                               "other backbones are not supported")
    dense = _one(fe, "Dense", "Dense(512, relu) after pooling")
    if dense.get("activation") != "relu" or dense.get("units") != 512:
        raise KerasImportError(f"{fe.path}: expected Dense(512, relu), found Dense({dense.get('units')}, "
                               f"{dense.get('activation')})")
    fe_bn = _one(fe, "BatchNormalization", "after the dense layer")
    _one(fe, "GlobalAveragePooling2D", "pooling")

    bi = _by_class(cls, "Bidirectional")
    lstm_cfg = bi[0]["config"]["layer"]["config"] if bi else _one(cls, "LSTM", "sequence model")
    if bi and bi[0]["config"].get("merge_mode", "concat") != "concat":
        raise KerasImportError(f"{cls.path}: Bidirectional merge_mode must be 'concat'")
    if lstm_cfg.get("return_sequences"):
        raise KerasImportError(f"{cls.path}: LSTM return_sequences=True is not the original architecture")
    for key, val in (("activation", "tanh"), ("recurrent_activation", "sigmoid")):
        if lstm_cfg.get(key, val) != val:
            raise KerasImportError(f"{cls.path}: LSTM {key} {lstm_cfg.get(key)!r} unsupported (needs {val!r})")
    units = int(lstm_cfg["units"])
    head_bn = _one(cls, "BatchNormalization", "after the LSTM")
    out = _one(cls, "Dense", "Dense(1, sigmoid)")
    if out.get("units") != 1 or out.get("activation") != "sigmoid":
        raise KerasImportError(f"{cls.path}: expected Dense(1, sigmoid), found Dense({out.get('units')}, "
                               f"{out.get('activation')})")

    model = BreakHisNet(CONTRACT, units=units, bidirectional=bool(bi)).eval()
    sd: dict[str, np.ndarray] = {}
    vname = vgg["config"]["name"]
    k = 0
    for i, conv in enumerate(convs):
        while not isinstance(model.encoder.vgg16.layers[k], torch.nn.Conv2d):
            k += 1
        sd[f"encoder.vgg16.layers.{k}.weight"] = _w(fe, vname, f"{conv['name']}/kernel").transpose(3, 2, 0, 1)
        sd[f"encoder.vgg16.layers.{k}.bias"] = _w(fe, vname, f"{conv['name']}/bias")
        k += 1
    sd["encoder.dense.weight"] = _w(fe, dense["name"], "kernel").T
    sd["encoder.dense.bias"] = _w(fe, dense["name"], "bias")
    for prefix, (layer, cfg) in (("encoder.bn", (fe, fe_bn)), ("head.bn", (cls, head_bn))):
        g, b, mu, var = _bn(layer, cfg["name"])
        sd.update({f"{prefix}.weight": g, f"{prefix}.bias": b, f"{prefix}.running_mean": mu,
                   f"{prefix}.running_var": var})
    lname = bi[0]["config"]["name"] if bi else lstm_cfg["name"]
    for sfx, direction in ([("", "forward"), ("_reverse", "backward")] if bi else [("", "")]):
        base = _lstm_base(cls, lname, direction)
        sd[f"head.lstm.weight_ih_l0{sfx}"] = _w(cls, lname, f"{base}kernel").T
        sd[f"head.lstm.weight_hh_l0{sfx}"] = _w(cls, lname, f"{base}recurrent_kernel").T
        bias = _w(cls, lname, f"{base}bias")
        sd[f"head.lstm.bias_ih_l0{sfx}"] = bias
        sd[f"head.lstm.bias_hh_l0{sfx}"] = np.zeros_like(bias)
    sd["head.dense.weight"] = _w(cls, out["name"], "kernel").T
    sd["head.dense.bias"] = _w(cls, out["name"], "bias")

    expected = model.state_dict()
    shapes = [f"{key}: Keras {v.shape} vs model {tuple(expected[key].shape)}" for key, v in sd.items()
              if key in expected and tuple(v.shape) != tuple(expected[key].shape)]
    missing = sorted(set(expected) - set(sd) - {k for k in expected if k.endswith("num_batches_tracked")})
    if shapes or missing:
        raise KerasImportError(f"{fe.path} + {cls.path}: weights do not fit:\n  " + "\n  ".join(shapes + missing))
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in sd.items()},
                          strict=False)
    model.set_bn_eps(float(fe_bn.get("epsilon", BN_EPS)), float(head_bn.get("epsilon", BN_EPS)))
    info = {"lstm_units": units, "bidirectional": bool(bi), "keras_versions": [fe.keras_version, cls.keras_version],
            "bn_epsilon": [model.encoder.bn.eps, model.head.bn.eps]}
    return model.eval(), info
