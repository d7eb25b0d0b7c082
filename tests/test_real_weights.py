"""The trained model (../shared/models/breakhis-scratch-v1) through every gate: a range-safe FP16 variant that passes
on all 48 shared images, its convolutions within float16 and its rescaled FP32 model the original. And the mechanisms
around the gates, on the narrow model: a variant that fails its gate is neither written, listed nor loaded, a
non-finite output is an error and never a verdict, and the accuracy table's tool."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export.model import CONTRACT
from export.range_safe import FP16_MAX, TARGET_LOG2, rescale
from export.weights import load_checkpoint
from runtime.backends.choose import resolve_precision
from runtime.backends.engines import plan_build
from runtime.io.decode import read_image
from runtime.model import paths
from runtime.model.manifest import ModelError, sha256_file
from runtime.model.model_dir import ModelDir
from runtime.model.preprocess import preprocess_image
from runtime.pipeline.classifier import Classifier
from tests.conftest import run_module


def _report(d):
    return json.loads((d / "export_report.json").read_text())


@pytest.fixture(scope="module")
def trained_fp16(trained_dir):
    """The trained model's FP16 variant, made where its export saw an NVIDIA GPU (FP16 runs only there)."""
    m = ModelDir.open(trained_dir)
    if "fp16" not in m.manifest.variants and "fp16" in _report(trained_dir).get("not_made", {}):
        pytest.skip(f"the trained export made no FP16 variant here: {_report(trained_dir)['not_made']['fp16']}")
    return trained_dir


def test_the_trained_export_says_why_a_variant_was_not_made(trained_dir):
    m, report = ModelDir.open(trained_dir), _report(trained_dir)
    for v in ("fp16", "bf16"):
        assert (v in m.manifest.variants) != (v in report["not_made"] or v in report["rejected"]), v  # listed, or why


def test_trained_export_lists_fp16_after_its_gate_on_every_shared_image(trained_fp16):
    trained_dir = trained_fp16
    m = ModelDir.open(trained_dir)
    assert m.manifest.provenance.trained is True and len(m.manifest.provenance.held_out_patients) == 7
    assert 0.5 < m.manifest.provenance.metrics["val_acc"] < 1
    assert set(m.manifest.variants) - {"bf16"} == {"fp32", "fp16"}  # bf16 where this CPU has it: tests/test_cpu_tier.py
    gate = _report(trained_dir)["gates"]["fp16"]
    assert gate["ok"] and gate["fields"] == 48 and gate["flips"] == 0 and gate["non_finite"] == 0
    assert {o["output"]: o["max_abs"] for o in gate["outputs"]}["probability"] <= 1e-2
    assert m.manifest.variants["fp16"].gate["label_agreement"] == 1.0


def test_every_fp16_convolution_output_stays_within_float16(trained_dir):
    ranges = _report(trained_dir)["ranges"]
    assert len(ranges) == 13
    assert max(r["max_before"] for r in ranges) > FP16_MAX  # without rescaling this model overflows float16
    for r in ranges:  # on all 48 images: measured on the FP16 variant itself where it was made, else FP32 x 2^shift
        assert r["max_after"] < FP16_MAX and r["headroom"] >= 16, r
        assert abs(r["max_after"] - r["max_before"] * 2.0 ** r["shift"]) <= 1e-2 * r["max_after"], r
        assert r["max_after"] <= 2.0 ** TARGET_LOG2 * 1.01, r


def test_rescaled_fp32_model_gives_the_original_outputs(trained_dir, trained_checkpoint, images_100x):
    assert all(v <= 1e-6 for v in _report(trained_dir)["rescaled_vs_original"].values())  # ONNX, 6 fields
    model = load_checkpoint(trained_checkpoint / "weights.pt")
    scaled = rescale(model, [r["shift"] for r in _report(trained_dir)["ranges"]])
    assert not torch.equal(scaled.encoder.vgg16.layers[28].weight, model.encoder.vgg16.layers[28].weight)
    fields = torch.from_numpy(np.stack([preprocess_image(read_image(p).bgr, CONTRACT)[0] for p in images_100x[:2]]))
    with torch.no_grad():
        (la, pa), (lb, pb) = model(fields), scaled(fields)
    assert float((la - lb).abs().max()) <= 1e-6 and float((pa - pb).abs().max()) <= 1e-6


