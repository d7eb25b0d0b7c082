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
    assert set(res["variants"]) == {"baseline_pytorch_fp32_eager", "runtime_onnxruntime_cpu",
                                    "runtime_onnxruntime_cpu_batch4"}
    for v in res["variants"].values():
        assert v["p50_ms"] > 0 and v["p95_ms"] >= v["p50_ms"] and v["speedup_vs_baseline"] > 0
        assert v["peak_rss_mb"] > 50
    assert res["variants"]["baseline_pytorch_fp32_eager"]["speedup_vs_baseline"] == 1.0
    assert "speedup" in proc.stdout
