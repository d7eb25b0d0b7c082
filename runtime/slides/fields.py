"""One field of a slide: where it lies in level-0 pixels, its tissue, status and probability."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SlideField:
    row: int
    col: int
    x: int  # level-0 pixels: the field's top-left corner and size
    y: int
    width: int
    height: int
    tissue: float  # fraction of the field's thumbnail pixels that are not background
    status: str  # "classified", "background" (skipped by the tissue mask), "withheld" (--qc withhold) or "error"
    probability: float | None = None  # FP32's where the field was re-checked
    label: str | None = None
    error: str | None = None
    fast_probability: float | None = None  # the fast tier's, where FP32 re-checked the field
    quality: dict[str, float] | None = None  # its quality measures (runtime/pipeline/quality.py)
    flags: list[str] = field(default_factory=list)  # the quality limits it crosses
