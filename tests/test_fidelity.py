"""The FP32 parity tolerance (runtime/model/fidelity.py): relative plus absolute, on logits and probabilities, labels
identical. It passes a sound export of a steep model (large logits, where an absolute bound alone is tighter than
FP32 arithmetic), and still refuses a wrong import: swapped channels, transposed LSTM gates."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from export import onnx_export as ox
from export.model import CONTRACT
from runtime.io.decode import read_image
from runtime.model.fidelity import compare
from runtime.model.precisions import PRECISIONS
from runtime.model.preprocess import preprocess_image


def _outputs(logit):
    logit = np.asarray(logit, np.float64)
    return {"logit": logit, "probability": 1 / (1 + np.exp(-logit))}


def test_the_fp32_bound_is_relative_where_logits_are_large_and_absolute_near_zero():
    ref = _outputs([393.0, -250.0, 0.02, 3.0])
    steep = _outputs([393.0 + 1.5e-4, -250.0 - 2e-4, 0.02 + 5e-5, 3.0 - 1e-4])  # as measured: FP32 reordering
    assert compare(ref, steep, "fp32", 0.5).ok
    near_zero = _outputs([393.0, -250.0, 0.02 + 3e-4, 3.0])  # 3x the absolute part where nothing scales it
    c = compare(ref, near_zero, "fp32", 0.5)
    assert not c.ok and "logit max|d| 0.0003 beyond 0.0001 + 0.0001 |ref|" in c.reason()
    flipped = _outputs([393.0, -250.0, -1e-5, 3.0])  # within the bound, but the label changed
    assert not compare(ref, flipped, "fp32", 0.5).ok
    assert PRECISIONS["fp32"].tolerance.labels == 1.0


@pytest.fixture(scope="module")
def fields(images_100x):
    return np.stack([preprocess_image(read_image(p).bgr, CONTRACT)[0] for p in images_100x[:1]])


def _run(model, fields):
    with torch.no_grad():
        return {k: v.reshape(-1) for k, v in ox.torch_outputs(model.eval(), fields).items()}


def test_a_wrong_import_is_far_outside_the_fp32_bound(full_reference, fields):
    model = full_reference
    want = _run(model, fields)
    swapped = _run(model, np.ascontiguousarray(fields[:, :, ::-1]))  # RGB read as BGR
    gates = copy.deepcopy(model)
    with torch.no_grad():  # PyTorch's LSTM gate order is i, f, g, o; a wrong importer might take Keras' as f, i
        for name, p in gates.head.lstm.named_parameters():
            if name.startswith("weight_ih"):
                i, f, g, o = p.chunk(4)
                p.copy_(torch.cat([f, i, g, o]))
    transposed = _run(gates, fields)
    for wrong in (swapped, transposed):
        c = compare(want, wrong, "fp32", CONTRACT.threshold)
        assert not c.ok
        logit = next(o for o in c.outputs if o.output == "logit")
        assert logit.worst > 100, logit  # two orders of magnitude beyond the bound, not a borderline case
