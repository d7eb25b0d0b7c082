"""The borderline re-check (runtime/pipeline/recheck.py): exactly the fields a faster tier puts inside its band are
classified again at FP32 and take FP32's answer; a re-check that fails is an error, never the fast label; the gates
judge labels outside the band. A stand-in fast tier (FP32's answers plus a known offset) makes the band's content
known; the real tiers are checked on the trained model."""
from __future__ import annotations

import threading
from dataclasses import replace

import cv2
import numpy as np
import pytest

from runtime.backends.ort import OrtBackend
from runtime.model.fidelity import compare
from runtime.model.manifest import ModelError, Variant, sha256_file
from runtime.model.model_dir import ModelDir
from runtime.model.precisions import PRECISIONS, band_from_logit, logit_bound_of, round_up
from runtime.model.served import Served
from runtime.pipeline.classifier import Classifier, Result
from runtime.pipeline.preprocessors import CpuPreprocessor
from runtime.pipeline.recheck import Recheck
from runtime.pipeline.scheduler import FieldScheduler
from tests.conftest import run_module

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


def _with_fast_tier(clf: Classifier, offset: float, opener, batch_size: int = 4, slots: int = 1,
                    fast: Shifted | None = None, preprocessor: type[CpuPreprocessor] = CpuPreprocessor) -> Recheck:
    """The classifier's stages rebuilt around the stand-in tier, with a re-check of BF16's band; ``slots`` 2: the
    GPU paths' schedule (batch k+1 preprocessed while batch k runs in the runner thread, re-checks aside)."""
    fast = fast or Shifted(clf.backend, offset)
    clf.preprocessor = preprocessor(fast, clf.contract, batch_size, slots)
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


def test_open_recheck_opens_the_reference_once_at_start_and_the_first_borderline_field_opens_nothing(
        model_dir, images_100x, fp32_fields):
    """What a long-running service does at start (Classifier.open_recheck): the FP32 reference opened once and run on
    one field (not counted as re-checked); the in-band fields then use it, opening nothing; at FP32 there is nothing
    to open. A reference that answers that field with NaN stops the start, naming the way out, and is not kept."""
    offset = 0.5 - float(np.median(fp32_fields))
    opened = []
    with Classifier(model_dir, backend="cpu", precision="fp32") as clf:
        clf.open_recheck()  # FP32: the reference itself, nothing to open
        assert clf.recheck is None
        clf.recheck = _with_fast_tier(clf, offset, lambda: opened.append(1) or OrtBackend(ModelDir.open(model_dir)))
        assert clf.recheck.reference is None  # by default, opened on first need
        clf.open_recheck()
        assert opened == [1] and clf.recheck.reference is not None and clf.recheck.fields == 0
        clf.open_recheck()
        assert opened == [1]
        results = clf.classify(images_100x)
    assert sum(r.rechecked for r in results) > 0 and opened == [1]

    class NaNs(Shifted):
        def run(self, fields):
            return {k: np.full(len(fields), np.nan, np.float32) for k in ("logit", "probability")}

    with Classifier(model_dir, backend="cpu", precision="fp32") as clf:
        clf.recheck = _with_fast_tier(clf, offset, lambda: NaNs(OrtBackend(ModelDir.open(model_dir)), 0.0))
        with pytest.raises(ModelError, match="cannot re-check.*--recheck off"):
            clf.open_recheck()
        assert clf.recheck.reference is None

    class Raises(Shifted):
        def run(self, fields):
            raise RuntimeError("Failed to allocate memory (as a runtime says it)")

        def close(self):
            closed.append(1)

    closed: list[int] = []
    with Classifier(model_dir, backend="cpu", precision="fp32") as clf:  # a reference that raises: said, and closed
        clf.recheck = _with_fast_tier(clf, offset, lambda: Raises(OrtBackend(ModelDir.open(model_dir)), 0.0))
        with pytest.raises(ModelError, match=r"cannot run one field \(RuntimeError: Failed to allocate.*--recheck off"):
            clf.open_recheck()
        assert clf.recheck.reference is None and closed == [1]
    with Classifier(model_dir, backend="cpu", precision="fp16") as clf:  # a real faster tier, its real reference
        assert clf.recheck is not None and clf.recheck.reference is None
        clf.open_recheck()
        assert clf.recheck.reference is not None and clf.recheck.reference.precision == "fp32"


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


