"""The PyTorch model is the Keras system: architecture, BatchNorm and LSTM semantics, probabilities on real images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from export.model import CONTRACT, build_model
from export.reference import reference_model
from runtime.io.decode import read_image
from runtime.model.preprocess import preprocess_image


@pytest.fixture(scope="module")
def ref(full_reference):
    return full_reference


def test_vgg16_stack_shape_and_size():
    m = build_model()
    convs = [l for l in m.encoder.vgg16.modules() if isinstance(l, torch.nn.Conv2d)]
    pools = [l for l in m.encoder.vgg16.modules() if isinstance(l, torch.nn.MaxPool2d)]
    assert len(convs) == 13 and len(pools) == 5
    # Keras VGG16(include_top=False) has 14,714,688 parameters.
    assert sum(p.numel() for p in m.encoder.vgg16.parameters()) == 14_714_688
    assert m.encoder.bn.eps == 1e-3 and m.head.bn.eps == 1e-3
    assert m.head.lstm.hidden_size == 500 and m.head.lstm.bidirectional


def test_reference_is_reproducible():
    """The same seed gives the same weights (BatchNorm statistics fitted in float64: the same on every machine);
    on the narrow model, whose seeding and fitting are the full one's code."""
    a, b = reference_model(width=0.125), reference_model(width=0.125)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    other = reference_model(seed=1, width=0.125)
    assert not torch.equal(other.encoder.dense.weight, a.encoder.dense.weight)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _keras_lstm_last(x, w_ih, w_hh, b):
    """Keras LSTM (gates i, f, c, o; sigmoid/tanh) final output, float64; independent of torch."""
    h = np.zeros((x.shape[0], w_hh.shape[1]))
    c = np.zeros_like(h)
    for t in range(x.shape[1]):
        z = x[:, t] @ w_ih.T + h @ w_hh.T + b
        i, f, g, o = np.split(z, 4, axis=1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
    return h


def test_head_matches_keras_bidirectional_semantics(ref):
    """Bidirectional(LSTM) default: [forward final output, backward final output (after reading back to t=0)]."""
    sd = {k: v.double().numpy() for k, v in ref.state_dict().items()}
    x = np.random.default_rng(1).normal(size=(3, 6, 512))
    fwd = _keras_lstm_last(x, sd["head.lstm.weight_ih_l0"], sd["head.lstm.weight_hh_l0"],
                           sd["head.lstm.bias_ih_l0"] + sd["head.lstm.bias_hh_l0"])
    bwd = _keras_lstm_last(x[:, ::-1], sd["head.lstm.weight_ih_l0_reverse"], sd["head.lstm.weight_hh_l0_reverse"],
                           sd["head.lstm.bias_ih_l0_reverse"] + sd["head.lstm.bias_hh_l0_reverse"])
    h = np.concatenate([fwd, bwd], 1)
    bn = (h - sd["head.bn.running_mean"]) / np.sqrt(sd["head.bn.running_var"] + 1e-3) * sd["head.bn.weight"] + \
        sd["head.bn.bias"]
    want = bn @ sd["head.dense.weight"].T + sd["head.dense.bias"]
    with torch.no_grad():
        got = ref.head(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_probabilities_match_keras_on_real_images(ref, images_100x):
    """The whole system on the same weights in Keras 3 (the original architectures) and in PyTorch."""
    from tests.keras_models import copy_torch_to_keras, feature_extractor, keras_predict, sequence_classifier

    fe, cls = feature_extractor(), sequence_classifier()
    copy_torch_to_keras(ref, fe, cls)
    fields = []
    for p in images_100x[::12]:
        img = read_image(p).bgr
        fields.append(preprocess_image(img, CONTRACT)[0])
    fields = np.stack(fields)
    want = keras_predict(fe, cls, fields)
    with torch.no_grad():
        got = ref(torch.from_numpy(fields))[1].numpy().reshape(-1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(set(np.round(got, 4))) == len(got)  # the comparison is not between constants
