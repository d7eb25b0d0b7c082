"""python -m export keras: the original Keras pair (.h5, written by Keras 3 itself; and rewritten the Keras 2 way)
imports without TensorFlow and the resulting ONNX model gives Keras `predict`'s probabilities on real images."""
from __future__ import annotations

import copy
import shutil

import h5py
import numpy as np
import pytest
import torch

from export.keras_h5 import KerasImportError, import_pair
from export.model import CONTRACT
from runtime.io.decode import read_image
from runtime.model.model_dir import ModelDir
from runtime.model.preprocess import preprocess_image
from runtime.pipeline.classifier import Classifier
from tests.conftest import run_module

km = pytest.importorskip("tests.keras_models")


@pytest.fixture(scope="module")
def keras_pair(tmp_path_factory, full_reference):
    """Keras models with the seeded reference's weights (the session's, copied) and BatchNorm statistics unlike the
    identity, saved as .h5."""
    fe, cls = km.feature_extractor(), km.sequence_classifier()
    ref = copy.deepcopy(full_reference)
    with torch.no_grad():  # make the statistics clearly non-trivial and different per channel
        g = torch.Generator().manual_seed(3)
        for bn in (ref.encoder.bn, ref.head.bn):
            bn.running_mean += 0.1 * torch.randn(bn.running_mean.shape, generator=g)
            bn.running_var *= torch.exp(0.2 * torch.randn(bn.running_var.shape, generator=g))
    km.copy_torch_to_keras(ref, fe, cls)
    d = tmp_path_factory.mktemp("keras")
    fe.save(d / "fe.h5")
    cls.save(d / "cls.h5")
    return fe, cls, d / "fe.h5", d / "cls.h5"


def test_imported_onnx_matches_keras_predict_on_real_images(keras_pair, images_100x, tmp_path, shared_data):
    fe, cls, fe_h5, cls_h5 = keras_pair
    out = tmp_path / "breakhis-keras"
    run_module("export", "keras", "--feature-extractor", str(fe_h5), "--classifier", str(cls_h5), "-o", str(out),
               "--parity-images", str(shared_data / "breakhis-100x"), "--parity-count", "2", "--gate-count", "2",
               "--variants", "none", check=True)
    m = ModelDir.open(out).manifest
    assert m.provenance.trained is True
    reference = ModelDir.open(out).stain_reference()  # the Keras import records the stains too (its gate folder's)
    assert "stain_reference.json" in m.files and reference is not None and reference.fields == 48
    assert set(m.provenance.source_files) == {"fe.h5", "cls.h5"} and all(len(v) == 64 for v in
                                                                        m.provenance.source_files.values())
    paths = images_100x[::16]
    fields = np.stack([preprocess_image(read_image(p).bgr, CONTRACT)[0] for p in paths])
    want = km.keras_predict(fe, cls, fields)
    with Classifier(out, backend="cpu") as clf:
        got = np.array([r.probability for r in clf.classify(paths)])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.ptp(want) > 1e-3  # the images get different answers: the comparison means something