def _borderline(clf: Classifier, images: list, want: list) -> tuple[list[np.ndarray], Result]:
    """A field made to sit on the threshold, and its FP32 result: a blend of the most benign-looking and the most
    malignant-looking shared image (each one field: ``want`` holds their FP32 probabilities), the blend weight found
    at FP32 by regula falsi on the logit (Illinois variant) until |p - threshold| < 0.002."""
    order, t = np.argsort(want), clf.contract.threshold

    def excess(p: float) -> float:  # logit(p) - logit(threshold), clipped away from 0 and 1
        p = min(max(p, 1e-6), 1 - 1e-6)
        return float(np.log(p / (1 - p)) - np.log(t / (1 - t)))

    lo, hi = (cv2.imread(str(images[i]))[:448, :672] for i in (order[0], order[-1]))
    (a, fa), (b, fb), last = (0.0, excess(want[order[0]])), (1.0, excess(want[order[-1]])), 0
    assert fa < 0 < fb, "the shared images do not lie on both sides of the threshold"
    for _ in range(24):
        w = min(max(a - fa * (b - a) / (fb - fa), a + 1e-4), b - 1e-4)
        img = cv2.addWeighted(lo, 1 - w, hi, w, 0)
        (result,) = clf.classify([img])
        p = result.probability
        if abs(p - t) < 0.002:
            return [img], result
        if excess(p) < 0:
            a, fa = w, excess(p)
            fb, last = (fb / 2 if last < 0 else fb), -1
        else:
            b, fb = w, excess(p)
            fa, last = (fa / 2 if last > 0 else fa), 1
    raise AssertionError("no blend of the shared images lies on the threshold")


def test_trained_model_labels_equal_fp32_on_every_shared_image_with_the_recheck(trained_dir, images_100x):
    """The trained model's faster tier here (auto: FP16 on a GPU, BF16 on OpenVINO where this CPU has native BF16):
    with the re-check on, every field's and image's label is FP32's on the 48 shared images and on fields made to
    sit on the threshold, each of which is re-checked; a re-checked field's probability is FP32's. FP32's answers on
    the 48 images are the export's own (export_report.json's ``fp32_reference``: what its gates judged every
    variant against), tied to the runtime's FP32 on two of them here."""
    with Classifier(trained_dir) as clf:
        if clf.backend.precision == "fp32":  # (and the export, with no variant to gate, ran FP32 on 6 images only)
            pytest.skip(f"no faster tier on this machine ({'; '.join(clf.model_info.backend_notes)})")
        reference = {r["file"]: r for r in ModelDir.open(trained_dir).report()["fp32_reference"]["images"]}
        assert sorted(reference) == sorted(p.name for p in images_100x)  # every shared image, none left out
        assert all(reference[p.name]["sha256"] == sha256_file(p) for p in images_100x)  # these very files
        want = [reference[p.name]["probability"] for p in images_100x]  # each image's fields' FP32 probabilities
        assert all(len(w) == 1 for w in want)  # the shared images are one field each
        tol = PRECISIONS["fp32"].tolerance
        with Classifier(trained_dir, backend="cpu", precision="fp32") as fp32:
            for r, w in zip(fp32.classify(images_100x[:2]), want):  # the runtime's FP32 is the export's reference
                assert r.probability == pytest.approx(w[0], abs=tol.probability + tol.rtol * w[0])
            edge, at_edge = _borderline(fp32, images_100x, [w[0] for w in want])
        got = clf.classify([*images_100x, *edge])
        assert clf.recheck is not None and f"within {clf.recheck.band:.3g} of" in str(clf.model_info.recheck)
    for a, w in zip(got, want):
        assert a.error is None and [f.label for f in a.fields] == [clf.contract.label(p) for p in w]
        assert a.label == clf.contract.label(w[0])
        for f, p in zip(a.fields, w):
            if f.rechecked:
                assert f.probability == pytest.approx(p, abs=1e-4)
    (b,) = got[len(images_100x):]  # on the threshold: always re-checked, and FP32's answer
    assert b.rechecked == len(b.fields) and b.label == at_edge.label
    assert [f.label for f in b.fields] == [f.label for f in at_edge.fields]
    assert b.fields[0].probability == pytest.approx(at_edge.fields[0].probability, abs=1e-4)


def test_the_trained_models_band_comes_from_its_gates_logit_bound(trained_dir, images_100x):
    """The trained model's faster variants gated here (BF16 on a CPU with native BF16, FP16 where a GPU was
    visible): each gate recorded 2 x its max |d logit| as the logit bound, and the band is what that maps to at the
    threshold (BF16 on the 48 shared images: max |d logit| 0.088 -> bound 0.18 -> band 0.0449, wider than the 0.03
    its probability gave); it holds FP32's label on every gate field outside it, which the classifier's re-check
    uses."""
    m = ModelDir.open(trained_dir)
    fast = [p for p in ("bf16", "fp16", "int8") if p in m.manifest.variants]
    if not fast:
        pytest.skip(f"no faster variant of the trained model was gated here ({m.report().get('not_made')})")
    report = m.report()["gates"]
    for p in fast:
        gate = m.variant(p).gate
        assert gate["logit_bound"] == logit_bound_of(gate["max_abs"]["logit"]) > 0
        band = band_from_logit(gate["logit_bound"], m.contract.threshold)
        assert m.band(p) == max(PRECISIONS[p].band, band) and band > gate["max_abs"]["probability"]
        assert report[p]["ok"] and report[p]["flips"] == 0 and report[p]["band"] == m.band(p)
    with Classifier(trained_dir, precision=fast[0], backend="openvino" if fast[0] == "bf16" else "auto") as clf:
        assert clf.recheck is not None and clf.recheck.band == m.band(fast[0])


def test_int8_is_kept_only_where_its_effective_time_beats_the_best_tier():
    """INT8's verdict weighs its own time plus its re-check share at FP32's time against the best other tier."""
    from export.int8 import verdict

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
    assert (round_up(0.0123), round_up(0.78), round_up(0.3)) == (0.013, 0.78, 0.3)


# ---- the band from the logit bound (issue 35, point 5) ----

def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def test_the_band_is_the_logit_bound_mapped_to_the_threshold_and_keeps_fp32s_label_outside_it():
    """band = sigmoid(logit_t + b) - t (the wider side where t != 0.5), below b / 4; outside it (|p - t| > band)
    every FP32 logit within b of the fast one gives the fast label, on 200 000 pairs around each threshold; a pair
    just inside the band flips, so the band is no wider than it must be."""
    b = 0.18
    assert band_from_logit(b, 0.5) == pytest.approx(float(_sigmoid(b)) - 0.5, abs=1e-12)
    assert band_from_logit(b, 0.5) == pytest.approx(0.0449, abs=1e-4) and band_from_logit(b, 0.5) < b / 4
    assert band_from_logit(0.0, 0.5) == 0.0 and band_from_logit(float("nan"), 0.5) == 0.0
    rng = np.random.default_rng(0)
    for t in (0.5, 0.3, 0.8):
        lt, band = np.log(t / (1 - t)), band_from_logit(b, t)
        fast = lt + rng.uniform(-3 * b, 3 * b, 200_000)
        ref = fast + rng.uniform(-b, b, fast.size)
        outside = np.abs(_sigmoid(fast) - t) > band
        assert outside.sum() > 100_000 and ((_sigmoid(fast) > t) == (_sigmoid(ref) > t))[outside].all()
        edge = lt + 0.999 * b  # fast just above, FP32 (b away) just below the threshold: inside the band
        assert abs(float(_sigmoid(edge)) - t) <= band and float(_sigmoid(edge - b)) < t < float(_sigmoid(edge))
    assert (logit_bound_of(0.08826518), logit_bound_of(0.0)) == (0.18, 0.0)  # x2, up to two digits


