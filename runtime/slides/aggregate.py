"""The region's verdict from its fields, by a named rule."""
from __future__ import annotations

from typing import Any

import numpy as np

from runtime.pipeline.results import withheld_count
from runtime.slides.fields import SlideField

AGGREGATES = ("max", "topk", "mean", "fraction")


def aggregate_verdict(probs: list[float | None], rule: str, top_k: int, threshold: float,
                      labels: tuple[str, str], withheld: list[SlideField] | None = None,
                      unread: int = 0) -> dict[str, Any]:
    """The region's verdict from its classified fields, by a named rule (max = the screening default). Fields left
    out, ``withheld`` by the quality check or ``unread`` (a damaged tile), can only take a verdict away: every rule
    grows with each field's probability, so the region keeps the positive label only where the rule gives it with
    each field left out counted at 0, the lowest it could be (for max, the counted fields alone); otherwise, with any
    field left out, it gets no verdict (a note that says why: a field left out could be the positive one)."""
    p = np.asarray([v for v in probs if v is not None], np.float64)
    held = withheld or []
    meaning = {"max": "highest field probability: one malignant field makes the region Malignant (screening)",
               "topk": f"mean of the {top_k} highest field probabilities",
               "mean": "mean field probability",
               "fraction": f"fraction of fields that are {labels[1]}; {labels[1]} when above {threshold:g}"}[rule]
    out: dict[str, Any] = {"rule": rule, "meaning": meaning, "fields": int(p.size)}
    if rule == "topk":
        out["k"] = top_k
    left_out = len(held) + unread
    lowest = np.concatenate([p, np.zeros(left_out)])  # the fields left out at their lowest: a bound from below
    value = None if not p.size else float({"max": lambda: lowest.max(),
                                           "topk": lambda: np.sort(lowest)[-top_k:].mean(),
                                           "mean": lambda: lowest.mean(),
                                           "fraction": lambda: (lowest > threshold).mean()}[rule]())
    if left_out and (value is None or value <= threshold):
        total = p.size + left_out
        left = ([withheld_count(held, total)] if held else []) + \
            ([f"{unread} of {total} fields could not be read"] if unread else [])
        counted = "no field was counted" if value is None else \
            f"with the fields left out at their lowest, {rule} = {value:.4f}, not above {threshold:g}"
        return out | {"value": None, "label": None, "withheld": len(held), "unread": unread,
                      "note": f"no verdict: {'; '.join(left)}; {counted}, and a field left out could be {labels[1]}, "
                              f"so the region is not called {labels[0]}"}
    if value is None:
        return out | {"value": None, "label": None, "note": "no tissue field to classify"}
    verdict = out | {"value": value, "label": labels[1] if value > threshold else labels[0]}
    if left_out:
        verdict["note"] = (f"{left_out} of {p.size + left_out} fields left out, counted at 0 (their lowest): "
                           f"{labels[1]} whatever they were")
    return verdict


def region_verdict(fields: list[SlideField], rule: str, top_k: int, threshold: float,
                   labels: tuple[str, str]) -> dict[str, Any]:
    """``aggregate_verdict`` of a slide's fields: the classified ones counted, the withheld and unread left out."""
    return aggregate_verdict([f.probability for f in fields if f.status == "classified"], rule, top_k, threshold,
                             labels, [f for f in fields if f.status == "withheld"],
                             sum(f.status == "error" for f in fields))
