"""The borderline re-check (runtime/pipeline/recheck.py): exactly the fields a faster tier puts inside its band are
classified again at FP32 and take FP32's answer; a re-check that fails is an error, never the fast label; the gates
judge labels outside the band. A stand-in fast tier (FP32's answers plus a known offset) makes the band's content
known; the real tiers are checked on the trained model."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from runtime.backends.ort import OrtBackend
from runtime.model.fidelity import compare
from runtime.model.model_dir import ModelDir
from runtime.model.precisions import PRECISIONS
from runtime.pipeline.classifier import Classifier
from runtime.pipeline.preprocessors import CpuPreprocessor
from runtime.pipeline.recheck import Recheck
from runtime.pipeline.scheduler import FieldScheduler

BF16_BAND = PRECISIONS["bf16"].band


class Shifted:
    """A stand-in fast tier: a real FP32 session whose probabilities come back moved by ``offset``."""

    def __init__(self, inner: OrtBackend, offset: float) -> None:
        self.inner, self.offset = inner, offset
        self.name, self.precision, self.model_file = "stand-in-bf16", "bf16", inner.model_file
        self.file_sha256, self.device_input, self.preferred_batch, self.on_gpu = inner.file_sha256, False, 1, False

    def run(self, fields: np.ndarray) -> dict[str, np.ndarray]:
        out = self.inner.run(fields)
        return out | {"probability": out["probability"] + np.float32(self.offset)}

    def close(self) -> None:
        pass


def _with_fast_tier(clf: Classifier, offset: float, opener, batch_size: int = 4) -> Recheck:
    """The classifier's stages rebuilt around the stand-in tier, with a re-check of BF16's band."""
    fast = Shifted(clf.backend, offset)
    clf.preprocessor = CpuPreprocessor(fast, clf.contract, batch_size)
    recheck = Recheck(BF16_BAND, clf.contract, opener, "onnxruntime-cpu-fp32", batch_size)
    clf.scheduler = FieldScheduler(clf.preprocessor, batch_size, clf.contract, "stand-in", recheck)
    return recheck


@pytest.fixture(scope="module")
def fp32_fields(model_dir, images_100x):
    with Classifier(model_dir, backend="cpu", precision="fp32") as clf:
        assert clf.recheck is None and clf.model_info.recheck is None  # FP32 is the reference: nothing to re-check
        results = clf.classify(images_100x)
    return np.array([f.probability for r in results for f in r.fields])


def test_exactly_the_fields_inside_the_band_are_rechecked_and_take_fp32s_answer(model_dir, images_100x,
                                                                                  fp32_fields):
    """The stand-in's probabilities are FP32's + offset, the offset putting the middle of the shared images'
    FP32 probabilities on the threshold: the fields whose fast probability lies within BF16's band are exactly the
    re-checked ones (batched 4 fields at a time, across images), each with FP32's probability and label and the
    fast one kept; every other field keeps the fast tier's answer."""
    offset = 0.5 - float(np.median(fp32_fields))
    fast = fp32_fields + np.float32(offset)
    expected = np.abs(fast - 0.5) <= BF16_BAND
    assert 0 < expected.sum() < len(fast)  # both kinds present, or the test shows nothing
    opened = []
    with Classifier(model_dir, backend="cpu", precision="fp32") as clf:
        recheck = _with_fast_tier(clf, offset, lambda: opened.append(1) or OrtBackend(ModelDir.open(model_dir)))
        results = clf.classify(images_100x)
    fields = [f for r in results for f in r.fields]
    assert [f.rechecked for f in fields] == list(expected) and recheck.fields == expected.sum() and opened == [1]
    for f, want, quick in zip(fields, fp32_fields, fast):
        if f.rechecked:
            assert f.probability == pytest.approx(want, abs=1e-6)
            assert f.fast_probability == pytest.approx(quick, abs=1e-6)
            assert f.label == clf.contract.label(float(want))
        else:
            assert f.probability == pytest.approx(quick, abs=1e-6) and f.fast_probability is None
    assert sum(r.rechecked for r in results) == expected.sum()
    assert results[int(np.flatnonzero(expected)[0])].to_dict()["rechecked"] == 1