def test_the_gate_derives_the_band_from_the_logit_not_from_how_many_fields_lie_near_the_threshold():
    """Gate fields far from 0.5 squeeze a |d logit| of 0.1 to |d p| 0.0045, so a band from the largest |d p| seen
    (x2, as INT8's was: 0.01 at its floor) leaves out an unseen field at 0.5 with the same |d logit|, whose label
    flips (0.4875 -> 0.5125). The band from the logit bound (2 x 0.1 -> sigmoid(0.2) - 0.5 = 0.0498) holds every
    unseen field within the measured |d logit|, wherever it lies; the gate records the bound."""
    ref_logit = np.array([-3.0, -2.9, 2.9, 3.0])
    got_logit = ref_logit + np.array([0.1, -0.1, 0.1, -0.1])
    ref, got = ({"logit": v, "probability": _sigmoid(v)} for v in (ref_logit, got_logit))
    c = compare(ref, got, "int8", 0.5, bound=0.01)
    seen = c.outputs[[o.output for o in c.outputs].index("probability")].max_abs
    assert seen < 0.005 and round_up(2 * seen) < 0.01  # the old derivation: INT8's floor, 0.01
    assert c.ok and c.logit_bound == 0.2 and c.band == pytest.approx(float(_sigmoid(0.2)) - 0.5, abs=1e-12)
    assert c.summary()["logit_bound"] == 0.2 and any("logit bound 0.2" in line for line in c.lines())
    unseen = np.linspace(-1.0, 1.0, 20_001)  # FP32 logits across the threshold, each moved by the measured 0.1
    for moved in (unseen + 0.1, unseen - 0.1):
        fast, fp32 = _sigmoid(moved), _sigmoid(unseen)
        flips = (fast > 0.5) != (fp32 > 0.5)
        assert flips[np.abs(fast - 0.5) > 0.01].any()  # the probability band lets labels through
        assert not flips[np.abs(fast - 0.5) > c.band].any()  # the logit band does not
    floor = compare({k: v * 0.01 for k, v in ref.items()}, {k: v * 0.01 for k, v in ref.items()}, "bf16", 0.5)
    assert floor.band == PRECISIONS["bf16"].band  # never below the table's probability bound
    int8 = compare(ref, got, "int8", 0.5, bound=0.01, logit_bound=0.05)  # INT8's logit bound, from calibration
    assert not int8.ok and "logit max|d| 0.1 beyond 0.05" in int8.reason()


@pytest.fixture(scope="module")
def fp16_copy(model_dir, tmp_path_factory):
    """A copy of the narrow reference model (with its FP16 variant) that tests may change."""
    import shutil

    d = tmp_path_factory.mktemp("recheck") / "m"
    shutil.copytree(model_dir, d, ignore=shutil.ignore_patterns("engines"))
    return d


def test_a_models_band_is_its_gates_logit_bound_and_an_older_export_keeps_its_probability_band(model_dir, fp16_copy):
    """The export records the FP16 gate's logit bound; the classifier's band is what it maps to (not below 1e-2).
    A model exported before logit bounds were recorded still opens, with the probability band it had, and a note
    saying so."""
    gate = ModelDir.open(model_dir).variant("fp16").gate
    measured = gate["max_abs"]["logit"]
    assert gate["logit_bound"] == logit_bound_of(measured) >= 2 * measured > 0
    want = max(0.01, band_from_logit(gate["logit_bound"], 0.5))
    with Classifier(model_dir, backend="cpu", precision="fp16") as clf:
        assert clf.recheck is not None and clf.recheck.band == want == ModelDir.open(model_dir).band("fp16")
        assert not any("logit bound" in n for n in clf.model_info.backend_notes)
    m = ModelDir.open(fp16_copy)
    m.manifest.variants["fp16"].gate.pop("logit_bound")
    m.save()
    with Classifier(fp16_copy, backend="cpu", precision="fp16") as clf:
        assert clf.recheck is not None and clf.recheck.band == 0.01
        assert any("recorded no logit bound" in n and "0.01" in n for n in clf.model_info.backend_notes)
        assert clf.classify(model_dir / "missing.png")[0].error  # it runs (an unreadable input is its own error)


