"""A slide's result (`SlideResult`): its fields, verdict, scale and model, and its outputs (one module per format)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.pipeline.results import ModelInfo
from runtime.slides import geojson, probability_map, table
from runtime.slides.fields import SlideField
from runtime.slides.files import write_atomic


@dataclass
class SlideResult:
    path: str
    size: tuple[int, int]  # level-0 (width, height)
    levels: int
    scale: dict[str, Any]  # what the input states, where from, the model's, the factor and the level read
    aggregate: dict[str, Any]  # rule, value, label, meaning
    counts: dict[str, int]
    tissue_rule: str
    fields: list[SlideField] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    model: ModelInfo | None = None
    sha256: str | None = None  # of the file classified, where it was hashed (its outputs are named by it)

    @property
    def left_out(self) -> bool:
        """No verdict because fields were left out (withheld by the quality check, or unread) and the counted ones
        do not give the positive label (the aggregate's note says why)."""
        return "unread" in self.aggregate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"model": self.model.to_dict() if self.model else {}}

    def geojson(self) -> dict[str, Any]:
        """The GeoJSON FeatureCollection of the classified fields (``runtime/slides/geojson.py``)."""
        return geojson.feature_collection(self.fields, f"breakhis-edge:{self.sha256 or self.path}", {
            "aggregate": self.aggregate, "warnings": self.warnings, "model": self.model_tag()})

    def csv(self) -> str:
        """One CSV row per field (``runtime/slides/table.py``)."""
        return table.field_csv(self.fields, self.model_tag())

    def probability_map(self) -> bytes:
        """The pyramidal OME-TIFF probability map (``runtime/slides/probability_map.py``)."""
        return probability_map.ome_tiff(self.fields, self.scale.get("mpp"))

    def model_tag(self) -> str:
        """The model as a table cell says it: name@sha256 (first 12) and the precision that ran."""
        m = self.model
        return f"{m.name}@{m.sha256[:12]} {m.precision}" if m else ""

    def outputs(self) -> dict[str, bytes]:
        """STEM suffix -> bytes: .geojson, .csv, .json and the probability map .probability.ome.tif (the overlay PNG
        is made while classifying)."""
        return {".geojson": (json.dumps(self.geojson()) + "\n").encode(), ".csv": self.csv().encode(),
                ".json": (json.dumps(self.to_dict(), indent=1) + "\n").encode(),
                ".probability.ome.tif": self.probability_map()}

    def save(self, stem: str | Path) -> None:
        """Write every output beside STEM, each under a temporary name renamed into place."""
        for suffix, data in self.outputs().items():
            write_atomic(Path(f"{stem}{suffix}"), data)
