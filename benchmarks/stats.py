"""One way to summarise every row of the benchmark, per-image or folder or server alike: samples are seconds per
image (an image's own time where images run one by one, the time from one result to the next where a pipeline
overlaps them), summarised as mean, p50, p95 and the spread (standard deviation / mean). A ratio between two rows is
paired by round: in each round (every phase once, one after another, every other round in reverse order) the ratio of
the two rows' means, the statistic that adds up to the wall time of the images; the row's ratio is made of the median
of the forward rounds' ratios and that of the reversed rounds', weighing half each (``ratio``: symmetric, a steady
drift of the machine's speed cancels, one slowed phase does not move it), the rounds' ratios kept beside it. The mean
columns pool every round's samples, so two rows' means need not divide exactly into their ratio."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NotMeasured(ValueError):
    """A row with nothing to summarise (no samples, or a net time that is not positive): the runner reports it as
    skipped, with this reason, and keeps the other rows."""


def summarise(samples_s: Sequence[float], images: int | None = None, wall_s: float | None = None) -> dict:
    """mean/p50/p95/std in ms and spread of per-image samples. ``wall_s`` and ``images``, where the row has no
    per-image samples (a slide or a cohort timed whole), give the mean alone."""
    if wall_s is not None:
        if not images or not np.isfinite(wall_s) or wall_s <= 0:
            raise ValueError(f"a timed row needs images > 0 and a finite wall time, not {images} and {wall_s}")
        return {"mean_ms": wall_s / images * 1e3, "p50_ms": None, "p95_ms": None, "std_ms": None, "spread": None,
                "samples": 0, "images": images}
    ms = np.asarray(samples_s, dtype=float) * 1e3
    if ms.size == 0 or not np.isfinite(ms).all():
        raise ValueError("a timed row needs finite samples")
    mean = float(ms.mean())
    std = float(ms.std(ddof=1)) if ms.size > 1 else 0.0
    return {"mean_ms": mean, "p50_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "std_ms": std,
            "spread": std / mean if mean > 0 else None, "samples": int(ms.size), "images": images or int(ms.size)}


def round_ratios(reference: dict | None, row: dict) -> list[float] | None:
    """How many times faster ``row`` is than ``reference`` per image in each round: the ratio of their means in that
    round (>1: faster); None where either has no rounds' means or their rounds differ in number."""
    if reference is None:
        return None
    ref, own = reference.get("round_means_ms") or [], row.get("round_means_ms") or []
    if not own or len(ref) != len(own):
        return None
    return [a / b for a, b in zip(ref, own)]


RATIO_METHOD = ("paired by round: the rounds' ratios of means, their median among the forward rounds and among the "
                "reversed rounds, the two weighing half each (geometric)")


def ratio(reference: dict | None, row: dict) -> float | None:
    """How many times faster ``row`` is than ``reference`` per image, from the rounds' paired ratios: the median of
    the runner's forward rounds (1, 3, ...) and that of its reversed rounds (2, 4, ...), the two weighing half each
    (geometric mean). Symmetric (A against B is 1 / B against A); a steady drift of the machine's speed moves the
    forward and the reversed rounds' ratios in opposite directions and cancels; one round in which a single phase was
    slowed (what a shared VM does: a phase 20-30 % slower now and then) does not move the median once a direction
    has 3 rounds or more."""
    rounds = round_ratios(reference, row)
    if not rounds:
        return None
    logs = np.log(rounds)
    return float(np.exp(np.mean([np.median(logs[0::2]), *([np.median(logs[1::2])] if len(logs) > 1 else [])])))


def merge(rounds: list[dict]) -> dict:
    """One row from a phase's raw rows, one per round (each round a fresh process): the samples of every round
    summarised together, the CPU time per image over all of them, the largest peak RSS; per-round extras kept."""
    first = rounds[0]
    images = sum(r["images"] for r in rounds)
    samples = [s for r in rounds for s in r["samples_s"]]
    if samples:
        stats = summarise(samples, images)
    else:  # timed whole: every round's net time must be a measurement, none averaged in where it is not
        net = [r["net_s"] for r in rounds]
        if None in net:
            raise NotMeasured(f"no samples: {images} images gave no per-image sample and no net time")
        if bad := [f"round {k + 1}: {x:.3f} s" for k, x in enumerate(net) if not (np.isfinite(x) and x > 0)]:
            raise NotMeasured(f"net time (wall less the fixed cost) not positive, not a measurement: {', '.join(bad)}")
        stats = summarise([], images, sum(net))
    cpu = [r["cpu_s"] for r in rounds]
    rss = [r["peak_rss_mb"] for r in rounds]
    # each round's own mean per image, for the ratios paired by round
    if samples and (empty := [k + 1 for k, r in enumerate(rounds) if not r["samples_s"]]):
        raise NotMeasured(f"no samples in round {', '.join(map(str, empty))}: its rounds cannot be paired")
    means = [float(np.mean(r["samples_s"])) * 1e3 if samples else r["net_s"] / r["images"] * 1e3 for r in rounds]
    out = {"how": {"method": first["how"], "rounds": len(rounds)}, "tier": first["tier"], **stats,
           "round_means_ms": means,
           "cpu_ms": sum(cpu) / images * 1e3 if None not in cpu else None,
           "peak_rss_mb": max(rss) if None not in rss else None}
    if "stage_s" in first:
        out["stages_ms"] = {k: {f"p{q}": float(np.percentile(np.concatenate([r["stage_s"][k] for r in rounds]) * 1e3,
                                                             q)) for q in (50, 95, 99)} for k in first["stage_s"]}
    classified = sum(r.get("fields", {}).get("classified", 0) for r in rounds)
    if classified:  # the timed fields of every round, and how many of them were re-checked at FP32
        out["fields_classified"] = classified
        out["fields_rechecked"] = sum(r["fields"]["rechecked"] for r in rounds)
        out["recheck_share"] = out["fields_rechecked"] / classified
    for k in ("precision", "probabilities", "threshold"):  # the first round's, for the fidelity columns
        if k in first:
            out[k] = first[k]
    if any(r["round"] for r in rounds):
        out["rounds"] = [r["round"] for r in rounds]
    return out