def test_a_missing_fp32_file_is_refused_at_start_naming_it_with_the_ways_out(model_dir, images_100x, tmp_path):
    """Re-checks need model.onnx: without it the classifier is refused when it starts, naming the file, --recheck
    off and re-exporting; with --recheck off the FP16 tier runs (the CLI says the same, exit 2)."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d, ignore=shutil.ignore_patterns("engines"))
    (d / "model.onnx").unlink()
    with pytest.raises(ModelError, match=r"model\.onnx: model file not found.*--recheck off") as e:
        Classifier(d, backend="cpu", precision="fp16")
    assert "export the model again" in str(e.value)
    with Classifier(d, backend="cpu", precision="fp16", recheck="off") as clf:
        assert clf.recheck is None and clf.classify(images_100x[0])[0].label is not None
    proc = run_module("runtime.classify", "--no-progress", "--model", str(d), "--backend", "cpu", "--precision",
                      "fp16", str(images_100x[0]))
    assert proc.returncode == 2 and "model.onnx" in proc.stderr and "--recheck off" in proc.stderr


def test_auto_counts_the_re_checks_cost_only_where_re_checks_are_on(fp16_copy):
    """An INT8 variant whose re-checks would make it slower than FP32 (300 ms + 100 % x 1000 ms) is passed over
    with re-checks on; with --recheck off nothing runs at FP32 again, so auto takes it (300 ms < 1000 ms) and says
    why."""
    m = ModelDir.open(fp16_copy)
    gate = {"fields": 24, "in_band": 24, "bound": 0.05, "ms_per_field": {"int8": 300.0, "fp32": 1000.0}}
    m.manifest.variants["int8"] = Variant("model.onnx", gate)  # the FP32 file stands in for the Q/DQ one
    m.save()
    try:
        with Classifier(fp16_copy, backend="cpu") as clf:
            assert clf.backend.name == "onnxruntime-cpu-fp32"
        with Classifier(fp16_copy, backend="cpu", recheck="off") as clf:
            assert clf.backend.name == "onnxruntime-cpu-int8" and clf.recheck is None
            assert any("300 ms per field, its re-checks off" in n for n in clf.model_info.backend_notes)
    finally:
        m.manifest.variants.pop("int8")
        m.save()


# ---- a failure inside a batch is that batch's images' error, never the run's ----

class Faulty(Shifted):
    """The stand-in fast tier, answering its ``short``-th run (0-based) with one probability too few."""

    short = -1

    def __init__(self, inner: OrtBackend, offset: float) -> None:
        super().__init__(inner, offset)
        self.calls = 0

    def run(self, fields: np.ndarray) -> dict[str, np.ndarray]:
        out = super().run(fields)
        self.calls += 1
        return {k: v[:-1] for k, v in out.items()} if self.calls - 1 == self.short else out


class FaultyPreprocessor(CpuPreprocessor):
    """Preprocessing that fails on its ``bad_stage``-th batch, and a host copy that fails on its first call where
    ``bad_copy``."""

    bad_stage, bad_copy = -1, False

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.staged = 0

    def stage(self, images, plans, n, slot) -> None:
        self.staged += 1
        if self.staged - 1 == self.bad_stage:
            raise RuntimeError("kernel launch failed")
        super().stage(images, plans, n, slot)

    def host_pixels(self, image):
        if self.bad_copy:
            self.bad_copy = False
            raise RuntimeError("copy to the host failed")
        return super().host_pixels(image)


class ShortReference(Shifted):
    """An FP32 reference that answers its first run with one probability too few."""

    def __init__(self, inner: OrtBackend) -> None:
        super().__init__(inner, 0.0)
        self.first = True

    def run(self, fields: np.ndarray) -> dict[str, np.ndarray]:
        out = super().run(fields)
        if self.first:
            self.first = False
            return {k: v[:-1] for k, v in out.items()}
        return out


@pytest.mark.parametrize("slots", [1, 2])
def test_every_failure_inside_a_batch_is_that_batchs_images_error_only(model_dir, images_100x, fp32_fields, slots):
    """Batches of 4 one-field images. A fast tier that answers batch 2 short, a preprocessing that fails on batch 3,
    a host copy that fails on the first re-check, an FP32 reference that answers short: each time exactly the
    images concerned (batch 2, batch 3, the in-band images of the first batch with any) get an error naming the
    reason, and every other image gets the clean run's result, with its re-check timed where it had one."""
    images, fp32_fields = images_100x[:17], fp32_fields[:17]  # every fault's batch; an odd count: a median field
    offset = 0.5 - float(np.median(fp32_fields))
    inside = np.abs(fp32_fields + np.float32(offset) - 0.5) <= BF16_BAND
    assert inside.any()  # the median's field sits on the threshold
    first = int(np.flatnonzero(inside)[0]) // 4
    rechecked_first = {i for i in range(4 * first, 4 * first + 4) if inside[i]}

    def run(fault: str) -> list:
        with Classifier(model_dir, backend="cpu", precision="fp32") as clf:
            fast = Faulty(clf.backend, offset)
            fast.short = 2 if fault == "short" else -1
            prep = type("P", (FaultyPreprocessor,), {"bad_stage": 3 if fault == "stage" else -1,
                                                     "bad_copy": fault == "copy"})
            wrap = ShortReference if fault == "fp32 short" else (lambda backend: backend)
            _with_fast_tier(clf, offset, lambda: wrap(OrtBackend(ModelDir.open(model_dir))), slots=slots, fast=fast,
                            preprocessor=prep)
            return clf.classify(images)

    clean = run("none")
    assert all(r.error is None for r in clean)
    for i, r in enumerate(clean):
        assert ("recheck" in r.timings_ms) == bool(inside[i]) and r.timings_ms.get("recheck", 1) > 0
    for fault, hit, why in [("short", set(range(8, 12)), "answered 4 fields with 3 logit, 3 probability"),
                            ("stage", set(range(12, 16)), "kernel launch failed"),
                            ("copy", rechecked_first, "copy to the host failed"),
                            ("fp32 short", rechecked_first, f"answered {len(rechecked_first)} fields with")]:
        got = run(fault)
        assert {i for i, r in enumerate(got) if r.error} == hit, fault
        for i, (r, want) in enumerate(zip(got, clean)):
            if i in hit:
                assert why in r.error and r.path in r.error and r.label is None
            else:
                assert r.label == want.label and r.probability == pytest.approx(want.probability, abs=1e-6)