def test_fp16_verified_through_the_runtime(trained_fp16, shared_data):
    proc = run_module("export", "verify", "-m", str(trained_fp16), "--images", str(shared_data / "breakhis-100x"),
                      "--backend", "cpu", "--precision", "fp16", "--limit", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "onnxruntime-cpu-fp16 (fp16)" in proc.stdout and "0 flips" in proc.stdout and "PASS" in proc.stdout


@pytest.fixture(scope="module")
def failing_dir(model_dir, shared_data, tmp_path_factory):
    """A model whose FP16 variant overflows and must be refused: the narrow model with its last convolution's output
    scaled by 2^16 and the Dense layer compensating (export/range_safe.py's own ``rescale``, powers of two: FP32's
    answers are unchanged), exported without the rescaling. Like the trained model, it overflows float16 deep in
    the chain, where ONNX Runtime's float32 between ops hides it from the outputs: only the range check on every
    convolution can refuse it. What is under test is the refusal's mechanism; that the trained model itself
    overflows float16 without the rescaling: test_every_fp16_convolution_output_stays_within_float16. A stale
    model.fp16.onnx left in the directory must not survive either."""
    work = tmp_path_factory.mktemp("failing")
    ckpt = torch.load(model_dir / "weights.pt", weights_only=True)
    ckpt["state_dict"] = rescale(load_checkpoint(model_dir / "weights.pt"), [0] * 12 + [16]).state_dict()
    torch.save(ckpt, work / "overflowing.pt")
    out = work / "m"
    out.mkdir()
    (out / "model.fp16.onnx").write_bytes(b"stale file a backend could pick up")
    proc = run_module("export", "onnx", "--checkpoint", str(work / "overflowing.pt"), "-o", str(out),
                      "--no-range-safe", "--gate-count", "1", "--parity-count", "1", "--variants", "fp16",
                      "--parity-images", str(shared_data / "breakhis-100x"))
    assert proc.returncode == 0, proc.stderr  # what it wrote (FP32) is sound
    assert "FP16 variant REJECTED" in proc.stderr
    return out


def test_a_variant_that_fails_its_gate_is_not_written_listed_or_loaded(failing_dir, model_dir, images_100x):
    report = _report(failing_dir)
    (doctored,) = report["fp32_reference"]["images"]  # the doctoring kept FP32's answers: the narrow model's own
    (same,) = [r for r in _report(model_dir)["fp32_reference"]["images"] if r["sha256"] == doctored["sha256"]]
    assert np.allclose(doctored["logit"], same["logit"], rtol=1e-6, atol=1e-6)  # exact in float32: powers of two
    # refused by the range check alone, at the last convolution, although its outputs pass the output gate
    assert report["rejected"]["fp16"].endswith("in encoder.vgg16.layers.28") and report["gates"]["fp16"]["ok"]
    m = ModelDir.open(failing_dir)
    assert "fp16" not in m.manifest.variants and "model.fp16.onnx" not in m.manifest.files
    assert not (failing_dir / "model.fp16.onnx").exists()
    assert "float16's range" in report["rejected"]["fp16"]
    with pytest.raises(ModelError, match="failed its fidelity gate"):
        Classifier(failing_dir, backend="cpu", precision="fp16")
    for on_gpu in (False, True):  # ONNX Runtime CPU and CUDA and TensorRT resolve precision the same way
        with pytest.raises(ModelError, match="failed its fidelity gate"):
            resolve_precision("fp16", on_gpu, m)
    precision, notes = resolve_precision("auto", True, m)
    assert precision == "fp32" and "failed its fidelity gate" in notes[0]
    for trt_major in (10, 11):
        with pytest.raises(ModelError, match="failed its fidelity gate"):
            plan_build(trt_major, "fp16", m)
    proc = run_module("runtime.classify", "--no-progress", "--model", str(failing_dir), "--precision", "fp16",
                      str(images_100x[0]))
    assert proc.returncode == 2 and "no fp16 variant" in proc.stderr and "float16's range" in proc.stderr


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_output_is_an_error_never_a_verdict(model_dir, images_100x, tmp_path, value):
    """NaN > 0.5 is False, so a NaN once printed as "Benign"; an infinite logit still gives probability 1.0."""
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    m = onnx.load(str(d / "model.onnx"))
    bias = next(t for t in m.graph.initializer if t.name == "head.dense.bias")
    bias.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(bias).shape, value, np.float32), bias.name))
    onnx.save(m, str(d / "model.onnx"))
    man = ModelDir.open(d)
    man.manifest.files["model.onnx"] = sha256_file(d / "model.onnx")
    man.save()
    proc = run_module("runtime.classify", "--no-progress", "--json", "--model", str(d), "--backend", "cpu",
                      str(images_100x[0]), str(images_100x[1]))
    assert proc.returncode == 1
    for r in json.loads(proc.stdout):
        assert r["label"] is None and r["probability"] is None and r["fields"] == []
        assert "non-finite" in r["error"] and "onnxruntime-cpu-fp32" in r["error"] and "no verdict" in r["error"]


