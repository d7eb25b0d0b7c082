"""The original Keras architectures (test-only reference, Keras 3 on the torch backend) and a weight copy from
our PyTorch model into them, so the two frameworks can be compared on the same weights."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from keras import layers  # noqa: E402


def feature_extractor() -> "keras.Model":
    """VGG16 -> GaussianNoise -> GlobalAveragePooling2D -> Dense(512, relu) -> BatchNormalization."""
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3))
    inp = keras.Input((224, 224, 3))
    x = layers.GaussianNoise(0.1)(base(inp))  # VGG16 nested as one layer named "vgg16", as in the original
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(512, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    return keras.Model(inp, x, name="feature_extractor")


def sequence_classifier(seq_len: int = 6, units: int = 500) -> "keras.Model":
    """Bidirectional(LSTM(500)) -> BatchNormalization -> Dense(1, sigmoid)."""
    inp = keras.Input((seq_len, 512))
    x = layers.Bidirectional(layers.LSTM(units))(inp)
    x = layers.BatchNormalization()(x)
    x = layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inp, x, name="classifier")


def copy_torch_to_keras(model, fe: "keras.Model", cls: "keras.Model") -> None:
    """Our PyTorch weights into the Keras models: OIHW -> HWIO, dense transposes, LSTM biases summed."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    convs = [layer for layer in fe.get_layer("vgg16").layers if isinstance(layer, layers.Conv2D)]
    torch_convs = sorted({k.rsplit(".", 1)[0] for k in sd if k.startswith("encoder.vgg16.layers.")},
                         key=lambda k: int(k.split(".")[-1]))
    assert len(convs) == len(torch_convs) == 13
    for kl, tk in zip(convs, torch_convs):
        kl.set_weights([sd[tk + ".weight"].transpose(2, 3, 1, 0), sd[tk + ".bias"]])
    dense, bn = [layer for layer in fe.layers if isinstance(layer, (layers.Dense, layers.BatchNormalization))]
    dense.set_weights([sd["encoder.dense.weight"].T, sd["encoder.dense.bias"]])
    bn.set_weights([sd[f"encoder.bn.{n}"] for n in ("weight", "bias", "running_mean", "running_var")])
    bi, bn2, dense2 = cls.layers[1:]
    lstm_w = []
    for sfx in ("", "_reverse"):
        lstm_w += [sd[f"head.lstm.weight_ih_l0{sfx}"].T, sd[f"head.lstm.weight_hh_l0{sfx}"].T,
                   sd[f"head.lstm.bias_ih_l0{sfx}"] + sd[f"head.lstm.bias_hh_l0{sfx}"]]
    bi.set_weights(lstm_w)
    bn2.set_weights([sd[f"head.bn.{n}"] for n in ("weight", "bias", "running_mean", "running_var")])
    dense2.set_weights([sd["head.dense.weight"].T, sd["head.dense.bias"]])


def keras_predict(fe: "keras.Model", cls: "keras.Model", fields_nchw: np.ndarray) -> np.ndarray:
    """(B, T, 3, P, P) preprocessed fields -> (B,) probabilities, the original two-model way."""
    b, t = fields_nchw.shape[:2]
    patches = fields_nchw.reshape(b * t, *fields_nchw.shape[2:]).transpose(0, 2, 3, 1)
    feats = fe.predict(patches, verbose=0, batch_size=6)
    return cls.predict(feats.reshape(b, t, -1), verbose=0).reshape(-1)
