"""Where things live, configured in one place: the models folder and the shared folder of samples and weights.

  BREAKHIS_SHARED        the shared folder (default: ../shared beside the repository): data/breakhis-100x holds the
                         sample images, models/breakhis-scratch-v1 the trained weights
  BREAKHIS_MODEL         the model directory used when none is named
  BREAKHIS_KERNEL_CACHE  compiled CUDA kernels (runtime/gpu/build.py; default ~/.cache/breakhis-edge/kernels)
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
TRAINED_NAME = "breakhis-scratch-v1"  # exported by setup.sh where the shared folder holds the trained weights
UNTRAINED_NAME = "reference"


def shared_dir() -> Path:
    return Path(os.environ.get("BREAKHIS_SHARED") or REPO.parent / "shared")


def sample_images() -> Path:
    """The real BreakHis 100X samples (tests, gates, benchmarks)."""
    return shared_dir() / "data" / "breakhis-100x"


def trained_weights() -> Path:
    """The folder with the trained model's weights.pt and train_report.json."""
    return shared_dir() / "models" / TRAINED_NAME


def default_model_dir() -> Path:
    """The model used when none is named: $BREAKHIS_MODEL, else the trained model where setup.sh exported it,
    else the seeded untrained reference (machines without the shared folder)."""
    env = os.environ.get("BREAKHIS_MODEL")
    if env:
        return Path(env)
    trained = MODELS / TRAINED_NAME
    return trained if (trained / "manifest.json").is_file() else MODELS / UNTRAINED_NAME