def _as_keras2(src, dst):
    """Rewrite a Keras 3 legacy .h5 the way Keras 2.x stores weights: names end in ':0'."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for lname in f["model_weights"].attrs["layer_names"]:
            g = f["model_weights"][lname]
            names = [n.decode() if isinstance(n, bytes) else n for n in g.attrs.get("weight_names", [])]
            for n in names:
                g.move(n, n + ":0")
            if names:
                g.attrs["weight_names"] = np.array([(n + ":0").encode() for n in names])
        f.attrs["keras_version"] = "2.13.1"


def test_keras2_layout_imports_to_identical_weights(keras_pair, tmp_path):
    _, _, fe_h5, cls_h5 = keras_pair
    _as_keras2(fe_h5, tmp_path / "fe2.h5")
    _as_keras2(cls_h5, tmp_path / "cls2.h5")
    a, _ = import_pair(fe_h5, cls_h5)
    b, info = import_pair(tmp_path / "fe2.h5", tmp_path / "cls2.h5")
    assert info["keras_versions"] == ["2.13.1", "2.13.1"]
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_swapped_truncated_and_missing(keras_pair, tmp_path):
    _, _, fe_h5, cls_h5 = keras_pair
    with pytest.raises(KerasImportError, match="look swapped"):
        import_pair(cls_h5, fe_h5)
    data = fe_h5.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(KerasImportError, match="cut.h5"):
        import_pair(tmp_path / "cut.h5", cls_h5)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(KerasImportError, match="not a readable HDF5 file"):
        import_pair(tmp_path / "text.h5", cls_h5)
    keras = km.keras
    inp = keras.Input((6, 512))
    no_bn = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Bidirectional(
        keras.layers.LSTM(8))(inp)))
    no_bn.save(tmp_path / "no_bn.h5")
    with pytest.raises(KerasImportError, match="expected one BatchNormalization layer"):
        import_pair(fe_h5, tmp_path / "no_bn.h5")


def test_other_architectures_are_refused_or_adapted(keras_pair, tmp_path):
    keras = km.keras
    _, _, fe_h5, _ = keras_pair
    inp = keras.Input((6, 512))
    x = keras.layers.BatchNormalization()(keras.layers.Bidirectional(keras.layers.LSTM(16))(inp))
    small = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(x))
    small.save(tmp_path / "small.h5")
    model, info = import_pair(fe_h5, tmp_path / "small.h5")  # units are a parameter: adapted
    assert info["lstm_units"] == 16 and model.head.lstm.hidden_size == 16
    odd = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Activation("relu")(x)))
    odd.save(tmp_path / "odd.h5")
    with pytest.raises(KerasImportError, match="unsupported layer type"):
        import_pair(fe_h5, tmp_path / "odd.h5")
    img = keras.Input((224, 224, 3))
    backbone = keras.Model(img, keras.layers.Conv2D(8, 3, padding="same")(img), name="vgg16")
    y = keras.layers.BatchNormalization()(keras.layers.Dense(512, activation="relu")(
        keras.layers.GlobalAveragePooling2D()(backbone(img))))
    keras.Model(img, y).save(tmp_path / "not_vgg.h5")
    with pytest.raises(KerasImportError, match="is not VGG16"):
        import_pair(tmp_path / "not_vgg.h5", tmp_path / "small.h5")


def test_sequential_layouts_import_and_match_keras(keras_pair, images_100x, tmp_path):
    """The usual way of the original code: a feature extractor cut out of a Sequential model
    (`keras.Model(seq.inputs, seq.layers[-2].output)`, weights stored as "sequential/dense/kernel") and a Sequential
    classifier import to the same weights as the Functional pair, and give Keras `predict`'s probabilities."""
    keras = km.keras
    fe, cls, fe_h5, cls_h5 = keras_pair
    seq = keras.Sequential([keras.Input((224, 224, 3)),
                            keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3)),
                            keras.layers.GaussianNoise(0.1), keras.layers.GlobalAveragePooling2D(),
                            keras.layers.Dense(512, activation="relu"), keras.layers.BatchNormalization(),
                            keras.layers.Dense(1, activation="sigmoid")])
    cut = keras.Model(seq.inputs, seq.layers[-2].output)
    seq_cls = keras.Sequential([keras.Input((6, 512)), keras.layers.Bidirectional(keras.layers.LSTM(500)),
                                keras.layers.BatchNormalization(), keras.layers.Dense(1, activation="sigmoid")])
    weighted = [layer for layer in fe.layers if layer.weights]
    for src, dst in zip(weighted, [layer for layer in cut.layers if layer.weights]):
        dst.set_weights(src.get_weights())
    for src, dst in zip([layer for layer in cls.layers if layer.weights], seq_cls.layers):
        dst.set_weights(src.get_weights())
    cut.save(tmp_path / "cut.h5")
    seq_cls.save(tmp_path / "seq_cls.h5")
    a, _ = import_pair(fe_h5, cls_h5)
    b, _ = import_pair(tmp_path / "cut.h5", tmp_path / "seq_cls.h5")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    fields = np.stack([preprocess_image(read_image(p).bgr, CONTRACT)[0] for p in images_100x[:2]])
    with torch.no_grad():
        got = b(torch.from_numpy(fields))[1].numpy().reshape(-1)
    np.testing.assert_allclose(got, km.keras_predict(cut, seq_cls, fields), atol=1e-5)


def test_ambiguous_weight_names_are_refused(tmp_path):
    from export.keras_h5 import H5Model, _w

    m = H5Model(tmp_path / "x.h5", [], {"dense": {"a/dense/kernel": np.zeros(1), "b/dense/kernel": np.ones(1)}}, "3")
    with pytest.raises(KerasImportError, match="ambiguous"):
        _w(m, "dense", "kernel")
    assert _w(m, "dense", "b/dense/kernel")[0] == 1