def test_on_the_gpu_schedule_the_recheck_runs_aside_while_the_next_batches_go_on_and_is_timed(
        model_dir, images_100x, fp32_fields):
    """The two-slot schedule (the GPU paths'): the first re-check waits until the fast tier has run two more
    batches, which it can only do if the loop goes on without it (in series it would wait for ever: the wait gives
    up after 60 s and the test fails); it runs in its own thread, and each image that had one is charged its time
    (timings_ms["recheck"], in the total)."""
    offset = 0.5 - float(np.median(fp32_fields))
    inside = np.abs(fp32_fields + np.float32(offset) - 0.5) <= BF16_BAND
    progress, seen = threading.Condition(), {"fast": 0, "went_on": [], "threads": set()}

    class Counting(Shifted):
        def run(self, fields):
            out = super().run(fields)
            with progress:
                seen["fast"] += 1
                progress.notify_all()
            return out

    class Waiting(Shifted):
        def run(self, fields):
            seen["threads"].add(threading.current_thread().name)
            if not seen["went_on"]:
                with progress:
                    start = seen["fast"]
                    seen["went_on"].append(progress.wait_for(lambda: seen["fast"] >= start + 2, timeout=60))
            return super().run(fields)

    with Classifier(model_dir, backend="cpu", precision="fp32") as clf:
        stand_in = Counting(clf.backend, offset)
        _with_fast_tier(clf, offset, lambda: Waiting(OrtBackend(ModelDir.open(model_dir)), 0.0), slots=2,
                        fast=stand_in)
        results = clf.classify(images_100x)
    assert seen["went_on"] == [True] and all(t.startswith("recheck") for t in seen["threads"])
    for r, bad in zip(results, inside):
        assert r.error is None and r.rechecked == int(bad) and ("recheck" in r.timings_ms) == bool(bad)
        assert r.timings_ms["total"] == pytest.approx(sum(v for k, v in r.timings_ms.items() if k != "total"))
    assert min(r.timings_ms["recheck"] for r, bad in zip(results, inside) if bad) > 0


