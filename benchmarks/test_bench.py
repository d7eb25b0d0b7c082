"""pytest-benchmark suite (reports only, never asserts a time):
    .venv/bin/python -m pytest benchmarks --benchmark-enable
Uses the default model (made by setup.sh: the trained one where ../shared has it) and the shared BreakHis samples."""
from __future__ import annotations

import cv2
import pytest

from runtime.model.geometry import plan_image
from runtime.model.model_dir import ModelDir
from runtime.model.paths import default_model_dir, sample_images
from runtime.model.preprocess import preprocess_fields

MODEL = default_model_dir()
IMAGE = sample_images() / "SOB_M_DC-14-10926-100-003.png"

pytestmark = [
    pytest.mark.skipif(not (MODEL / "manifest.json").is_file(), reason=f"{MODEL} missing: run setup.sh"),
    pytest.mark.skipif(not IMAGE.is_file(), reason=f"sample image not found at {IMAGE}"),
]


def test_preprocess_runtime(benchmark):
    c = ModelDir.open(MODEL).contract
    bgr = cv2.imread(str(IMAGE))
    plan = plan_image(bgr, c)
    benchmark(preprocess_fields, bgr, plan, c)


def test_preprocess_baseline(benchmark):
    from benchmarks.baseline import Baseline

    benchmark(Baseline(MODEL).preprocess, IMAGE)


def test_classify_runtime_cpu(benchmark):
    from runtime.pipeline.classifier import Classifier

    clf = Classifier(MODEL, backend="cpu")
    benchmark.pedantic(clf.classify, args=([IMAGE],), rounds=5, warmup_rounds=1)


def test_classify_baseline(benchmark):
    from benchmarks.baseline import Baseline

    base = Baseline(MODEL)
    benchmark.pedantic(base.classify, args=(IMAGE,), rounds=5, warmup_rounds=1)
