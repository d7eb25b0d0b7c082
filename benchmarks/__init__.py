"""Latency and memory of the runtime against the PyTorch FP32 eager baseline, measured in one run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path | None, result: Any) -> None:
    """Write a benchmark's result where --json asked for it (nothing when it did not)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
