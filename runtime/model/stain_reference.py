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
DRIFT_MEASURES = ("h99", "e99")  # the measures a field's stain drift reads (runtime/pipeline/stain.py)
# ... each of whose values must lie here: a stain amount in optical density units, positive (the densest stain of a
# field), and at most 10 (an 8-bit pixel's density is at most log10(256) = 2.4 per channel)
AMOUNT_RANGE = (1e-3, 10.0)


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
    def from_json(cls, text: str | bytes, where: str) -> StainReference:
        """Parse ``stain_reference.json``'s text; ModelError naming ``where`` and the reason where it is unusable
        (not JSON, another version, a field missing or of the wrong type, a value not a finite number, a spread out
        of order, a drift measure missing or outside AMOUNT_RANGE)."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
            version = d.get("version")
            if type(version) is not int or version != STAIN_REFERENCE_VERSION:
                raise ModelError(f"{where}: stain reference version {version!r}, this runtime reads "
                                 f"{STAIN_REFERENCE_VERSION}: export the model again")
            measures = d["measures"]
            if not isinstance(measures, dict) or any(not isinstance(v, dict) or set(v) != set(_SPREAD)
                                                     for v in measures.values()):
                raise TypeError(f"measures must each have exactly {', '.join(_SPREAD)}")
            ref = cls(source=_typed(d["source"], str, "source"),
                      images=tuple(_typed(x, str, "an image name") for x in _typed(d["images"], list, "images")),
                      fields=_typed(d["fields"], int, "fields"),
                      measures={str(k): Spread(**{n: _number(v[n], f"{k}.{n}") for n in _SPREAD})
                                for k, v in measures.items()},
                      lab_mean=_three(d["lab_mean"]), lab_std=_three(d["lab_std"]),
                      notes=_typed(d.get("notes", {}), dict, "notes"))
            if ref.fields < 1:
                raise ValueError("no fields")
            for k, sp in ref.measures.items():
                if not sp.low <= sp.p05 <= sp.median <= sp.p95 <= sp.high:
                    raise ValueError(f"{k}: low <= p05 <= median <= p95 <= high does not hold")
            for k in DRIFT_MEASURES:
                sp = ref.measures[k]
                if not (AMOUNT_RANGE[0] <= sp.low and sp.high <= AMOUNT_RANGE[1]):
                    raise ValueError(f"{k}: its values must lie in {AMOUNT_RANGE} (optical density)")
        except ModelError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
            raise ModelError(f"{where}: not a usable stain reference ({e!r}): export the model again") from None
        return ref


_SPREAD = ("median", "p05", "p95", "low", "high")


def _typed(v: Any, kind: type, what: str) -> Any:
    """``v`` where it is of ``kind`` (a bool is not an int here); TypeError naming ``what`` otherwise."""
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise TypeError(f"{what} is not a {kind.__name__}")
    return v


def _number(v: Any, what: str) -> float:
    """A finite JSON number (not a bool); TypeError or ValueError naming ``what`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{what} is not a number")
    x = float(v)  # OverflowError for an integer beyond a float
    if not math.isfinite(x):
        raise ValueError(f"{what} is not a finite number")
    return x


def _three(v: Any) -> tuple[float, float, float]:
    if not isinstance(v, list) or len(v) != 3:
        raise TypeError("a LAB triple is not a list of three numbers")
    a, b, c = (_number(x, "a LAB value") for x in v)
    return a, b, c
