"""One comparison (Polygraphy-style): a candidate's outputs against the FP32 reference's, per output, within the
precision table's tolerance (runtime/model/precisions.py), plus label agreement outside the precision's re-check band
(inside it the runtime asks FP32). Every gate uses it: FP32 parity, the FP16/BF16/INT8 variants, ``export verify``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from runtime.model.precisions import PRECISIONS, band_from_logit, in_band, logit_bound_of


@dataclass
class OutputDiff:
    output: str
    max_abs: float
    median_abs: float
    tolerance: float | None  # atol
    rtol: float = 0.0
    worst: float = 0.0  # max over fields of |d| / (atol + rtol |reference|): <= 1 passes

    @property
    def ok(self) -> bool:
        return self.tolerance is None or self.worst <= 1.0

    def limit(self) -> str:
        return f"{self.tolerance:g}" + (f" + {self.rtol:g} |ref|" if self.rtol else "")


@dataclass
class Comparison:
    """Candidate vs reference on the same fields: one row per output, label agreement, non-finite values."""

    candidate: str
    precision: str
    fields: int
    outputs: list[OutputDiff]
    label_agreement: float  # over the fields outside the re-check band
    flips: int  # labels that differ outside the band: the binding count
    non_finite: int  # candidate fields with a NaN or inf output: always a failure
    in_band: int = 0  # fields inside the precision's re-check band (re-checked at FP32 at run time)
    in_band_flips: int = 0  # of those, how many labels FP32's re-check changes
    band: float = 0.0  # the re-check band the labels were judged outside of
    logit_bound: float | None = None  # the logit bound the band was derived from (None: no logits compared)

    @property
    def ok(self) -> bool:
        return (self.non_finite == 0 and all(o.ok for o in self.outputs)
                and self.label_agreement >= PRECISIONS[self.precision].tolerance.labels)

    def reason(self) -> str:
        """Why it failed, in one line ('' when it passed)."""
        why = [f"{self.non_finite} fields gave NaN/inf"] if self.non_finite else []
        why += [f"{o.output} max|d| {o.max_abs:.3g} beyond {o.limit()}" for o in self.outputs if not o.ok]
        if self.label_agreement < PRECISIONS[self.precision].tolerance.labels:
            why.append(f"{self.flips} label flips ({self.label_agreement:.1%} agree)")
        return "; ".join(why)

    def lines(self) -> list[str]:
        out = [f"{self.candidate} ({self.precision}) vs FP32 reference on {self.fields} fields:"]
        for o in self.outputs:
            tol = "reported only" if o.tolerance is None else f"tolerance {o.limit()}, worst {o.worst:.2g} of it"
            out.append(f"  {o.output:12s} max|d|={o.max_abs:.3e} median|d|={o.median_abs:.3e} ({tol}) "
                       f"{'PASS' if o.ok else 'FAIL'}")
        band = self.band
        out.append(f"  labels       {self.label_agreement:.1%} agree, {self.flips} flips "
                   f"(required {PRECISIONS[self.precision].tolerance.labels:.0%}"
                   + (f" outside the re-check band 0.5 +- {band:g})" if band else ")"))
        if band:
            out.append(f"  re-check     {self.in_band} of {self.fields} fields in the band ({self.recheck_share:.1%}), "
                       f"{self.in_band_flips} of their labels set by FP32"
                       + (f"; the band from the logit bound {self.logit_bound:g}" if self.logit_bound else ""))
        if self.non_finite:
            out.append(f"  non-finite   {self.non_finite} fields gave NaN/inf")
        out.append(f"  {'PASS' if self.ok else 'FAIL: ' + self.reason()}")
        return out

    @property
    def recheck_share(self) -> float:
        """The share of fields a run re-checks at FP32, as measured on these fields."""
        return self.in_band / self.fields if self.fields else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok, "reason": self.reason(), "recheck_share": self.recheck_share}

    def summary(self) -> dict:
        """The part the manifest's variant table keeps beside a variant that passed."""
        bound = {} if self.logit_bound is None else {"logit_bound": self.logit_bound}
        return {"fields": self.fields, "label_agreement": self.label_agreement,
                "max_abs": {o.output: o.max_abs for o in self.outputs}, "in_band": self.in_band} | bound


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], precision: str,
            threshold: float, name: str = "candidate", bound: float | None = None,
            logit_bound: float | None = None) -> Comparison:
    """Compare every output the two have in common (``probability`` required), field by field. ``bound``: the
    probability bound where the precision's is derived per model (INT8), else the table's. The re-check band the
    labels are judged outside of: what the logit bound maps to at the threshold (runtime/model/precisions.py), never
    below the probability bound; ``logit_bound`` where it was derived elsewhere (INT8: on its calibration fields,
    then checked here as a tolerance), else derived here from these fields' largest |d logit| (where both give
    logits; without them the band is the probability bound)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    tol = PRECISIONS[precision].tolerance
    band = PRECISIONS[precision].band
    if bound is not None:
        tol, band = replace(tol, probability=bound), bound
    ref = {k: np.asarray(v, np.float64).reshape(-1) for k, v in reference.items()}
    got = {k: np.asarray(v, np.float64).reshape(-1) for k, v in candidate.items()}
    if ref["probability"].shape != got["probability"].shape:
        raise ValueError(f"reference has {ref['probability'].size} fields, candidate {got['probability'].size}")
    if logit_bound is not None:
        tol = replace(tol, logit=logit_bound)
    elif precision != "fp32" and "logit" in ref and "logit" in got:
        d = np.abs(ref["logit"] - got["logit"])
        logit_bound = logit_bound_of(float(d.max())) if np.isfinite(d).all() else None  # NaN/inf: fails below
    if logit_bound is not None:
        band = max(band, band_from_logit(logit_bound, threshold))
    bad = np.zeros(ref["probability"].shape, bool)
    rows = []
    for out in sorted(set(ref) & set(got)):
        finite = np.isfinite(got[out])
        bad |= ~finite
        d = np.abs(ref[out] - got[out])
        d = np.where(finite, d, np.inf)
        atol = tol.bound(out)
        worst = float((d / (atol + tol.rtol * np.abs(ref[out]))).max()) if atol is not None else 0.0
        rows.append(OutputDiff(out, float(d.max()), float(np.median(d)), atol, tol.rtol if atol is not None else 0.0,
                               worst))
    agree = (ref["probability"] > threshold) == (got["probability"] > threshold)
    agree &= ~bad
    inside = in_band(got["probability"], threshold, band) & ~bad
    outside = agree[~inside]
    return Comparison(name, precision, int(agree.size), rows, float(outside.mean()) if outside.size else 1.0,
                      int((~outside).sum()), int(bad.sum()), int(inside.sum()), int((~agree[inside]).sum()), band,
                      logit_bound)


def effective_ms(ms_per_field: dict[str, float], recheck_share: float, precision: str = "bf16") -> float:
    """A faster tier's time per field counting its re-checks: its own time, plus FP32's for the share of fields
    that fall inside its band."""
    return ms_per_field[precision] + recheck_share * ms_per_field["fp32"]