# ---- a Triton server's band is checked, not taken on trust ----

class ServedStandIn:
    """The few calls TritonBackend makes of its connection, answered from a Served description (the thing under
    test is what the backend does with what a server says, not the transport)."""

    def __init__(self, served: Served) -> None:
        self.served, self.url = served, "http://127.0.0.1:1"

    def ready(self, model: str) -> bool:
        return True

    def config(self, model: str) -> dict:
        return {"max_batch_size": 8, "parameters": {k: {"string_value": v} for k, v in self.served.parameters().items()}}

    def metadata(self, model: str) -> dict:
        m = self.served.manifest
        return {"inputs": [{"name": m.input_name, "shape": [-1, *m.contract.field_shape]}],
                "outputs": [{"name": o} for o in m.output_names], "versions": ["1"]}


def test_a_servers_band_must_be_the_local_models_and_never_0_for_a_faster_precision(model_dir):
    from runtime.backends.triton import TritonBackend, TritonTarget, TritonUnavailable

    model = ModelDir.open(model_dir)
    manifest, target = model.manifest, TritonTarget("http://127.0.0.1:1")

    def served(precision: str, band: float) -> Served:
        file = model.variant(precision).file
        return Served(manifest, precision, band, file, manifest.files[file], "breakhis_fp32")

    ok = TritonBackend(ServedStandIn(served("fp16", model.band("fp16"))), target, "breakhis_fp16", manifest)
    assert ok.band == model.band("fp16") > 0
    with pytest.raises(ModelError, match=r"re-check band: server 0\.003, local"):
        TritonBackend(ServedStandIn(served("fp16", 0.003)), target, "breakhis_fp16", manifest)
    for local in (manifest, None):  # a band of 0 turns the re-checks off: refused, with or without a local model
        with pytest.raises(ModelError, match="re-check band"):
            TritonBackend(ServedStandIn(served("fp16", 0.0)), target, "breakhis_fp16", local)
    assert TritonBackend(ServedStandIn(served("fp32", 0.0)), target, "breakhis_fp32", manifest).band == 0.0
    with pytest.raises(ModelError, match="bf16: not a variant of the local model"):
        TritonBackend(ServedStandIn(replace(served("fp16", 0.05), precision="bf16")), target, "breakhis_bf16",
                      manifest)
    alone = TritonBackend(ServedStandIn(replace(served("fp16", model.band("fp16")), recheck_model="")), target,
                          "breakhis_fp16", manifest)
    with pytest.raises(TritonUnavailable, match="no FP32 model named for its re-checks.*--recheck off"):
        alone.reference()  # what the classifier asks when it starts with re-checks on: refused there
