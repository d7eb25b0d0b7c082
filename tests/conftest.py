"""Shared fixtures: the real BreakHis samples (one fixture, skipped with a reason where absent) and a freshly
exported reference model."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.model.paths import shared_dir, trained_weights

os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras 3 is a test-only reference; never TensorFlow

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = shared_dir() / "data"
TRAINED = trained_weights()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data with breakhis-100x/MANIFEST.csv; skips where the samples are not beside the repo."""
    if not (SHARED_DATA / "breakhis-100x" / "MANIFEST.csv").is_file():
        pytest.skip(f"BreakHis samples not found at {SHARED_DATA} (set BREAKHIS_SHARED to the shared folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def images_100x(shared_data: Path) -> list[Path]:
    with open(shared_data / "breakhis-100x" / "MANIFEST.csv") as f:
        rows = list(csv.DictReader(f))
    paths = [shared_data / "breakhis-100x" / r["filename"] for r in rows]
    assert len(paths) == 48 and all(p.is_file() for p in paths)
    return paths


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """The seeded reference model, narrow (convolution widths x1/8: the VGG16-BiLSTM's structure, contract and every
    artefact, at about 1/60 of the arithmetic), exported by the real CLI into a temporary directory once per
    session, with its FP16 variant (its mechanism is tested on the CPU). For what runs around the model: the
    pipeline, the interfaces, the gates' mechanics. The model's own numbers are judged on the trained model
    (``trained_dir``) and on the full-width reference where the architecture itself is under test."""
    out = tmp_path_factory.mktemp("models") / "reference"
    run_module("export", "reference", "--width", "0.125", "-o", str(out), "--parity-images",
               str(shared_data / "breakhis-100x"), "--gate-count", "8", "--variants", "fp16", check=True, cache=True)
    return out


@pytest.fixture(scope="session")
def full_reference():
    """The full-width seeded reference model in PyTorch (built once: 138 million seeded weights), for the tests
    of the architecture itself. Tests must not change it (copy.deepcopy it first)."""
    from export.reference import reference_model

    return reference_model()


@pytest.fixture(scope="session")
def trained_checkpoint(shared_data: Path) -> Path:
    """The trained model's weights in ../shared/models; skips where they are absent."""
    if not (TRAINED / "weights.pt").is_file():
        pytest.skip(f"trained model not found at {TRAINED}")
    return TRAINED


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory: pytest.TempPathFactory, trained_checkpoint: Path, shared_data: Path) -> Path:
    """The trained model exported by the real CLI exactly as setup.sh does (ranges and gates on all 48 images), so
    that the export setup.sh made is reused (export/cache.py) instead of made again."""
    out = tmp_path_factory.mktemp("models") / "breakhis-scratch-v1"
    run_module("export", "trained", "-o", str(out), "--parity-images", str(shared_data / "breakhis-100x"), check=True,
               cache=True)
    return out


@pytest.fixture(scope="session")
def trained_fp32(trained_dir: Path, images_100x: list[Path]):
    """The trained model at FP32 on the CPU, the reference every faster path is judged against, open for the session
    (``.clf``), and its results on the 48 shared images (``.results``, in ``images_100x``'s order): computed once
    (about 45 s on a 2-core CPU) for every test that compares against them."""
    from types import SimpleNamespace

    from runtime.pipeline.classifier import Classifier

    with Classifier(trained_dir, backend="cpu", precision="fp32") as clf:
        results = clf.classify(images_100x)
        assert all(r.error is None for r in results), [r.error for r in results if r.error]
        yield SimpleNamespace(clf=clf, results=results)


def run_module(module: str, *args: str, check: bool = False, env: dict | None = None,
               cwd: Path = REPO, cache: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` as a user would; output captured as text. Exports use the export cache
    (export/cache.py) only with ``cache``: the fixtures' exports, which setup.sh's may already have made; a test's
    own exports neither reuse nor fill it."""
    base = {**os.environ} if cache else {**os.environ, "BREAKHIS_EXPORT_CACHE": "off"}
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                          env={**base, **(env or {})}, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc
