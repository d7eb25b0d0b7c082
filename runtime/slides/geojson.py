"""GeoJSON of a slide's fields, as QuPath imports it."""
from __future__ import annotations

import uuid
from typing import Any

from runtime.slides.fields import SlideField
from runtime.slides.overlay import colour


def feature_collection(fields: list[SlideField], ident: str, foreign: dict[str, Any]) -> dict[str, Any]:
    """A FeatureCollection of the classified fields and those the quality check withheld (class "withheld", grey:
    the fields that can block the verdict are seen in QuPath too; File > Import objects), level-0 pixel polygons;
    each feature's ``id`` a UUID unique to the file (``ident``: its sha256) and field, the same on every run."""
    feats = []
    for f in fields:
        if f.status not in ("classified", "withheld"):
            continue
        ring = [[f.x, f.y], [f.x + f.width, f.y], [f.x + f.width, f.y + f.height], [f.x, f.y + f.height],
                [f.x, f.y]]
        feats.append({"type": "Feature", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ident}#r{f.row}c{f.col}")),
                      "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"objectType": "tile", "name": f"field r{f.row} c{f.col}",
                                     "classification": {"name": f.label or "withheld", "color": list(
                                         colour(f.probability if f.status == "classified" else None))},
                                     "measurements": {"probability": f.probability, "tissue": f.tissue} | (
                                         {} if f.fast_probability is None else
                                         {"fast_probability": f.fast_probability}) | {
                                         f"qc_{k}": v for k, v in (f.quality or {}).items()},
                                     "qc_flags": f.flags,
                                     "rechecked": f.fast_probability is not None,
                                     "row": f.row, "col": f.col}})
    # a foreign member (RFC 7946, 6.1): the region's verdict, its warnings and the model, beside the tiles
    return {"type": "FeatureCollection", "features": feats, "breakhis": foreign}
