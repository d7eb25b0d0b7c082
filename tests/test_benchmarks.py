"""The benchmark command runs end to end and writes the documented JSON (its numbers are reported, not checked)."""
from __future__ import annotations

import json

from tests.conftest import run_module


def test_benchmark_json_schema(model_dir, shared_data, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_module("benchmarks", "--images", str(shared_data / "breakhis-100x"), "--model", str(model_dir),
                      "--limit", "2", "--repeats", "1", "--warmup", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    bf16 = {"runtime_openvino_cpu_bf16", "runtime_openvino_cpu_bf16_folder",  # where the model has the variant
            "runtime_openvino_cpu_bf16_recheck_off"}
    assert set(res["variants"]) - bf16 == {"baseline_pytorch_fp32_eager", "runtime_onnxruntime_cpu",
                                           "baseline_pytorch_fp32_eager_folder", "runtime_onnxruntime_cpu_folder",
                                           "runtime_onnxruntime_cpu_batch4"}
    assert "no int8 variant" in res["skipped"]["runtime_onnxruntime_cpu_int8"]
    fid = res["variants"]["runtime_onnxruntime_cpu"]["fidelity"]
    assert fid["precision"] == "fp32" and fid["label_agreement"] == 1.0 and fid["probability_max_abs"] <= 1e-5
    assert fid["label_differences"] == 0 and res["variants"]["runtime_onnxruntime_cpu"]["recheck_share"] == 0.0
    for v in res["variants"].values():
        assert v["p50_ms"] > 0 and v["p95_ms"] >= v["p50_ms"] and v["speedup_vs_baseline"] > 0
        assert v["peak_rss_mb"] > 50
    stages = res["variants"]["runtime_onnxruntime_cpu"]["stages_ms"]
    assert set(stages) == {"decode", "quality", "preprocess", "inference"}  # the quality check's cost reported
    assert stages["decode"]["p99"] >= stages["decode"]["p50"]
    assert res["variants"]["baseline_pytorch_fp32_eager"]["speedup_vs_baseline"] == 1.0
    assert "speedup" in proc.stdout


def test_device_check_dry_run_plans_every_gpu_step(tmp_path):
    """The one-command GPU check, without a GPU: the plan holds every step and each command it would run exists."""
    proc = run_module("benchmarks.device_check", "--dry-run", "--out", str(tmp_path / "device"))
    summary = json.loads(proc.stdout)
    steps = [s["step"] for s in summary["steps"]]
    for want in ("tests-gpu", "verify-onnxruntime-cuda-fp16", "verify-onnxruntime-cuda-fp32", "verify-tensorrt-fp16",
                 "verify-onnxruntime-cuda-fp16-nhwc", "bench-gpu", "bench-gpu-jpeg", "bench-kernel", "bench-slide",
                 "bench-decode", "bench-decode-jpeg"):
        assert want in steps
    assert all(s["rc"] == 0 for s in summary["steps"]), summary
    assert proc.returncode == 0 and "gpu" in summary["machine"]
    assert not (tmp_path / "device").exists()  # a dry run writes no results


def test_slide_benchmark_reports_rate_and_mask_savings(model_dir, shared_data, tmp_path):
    out = tmp_path / "slide.json"
    proc = run_module("benchmarks.slide", "--images", str(shared_data / "breakhis-100x"), "--model", str(model_dir),
                      "--backend", "cpu", "--rows", "2", "--cols", "3", "--tissue", "0.5", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    on, off = res["runs"]["mask on"], res["runs"]["mask off"]
    assert off["classified"] == 6 and on["classified"] == res["region"]["tissue_fields"]
    assert res["mask_savings"]["fields_skipped"] == 6 - on["classified"] and on["classified_fields_per_s"] > 0


def test_decode_benchmark_reports_every_decoder_and_thread_count(shared_data, tmp_path):
    out = tmp_path / "decode.json"
    proc = run_module("benchmarks.decode", "--images", str(shared_data / "breakhis-100x"), "--workers", "1", "2",
                      "--repeats", "1", "--as-jpeg", "90", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["decoder"], r["threads"]) for r in rows} == \
        {(d, w) for d in ("runtime", "opencv_imdecode", "opencv_under_stderr_lock") for w in (1, 2)}
    assert result["format"] == "JPEG quality 90 copies"
    assert all(r["images_per_s"] > 0 for r in rows) and "images/s" in proc.stdout
