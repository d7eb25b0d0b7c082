"""One comparison and one tolerance table (Polygraphy-style): a candidate's outputs against the FP32 reference's,
per output, plus label agreement. Every gate uses it: FP32 parity, the FP16/INT8 variants, ``export verify``."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """What a precision must meet against FP32, per output as Polygraphy states it: every field within
    ``atol + rtol * |reference|``. ``None``: that output is reported only."""

    probability: float | None  # atol on the probability
    logit: float | None  # atol on the logit
    labels: float = 1.0  # fraction of fields whose label must agree
    rtol: float = 0.0  # the relative part, for every checked output

    def bound(self, output: str) -> float | None:
        return getattr(self, output, None)


# FP32: another runtime of the same arithmetic (PyTorch vs ONNX Runtime, one CPU's kernels vs another's, CPU vs GPU):
# only the summation order differs. Float32 rounds each operation by at most u = 2^-24 = 6e-8; a dot product of length
# K summed in another order differs by about sqrt(K) u (at worst K u) of the size of its terms. Over this network's
# layers (13 convolutions with K = 27 ... 4608, Dense 512, the LSTM's 1012 per gate and step, Dense 1000) sqrt(K)
# adds up to about 700: about 4e-5 of the size of the terms behind the logit. Where the logit is large (a steep output
# layer) that is relative to the logit; near the decision boundary the terms cancel and only an absolute bound holds.
# Hence atol 1e-4 plus rtol 1e-4, on logits and probabilities (|d p| <= |d logit| / 4), labels identical. Measured
# 2026-12-01 by `python -m benchmarks.fp32_parity` (PyTorch vs ONNX Runtime, 12 shared fields, AMD EPYC Zen 5, with
# PyTorch's oneDNN at AVX-512 / limited to AVX2): worst |d| / (atol + rtol |ref|) = 0.05 / 0.14 (flat reference
# model), 0.002 / 0.004 (trained), 0.045 / 0.049 (trained, output layer x100: logits up to 393, |d logit| 1.5e-4, which
# an absolute 1e-4 alone refuses). A wrong import (channels swapped, LSTM gates transposed) is more than 100 times the
# bound (tests/test_fidelity.py).
# FP16/INT8: 1e-2 on the probability (a decision 0.5 +- 0.01 is a coin toss either way) and every label kept.
# BF16: 3e-2. BF16 keeps 8 significant bits (each rounding off by up to 2^-9 = 0.2 %); rounded again at each of the
# ~16 layers (accumulation stays FP32), the features drift by 1-2 %, i.e. |d logit| ~0.1 at this model's logit scale,
# and |d probability| <= 0.25 |d logit| ~0.025. Measured: 0.0115 on the 48 shared images, 0.019 on 150 (issue 14).
# Labels are the binding part: every one kept.
TOLERANCES = {
    "fp32": Tolerance(probability=1e-4, logit=1e-4, rtol=1e-4),
    "fp16": Tolerance(probability=1e-2, logit=None),
    "bf16": Tolerance(probability=3e-2, logit=None),
    "int8": Tolerance(probability=1e-2, logit=None),
}


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
    label_agreement: float
    flips: int
    non_finite: int  # candidate fields with a NaN or inf output: always a failure

    @property
    def ok(self) -> bool:
        return (self.non_finite == 0 and all(o.ok for o in self.outputs)
                and self.label_agreement >= TOLERANCES[self.precision].labels)

    def reason(self) -> str:
        """Why it failed, in one line ('' when it passed)."""
        why = [f"{self.non_finite} fields gave NaN/inf"] if self.non_finite else []
        why += [f"{o.output} max|d| {o.max_abs:.3g} beyond {o.limit()}" for o in self.outputs if not o.ok]
        if self.label_agreement < TOLERANCES[self.precision].labels:
            why.append(f"{self.flips} label flips ({self.label_agreement:.1%} agree)")
        return "; ".join(why)

    def lines(self) -> list[str]:
        out = [f"{self.candidate} ({self.precision}) vs FP32 reference on {self.fields} fields:"]
        for o in self.outputs:
            tol = "reported only" if o.tolerance is None else f"tolerance {o.limit()}, worst {o.worst:.2g} of it"
            out.append(f"  {o.output:12s} max|d|={o.max_abs:.3e} median|d|={o.median_abs:.3e} ({tol}) "
                       f"{'PASS' if o.ok else 'FAIL'}")
        out.append(f"  labels       {self.label_agreement:.1%} agree, {self.flips} flips "
                   f"(required {TOLERANCES[self.precision].labels:.0%})")
        if self.non_finite:
            out.append(f"  non-finite   {self.non_finite} fields gave NaN/inf")
        out.append(f"  {'PASS' if self.ok else 'FAIL: ' + self.reason()}")
        return out

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok, "reason": self.reason()}

    def summary(self) -> dict:
        """The part the manifest's variant table keeps beside a variant that passed."""
        return {"fields": self.fields, "label_agreement": self.label_agreement,
                "max_abs": {o.output: o.max_abs for o in self.outputs}}


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], precision: str,
            threshold: float, name: str = "candidate") -> Comparison:
    """Compare every output the two have in common (``probability`` required), field by field."""
    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {', '.join(TOLERANCES)}, not {precision!r}")
    tol = TOLERANCES[precision]
    ref = {k: np.asarray(v, np.float64).reshape(-1) for k, v in reference.items()}
    got = {k: np.asarray(v, np.float64).reshape(-1) for k, v in candidate.items()}
    if ref["probability"].shape != got["probability"].shape:
        raise ValueError(f"reference has {ref['probability'].size} fields, candidate {got['probability'].size}")
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
    return Comparison(name, precision, int(agree.size), rows, float(agree.mean()), int((~agree).sum()),
                      int(bad.sum()))