def test_accuracy_table_mechanics(model_dir, trained_dir, shared_data, tmp_path):
    """The table's tool on every third shared image (16), on a copy of the narrow model given the trained model's
    held-out patients: groups, counts and metrics consistent, held-out patients told apart. Only the table's
    mechanics are under test here; the trained model's accuracy is the table in docs/models.md (the full run), its
    labels against FP32 on all 48 images are judged in tests/test_recheck.py and its gates here above."""
    d = tmp_path / "m"
    shutil.copytree(model_dir, d, ignore=shutil.ignore_patterns("engines"))
    model = ModelDir.open(d)
    held = ModelDir.open(trained_dir).manifest.provenance.held_out_patients
    model.manifest = replace(model.manifest, provenance=replace(model.manifest.provenance, held_out_patients=held))
    model.save()
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((shared_data / "breakhis-100x").glob("*.png"))[::3]:
        (images / p.name).symlink_to(p)
    proc = run_module("benchmarks.evaluate", "--images", str(images), "--model", str(d), "--json",
                      str(tmp_path / "acc.json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "acc.json").read_text())
    (run,) = report["runs"].values()
    held = set(ModelDir.open(d).manifest.provenance.held_out_patients)
    assert held == set(ModelDir.open(trained_dir).manifest.provenance.held_out_patients) != set()
    n_held = sum(p.name.rsplit("-", 2)[0] in held for p in images.glob("*.png"))
    assert run["groups"]["all"]["image"]["n"] == 16 and run["groups"]["held-out"]["image"]["n"] == n_held > 0
    assert run["groups"]["held-out"]["patient"]["n"] == len({p for p in held if any(images.glob(f"{p}-*"))})
    for group in run["groups"].values():
        for m in group.values():
            assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == m["n"]
            assert m["accuracy"] == pytest.approx((m["tp"] + m["tn"]) / m["n"])
    assert "held-out" in proc.stdout and "AUC" in proc.stdout


def test_metrics_by_hand():
    from benchmarks.evaluate import auc, metrics

    y, s = np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    assert auc(y, s) == pytest.approx(5 / 6)  # of 6 (pos, neg) pairs only (0.4, 0.6) is out of order
    m = metrics(y, s, 0.5)
    assert (m.tp, m.fp, m.tn, m.fn) == (2, 1, 1, 1)
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(2 / 3) and m.specificity == 0.5


def test_default_model_is_the_trained_one_where_setup_exported_it(tmp_path, monkeypatch):
    monkeypatch.delenv("BREAKHIS_MODEL", raising=False)
    monkeypatch.setattr(paths, "MODELS", tmp_path)
    assert paths.default_model_dir() == tmp_path / "reference"
    (tmp_path / "breakhis-scratch-v1").mkdir()
    (tmp_path / "breakhis-scratch-v1" / "manifest.json").write_text("{}")
    assert paths.default_model_dir() == tmp_path / "breakhis-scratch-v1"
    monkeypatch.setenv("BREAKHIS_MODEL", "/elsewhere")
    assert str(paths.default_model_dir()) == "/elsewhere"


def test_trained_model_on_a_gpu_backend_keeps_every_label(trained_dir, images_100x, request):
    """Where onnxruntime-gpu and a GPU exist: the path that once printed NaN as "Benign" (ONNX Runtime CUDA, FP16,
    GPU preprocessing) against the CPU FP32 answers, through the one comparison."""
    from runtime.backends import ort
    from runtime.model.fidelity import compare

    if not ort.cuda_available():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    trained_fp32 = request.getfixturevalue("trained_fp32")  # the session's FP32 answers, made only where needed
    with Classifier(trained_dir, backend="onnxruntime-cuda") as g:
        got, want = g.classify(images_100x), trained_fp32.results
        assert g.backend.precision == "fp16"
    assert all(r.error is None for r in got), [r.error for r in got if r.error]
    result = compare({"probability": np.array([r.probability for r in want])},
                     {"probability": np.array([r.probability for r in got])}, "fp16", 0.5)
    assert result.ok, result.lines()
