"""The CPU's BF16 tier (OpenVINO): gated on every shared image, chosen by itself only where the CPU has native BF16
and the model a passing BF16 variant (and saying so), refused where either is missing. The CPU's capabilities are
mocked at the boundary only: OpenVINO's report of what this CPU can do."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from export import bf16
from runtime.backends import openvino as ov
from runtime.backends.base import BackendUnavailable
from runtime.model.manifest import ModelError
from runtime.model.model_dir import ModelDir
from runtime.model.precisions import PRECISIONS, Tolerance
from runtime.pipeline.classifier import Classifier
from tests.conftest import run_module

NATIVE, WHY_NOT = ov.native("bf16")
needs_bf16 = pytest.mark.skipif(not NATIVE, reason=f"needs a CPU with native BF16: {WHY_NOT}")


@pytest.fixture
def no_bf16_cpu(monkeypatch):
    """A CPU whose OpenVINO plugin reports no BF16 (e.g. AVX2 only)."""
    monkeypatch.setattr(ov, "cpu_capabilities", lambda: ("FP32", "INT8", "BIN", "EXPORT_IMPORT"))


@pytest.fixture
def small_copy(model_dir, tmp_path):
    """A copy of the narrow model (no BF16 variant: its export did not ask for one), for the tests of the tier's
    mechanism: gating, listing, refusing, choosing. The trained model's own BF16 gate on every shared image is judged
    on the trained export itself (test_bf16_gate_passed_on_every_shared_image, test_bf16_verified_through_the_runtime)."""
    d = tmp_path / "m"
    shutil.copytree(model_dir, d, ignore=shutil.ignore_patterns("engines"))
    return d


@needs_bf16
def test_bf16_gate_passed_on_every_shared_image(trained_dir):
    m = ModelDir.open(trained_dir)
    v = m.variant("bf16")
    assert v.file == "model.onnx" and v.runtime == "openvino-cpu"
    gate = json.loads((trained_dir / "export_report.json").read_text())["gates"]["bf16"]
    assert gate["ok"] and gate["fields"] == 48 and gate["flips"] == 0 and gate["non_finite"] == 0
    prob = {o["output"]: o for o in gate["outputs"]}["probability"]
    assert 0 < prob["max_abs"] <= PRECISIONS["bf16"].tolerance.probability  # BF16 really ran: not bit-equal to FP32


@needs_bf16
def test_auto_picks_bf16_on_this_cpu_and_says_so_fp32_forces_fp32(trained_dir, images_100x):
    proc = run_module("runtime.classify", "--no-progress", "--model", str(trained_dir), str(images_100x[0]), "-v")
    assert proc.returncode == 0, proc.stderr
    assert "backend openvino-cpu-bf16" in proc.stdout and "precision auto chose bf16" in proc.stderr
    proc = run_module("runtime.classify", "--no-progress", "--model", str(trained_dir), "--precision", "fp32",
                      "--json", str(images_100x[0]))
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout)[0]["model"]
    assert model["backend"] == "onnxruntime-cpu-fp32" and model["precision"] == "fp32"


@needs_bf16
def test_bf16_verified_through_the_runtime(trained_dir, shared_data):
    """`python -m export verify` runs BF16 as the runtime does and judges it against FP32: on 4 images (BF16 against
    FP32 on all 48 is the export's gate, test_bf16_gate_passed_on_every_shared_image, and the runtime's labels on all
    48 with the re-check are tests/test_recheck.py's), enough for the command's comparison and verdict."""
    proc = run_module("export", "verify", "-m", str(trained_dir), "--images", str(shared_data / "breakhis-100x"),
                      "--backend", "openvino", "--precision", "bf16", "--limit", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "openvino-cpu-bf16 (bf16)" in proc.stdout and "0 flips" in proc.stdout and "PASS" in proc.stdout


def test_without_native_bf16_auto_stays_fp32_and_bf16_is_refused(trained_dir, no_bf16_cpu):
    with Classifier(trained_dir) as clf:
        assert clf.backend.name == "onnxruntime-cpu-fp32"
        assert any("no native BF16" in n for n in clf.model_info.backend_notes)
    with pytest.raises(BackendUnavailable, match="no native BF16"):
        Classifier(trained_dir, backend="openvino", precision="bf16")
    with Classifier(trained_dir, backend="openvino") as clf:  # named, precision auto: FP32 with an explicit hint
        assert clf.backend.name == "openvino-cpu-fp32"


def test_without_native_bf16_bf16_is_refused_the_same_way_whether_or_not_the_export_made_it(small_copy,
                                                                                             no_bf16_cpu):
    """On an AVX2-only CPU the export made no bf16 variant (the report says "not made"); a model exported on a
    BF16 CPU lists one. Either way, asking for bf16 here is the one refusal: this CPU cannot."""
    m = ModelDir.open(small_copy)
    m.manifest.variants["bf16"] = m.manifest.variants["fp32"]  # listed, as a BF16 machine's export leaves it
    m.save()
    for listed in (True, False):
        if not listed:  # as this CPU's own export leaves it
            m.manifest.variants.pop("bf16")
            m.save()
            report = json.loads((small_copy / "export_report.json").read_text())
            report["gates"].pop("bf16", None)
            report.setdefault("not_made", {})["bf16"] = f"bf16: {ov.native('bf16')[1]}"
            (small_copy / "export_report.json").write_text(json.dumps(report))
            with pytest.raises(ModelError, match="not made at export"):
                m.variant("bf16")
        for backend in ("openvino", "auto"):
            with pytest.raises(BackendUnavailable, match="bf16 cannot run here: this CPU has no native BF16"):
                Classifier(small_copy, backend=backend, precision="bf16")


def test_gating_on_a_cpu_without_native_bf16_makes_no_variant(small_copy, shared_data, no_bf16_cpu):
    m = bf16.add_to_model(small_copy, shared_data / "breakhis-100x", 2, log=lambda _: None)
    assert "bf16" not in m.manifest.variants
    with pytest.raises(ModelError, match="not made at export: .*no native BF16"):
        m.variant("bf16")


@needs_bf16
def test_a_bf16_variant_that_fails_its_gate_is_not_listed_or_chosen(small_copy, shared_data, monkeypatch):
    m = bf16.add_to_model(small_copy, shared_data / "breakhis-100x", 2, log=lambda _: None)
    assert "bf16" in ModelDir.open(small_copy).manifest.variants  # passes with the real tolerance
    strict = replace(PRECISIONS["bf16"], tolerance=Tolerance(probability=1e-9, logit=None))
    monkeypatch.setitem(PRECISIONS, "bf16", strict)
    m = bf16.add_to_model(small_copy, shared_data / "breakhis-100x", 2, log=lambda _: None)
    assert "bf16" not in m.manifest.variants and "bf16" not in ModelDir.open(small_copy).manifest.variants
    with pytest.raises(ModelError, match="failed its fidelity gate at export: probability max"):
        Classifier(small_copy, backend="openvino", precision="bf16")
    with Classifier(small_copy) as clf:
        assert clf.backend.name == "onnxruntime-cpu-fp32"
        assert any("failed its fidelity gate" in n for n in clf.model_info.backend_notes)


def test_precisions_and_backends_that_do_not_go_together_are_refused(model_dir):
    with pytest.raises(BackendUnavailable, match="no bf16 tier"):
        Classifier(model_dir, backend="cpu", precision="bf16")
    with pytest.raises(BackendUnavailable, match="runs fp32 and bf16"):
        Classifier(model_dir, backend="openvino", precision="fp16")
    proc = run_module("runtime.classify", "--model", str(model_dir), "--backend", "onnxruntime-cuda",
                      "--precision", "bf16", "x.png")
    assert proc.returncode == 2 and "bf16 is the CPU tier" in proc.stderr


@needs_bf16
def test_export_bf16_command_gates_an_existing_model(small_copy, shared_data):
    assert "bf16" not in ModelDir.open(small_copy).manifest.variants  # an existing model without one
    proc = run_module("export", "bf16", "-m", str(small_copy), "--images", str(shared_data / "breakhis-100x"),
                      "--count", "2")
    assert proc.returncode == 0, proc.stderr
    assert "bf16 listed" in proc.stdout and ModelDir.open(small_copy).manifest.variants["bf16"].gate["fields"] == 2


@needs_bf16
def test_auto_falls_back_to_fp32_when_openvino_cannot_run_the_chosen_bf16(trained_dir, monkeypatch):
    def broken(*_args, **_kw):
        raise ov.OpenVinoUnavailable("compiled with inference precision f32, not bf16")

    monkeypatch.setattr(ov, "OpenVinoBackend", broken)
    with Classifier(trained_dir) as clf:
        assert clf.backend.name == "onnxruntime-cpu-fp32"
        assert any("fell back to fp32" in n for n in clf.model_info.backend_notes)
    with pytest.raises(BackendUnavailable, match="not bf16"):
        Classifier(trained_dir, backend="openvino", precision="bf16")


def test_auto_counts_the_recheck_cost_of_the_bf16_tier(small_copy, monkeypatch):
    """Auto weighs a tier by its gate's own figures: its time per field plus its re-check share at FP32's time.
    A BF16 tier whose re-checks would make it slower than FP32 is not chosen, and the note says why in numbers;
    one that stays faster is described with them. (OpenVINO's report of the CPU is the boundary mocked.)"""
    from runtime.backends.choose import _speed
    from runtime.model.manifest import Variant

    monkeypatch.setattr(ov, "cpu_capabilities", lambda: ("FP32", "BF16"))
    gate = {"fields": 48, "label_agreement": 1.0, "max_abs": {"probability": 0.01}, "in_band": 36,
            "ms_per_field": {"bf16": 200.0, "fp32": 400.0}}
    m = ModelDir.open(small_copy)
    m.manifest.variants["bf16"] = Variant("model.onnx", gate, "openvino-cpu")
    m.save()
    with Classifier(small_copy) as clf:  # 200 + 75 % x 400 = 500 ms > 400 ms
        assert clf.backend.name == "onnxruntime-cpu-fp32" and clf.recheck is None
        assert any("slower than fp32 here counting its re-checks: 500 ms per field" in n
                   for n in clf.model_info.backend_notes)
    assert _speed("bf16", gate | {"in_band": 1}).startswith(", 208 ms per field with its re-checks (200 ms + 2.1%")
    assert _speed("bf16", {"fields": 48}) == ""  # an export from before the gate timed it: the table decides


def test_auto_runs_an_int8_variant_the_export_kept_and_not_one_its_re_checks_would_slow(small_copy):
    """A kept INT8 variant (its gate's figures: faster than FP32 counting its re-checks) is what auto runs on the
    CPU, said in a note; the same variant with figures that make it slower is passed over for FP32."""
    from runtime.model.manifest import Variant

    m = ModelDir.open(small_copy)
    fast = {"fields": 24, "in_band": 6, "bound": 0.05, "ms_per_field": {"int8": 300.0, "fp32": 1000.0}}
    for gate, want in ((fast, "onnxruntime-cpu-int8"),
                       (fast | {"in_band": 24}, "onnxruntime-cpu-fp32")):  # 300 + 100 % x 1000 > 1000
        m.manifest.variants["int8"] = Variant("model.onnx", gate)  # the FP32 file stands in for the Q/DQ one
        m.save()
        with Classifier(small_copy, backend="cpu") as clf:
            assert clf.backend.name == want
            if want.endswith("int8"):
                assert "precision auto chose int8" in clf.model_info.backend_notes[0]
                assert clf.recheck is not None and clf.recheck.band == 0.05  # its derived bound is its band


def test_a_process_with_fewer_threads_than_cores_leaves_thread_placement_to_the_os(model_dir):
    """OpenVINO pins its threads to cores without regard to other processes: two 1-thread processes on 2 cores (a
    cohort's 2 Ray actors) were pinned to the same core and each ran at half speed. A process given fewer threads
    than the cores it may run on does not pin; one given all of them (or OpenVINO's choice) keeps the default."""
    import os

    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: a process cannot have fewer threads than cores")
    onnx = model_dir / "model.onnx"
    _, fewer = ov.compile_onnx(onnx, "fp32", threads=cores - 1)
    assert fewer.get_property("ENABLE_CPU_PINNING") is False
    plain = ov._core().compile_model(str(onnx), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT":
                                                        PRECISIONS["fp32"].openvino_hint})
    for threads in (None, cores):
        _, compiled = ov.compile_onnx(onnx, "fp32", threads=threads)
        assert compiled.get_property("ENABLE_CPU_PINNING") == plain.get_property("ENABLE_CPU_PINNING")