def test_with_an_offset_within_the_bound_every_label_is_fp32s(model_dir, images_100x, fp32_fields):
    """A stand-in that keeps BF16's bound (|offset| < band) but moves fields across the threshold: without the
    re-check some labels differ from FP32's; with it none do, on every field and image."""
    for offset_sign in (1, -1):
        offset = offset_sign * 0.9 * BF16_BAND
        centre = 0.5 - offset / 2 - float(np.median(fp32_fields))  # shift the model's answers to straddle 0.5
        fp32 = fp32_fields + np.float32(centre)
        labels = {}
        for recheck in ("off", "on"):
            with Classifier(model_dir, backend="cpu", precision="fp32") as clf:
                # the "FP32" here is the same session moved by ``centre``: the reference the stand-in stays near
                _with_fast_tier(clf, centre + offset, lambda: Shifted(OrtBackend(ModelDir.open(model_dir)), centre))
                if recheck == "off":
                    clf.scheduler.recheck = None
                labels[recheck] = [f.label for r in clf.classify(images_100x) for f in r.fields]
        want = [clf.contract.label(float(p)) for p in fp32]
        assert labels["off"] != want and labels["on"] == want


def test_a_recheck_that_fails_is_an_error_never_the_fast_label(model_dir, images_100x, fp32_fields):
    """A reference that cannot open, or that answers NaN: each image with a field in the band gets an error naming
    the re-check; the others keep their results."""
    offset = 0.5 - float(np.median(fp32_fields))
    inside = np.abs(fp32_fields + np.float32(offset) - 0.5) <= BF16_BAND

    class NaNs(Shifted):
        def run(self, fields):
            return {k: np.full(len(fields), np.nan, np.float32) for k in ("logit", "probability")}

    def refuse():
        raise RuntimeError("no FP32 session here")

    for opener, why in [(refuse, "no FP32 session here"),
                        (lambda: NaNs(OrtBackend(ModelDir.open(model_dir)), 0.0), "non-finite")]:
        with Classifier(model_dir, backend="cpu", precision="fp32") as clf:
            _with_fast_tier(clf, offset, opener)
            results = clf.classify(images_100x)
        for r, bad in zip(results, inside):
            assert (r.error is not None) == bad and (r.label is None) == bad
            if bad:
                assert "re-check band" in r.error and why in r.error and r.path in r.error


def test_gate_judges_labels_outside_the_band_and_counts_the_fields_inside():
    """A flip inside the band is re-checked at run time (counted, not a failure); one outside fails the gate."""
    ref = np.array([0.10, 0.49, 0.51, 0.90])
    inside_flip = np.array([0.10, 0.505, 0.51, 0.90])  # 0.49 -> 0.505: across 0.5, within 0.03
    c = compare({"probability": ref}, {"probability": inside_flip}, "bf16", 0.5)
    assert c.ok and (c.in_band, c.in_band_flips, c.flips) == (2, 1, 0) and c.recheck_share == 0.5
    assert c.summary()["in_band"] == 2 and any("re-check" in line for line in c.lines())
    outside_flip = np.array([0.10, 0.49, 0.51, 0.45])  # 0.90 -> 0.45: a flip (and beyond the bound)
    c = compare({"probability": ref}, {"probability": outside_flip}, "bf16", 0.5)
    assert not c.ok and c.flips == 1 and "label flips" in c.reason()
    exact = compare({"probability": ref}, {"probability": inside_flip}, "fp32", 0.5)  # FP32 has no band
    assert not exact.ok and exact.in_band == 0 and exact.flips == 1


