"""The stains a model was trained on, as its model directory records them (``stain_reference.json``, hashed in the
manifest like the model files): per-field stain measures of its reference images (by default the export's gate
images of the model's training patients) as a median and a spread each, and the images' mean colour in CIE LAB. The
runtime's per-field stain-drift measure (runtime/pipeline/stain.py) compares a field with these; a model directory
without the file has no stain check."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from runtime.model.manifest import ModelError

STAIN_REFERENCE_NAME = "stain_reference.json"
STAIN_REFERENCE_VERSION = 1


@dataclass(frozen=True)
class Spread:
    """One stain measure over the reference fields."""

    median: float
    p05: float
    p95: float
    low: float  # the lowest reference field's value
    high: float  # the highest


@dataclass(frozen=True)
class StainReference:
    source: str  # where the reference images came from (a folder, and which of its images)
    images: tuple[str, ...]  # their file names
    fields: int  # how many fields were measured
    measures: dict[str, Spread]  # stain measure -> its spread over the reference fields
    lab_mean: tuple[float, float, float]  # the reference images' mean of their per-image LAB mean (OpenCV 8-bit LAB)
    lab_std: tuple[float, float, float]  # ... and of their per-image LAB standard deviation
    version: int = STAIN_REFERENCE_VERSION
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["images"], d["lab_mean"], d["lab_std"] = list(self.images), list(self.lab_mean), list(self.lab_std)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> StainReference:
        """Parse ``stain_reference.json``'s text; ModelError naming ``where`` and the reason where it is unusable
        (not JSON, another version, a field missing, a value not a finite number)."""
        try:
            d = json.loads(text)
            if d.get("version") != STAIN_REFERENCE_VERSION:
                raise ModelError(f"{where}: stain reference version {d.get('version')!r}, this runtime reads "
                                 f"{STAIN_REFERENCE_VERSION}: export the model again")
            ref = cls(source=str(d["source"]), images=tuple(map(str, d["images"])), fields=int(d["fields"]),
                      measures={str(k): Spread(**{n: float(x) for n, x in v.items()})
                                for k, v in d["measures"].items()},
                      lab_mean=_three(d["lab_mean"]), lab_std=_three(d["lab_std"]), notes=dict(d.get("notes", {})))
        except ModelError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{where}: not a readable stain reference ({e!r}): export the model again") from None
        numbers = [*ref.lab_mean, *ref.lab_std, *(x for s in ref.measures.values() for x in asdict(s).values())]
        if ref.fields < 1 or not ref.measures or not all(math.isfinite(x) for x in numbers):
            raise ModelError(f"{where}: the stain reference has no fields, no measures or a value that is not a finite "
                             "number: export the model again")
        return ref


def _three(v: Any) -> tuple[float, float, float]:
    a, b, c = (float(x) for x in v)
    return a, b, c