def _borderline(clf: Classifier, images: list, want: list) -> list[np.ndarray]:
    """Fields made to sit on the threshold: blends of a benign-looking and a malignant-looking shared image (two
    pairs), the blend weight bisected at FP32 until |p - threshold| < 0.002."""
    order, t, out = np.argsort(want), clf.contract.threshold, []
    for lo_i, hi_i in [(order[0], order[-1]), (order[1], order[-2])]:
        lo, hi = (cv2.imread(str(images[i]))[:448, :672] for i in (lo_i, hi_i))
        a, b = 0.0, 1.0
        for _ in range(24):
            img = cv2.addWeighted(lo, 1 - (a + b) / 2, hi, (a + b) / 2, 0)
            p = clf.classify([img])[0].probability
            if abs(p - t) < 0.002:
                out.append(img)
                break
            a, b = ((a + b) / 2, b) if p < t else (a, (a + b) / 2)
    assert out, "no blend of the shared images lies on the threshold"
    return out


def test_trained_model_labels_equal_fp32_on_every_shared_image_with_the_recheck(trained_dir, images_100x):
    """The trained model's faster tier here (auto: FP16 on a GPU, BF16 on OpenVINO where this CPU has native BF16):
    with the re-check on, every field's and image's label is FP32's on the 48 shared images and on fields made to
    sit on the threshold, each of which is re-checked; a re-checked field's probability is FP32's."""
    with Classifier(trained_dir) as clf:
        if clf.backend.precision == "fp32":
            pytest.skip(f"no faster tier on this machine ({'; '.join(clf.model_info.backend_notes)})")
    with Classifier(trained_dir, backend="cpu", precision="fp32") as ref:
        want = ref.classify(images_100x)
        edge = _borderline(ref, images_100x, [r.probability for r in want])
        want += ref.classify(edge)
    with Classifier(trained_dir) as clf:
        got = clf.classify([*images_100x, *edge])
        assert clf.recheck is not None and f"within {clf.recheck.band:.3g} of" in str(clf.model_info.recheck)
    for a, b in zip(got, want):
        assert a.error is None and a.label == b.label
        for fa, fb in zip(a.fields, b.fields):
            assert fa.label == fb.label
            if fa.rechecked:
                assert fa.probability == pytest.approx(fb.probability, abs=1e-4)
    assert all(r.rechecked == len(r.fields) for r in got[len(images_100x):])  # on the threshold: always re-checked


def test_int8_is_kept_only_where_its_effective_time_beats_the_best_tier():
    """INT8's verdict weighs its own time plus its re-check share at FP32's time against the best other tier."""
    from export.int8 import _round_up, verdict

    ref = np.array([0.10, 0.45, 0.52, 0.90])
    c = compare({"probability": ref}, {"probability": ref + 0.01}, "int8", 0.5, bound=0.1)
    assert c.ok and c.band == 0.1 and c.in_band == 2  # 0.46 and 0.53 lie within 0.1 of 0.5
    fast = {"ms_per_field": {"int8": 100.0, "fp32": 400.0}, "best_other": "fp32", "best_other_ms": 400.0}
    assert verdict(c, fast) == "" and fast["effective_ms"] == 300.0  # 100 + 50 % x 400
    slow = {"ms_per_field": {"int8": 250.0, "fp32": 400.0}, "best_other": "fp32", "best_other_ms": 400.0}
    assert verdict(c, slow).startswith("slower than fp32 here counting its re-checks: 450 ms per field")
    failing = compare({"probability": ref}, {"probability": ref + 0.2}, "int8", 0.5, bound=0.1)
    assert verdict(failing, fast) == failing.reason() != ""
    assert verdict(failing, slow | {"best_other_ms": 200.0}).startswith(failing.reason() + "; slower than fp32")
    assert (_round_up(0.0123), _round_up(0.78), _round_up(0.3)) == (0.013, 0.78, 0.3)
