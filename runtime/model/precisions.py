"""The one precision table: for each precision, its file, the backends that run it, where "auto" prefers it, how
TensorRT builds it, OpenVINO's hint, and the tolerance its gate applies (also its re-check band's floor); and the
re-check band's derivation from a gate's logit bound (``logit_bound_of``, ``band_from_logit``). Adding a precision is
one row (and the export step that makes its file)."""
from __future__ import annotations

import math
from dataclasses import dataclass

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


MARGIN = 2.0  # a maximum measured on a few dozen fields grows on unseen ones (BF16's grew 1.9x from 48 to 374 images)


def round_up(x: float) -> float:
    """Up to two significant digits (a bound is never rounded down)."""
    if not x > 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return round(math.ceil(x / step - 1e-9) * step, 12)


def logit_bound_of(measured: float) -> float:
    """The logit bound a gate derives from the largest |d logit| it measured: MARGIN times it, rounded up."""
    return round_up(MARGIN * measured)


def band_from_logit(bound: float, threshold: float) -> float:
    """The probability band that a logit bound ``bound`` maps to at ``threshold``: the widest distance from the
    threshold at which the fast tier's probability can still have FP32's on the other side,
    max(sigmoid(logit_t + b) - t, t - sigmoid(logit_t - b)), logit_t the threshold's logit (at t = 0.5:
    sigmoid(b) - 0.5, which is below b / 4). Outside it (|p - t| > band), |logit - logit_t| > b, so FP32's logit,
    within b, lies on the same side: the same label."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold {threshold} is not a probability strictly between 0 and 1")
    if not bound > 0:
        return 0.0
    lt = math.log(threshold / (1 - threshold))
    return max(_sigmoid(lt + bound) - threshold, threshold - _sigmoid(lt - bound))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def in_band(probability: np.ndarray | float, threshold: float, band: float) -> np.ndarray:
    """Which probabilities lie within ``band`` of the threshold, edges included (a re-check band of 0: none)."""
    return (np.abs(np.asarray(probability, np.float64) - threshold) <= band) & (band > 0)


@dataclass(frozen=True)
class Precision:
    name: str
    file: str  # the ONNX file of its variant ("model.onnx": the FP32 file, executed at this precision)
    backends: tuple[str, ...]  # the backends that run it ("cpu" is ONNX Runtime on the CPU)
    tolerance: Tolerance  # its gate against the FP32 reference (bounds explained below)
    role: str  # what it is for, in the words an error message uses
    made_by: str  # "export": always; "--variants": by the export where asked (auto: where it runs); else its command
    auto: str = ""  # where --precision auto prefers it: "gpu", or "cpu" (a CPU with native support); "": never
    cpu_capability: str = ""  # the OpenVINO CPU capability it needs natively (checked before the variant table)
    trt10_flags: tuple[str, ...] | None = None  # TensorRT 10 builds it from the FP32 ONNX with these; None: no engine
    openvino_hint: str = ""  # OpenVINO's INFERENCE_PRECISION_HINT where OpenVINO runs it
    tensor_cores: bool = True  # ONNX Runtime CUDA may use tensor-core math (TF32); FP32 means FP32: off

    @property
    def band(self) -> float:
        """The floor of its re-check band around the threshold: the probability bound of its gate (0 for FP32, the
        reference itself). A model's band is this or, where larger, what its gate's logit bound maps to
        (``band_from_logit``; runtime/model/model_dir.py: ``recheck_band``)."""
        return 0.0 if self.name == "fp32" else float(self.tolerance.probability or 0.0)


GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda")

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
# FP16: 1e-2 on the probability (a decision 0.5 +- 0.01 is a coin toss either way) and every label kept.
# INT8: its bounds are derived per model by `python -m export int8` (export/int8.py: the largest |d p| and |d logit|
# NNCF's model shows on its calibration fields, x MARGIN for unseen ones) and recorded in its gate; 1e-2 is its floor.
# BF16: 3e-2. BF16 keeps 8 significant bits (each rounding off by up to 2^-9 = 0.2 %); rounded again at each of the
# ~16 layers (accumulation stays FP32), the features drift by 1-2 %, i.e. |d logit| ~0.1 at this model's logit scale,
# and |d probability| <= 0.25 |d logit| ~0.025. Measured: 0.0115 on the 48 shared images, 0.019 on 150 (2026-11-25).
# Labels are the binding part: every one kept.
# The re-check band. A bound holds for every field; a label does not: a field whose FP32 probability is 0.498 moves
# across 0.5 under any arithmetic that is not FP32's (measured 2026-12-02 on 374 unseen BreakHis 100X images: BF16
# kept its 0.03 bound, worst 0.022, and gave 2 labels opposite to FP32's, at p 0.508 and 0.498). So where a faster
# precision's probability lies within its band of the threshold (edges included) the field is classified again at
# FP32 and FP32's answer is the result (runtime/pipeline/recheck.py). The band comes from a bound on the LOGIT, not
# the probability: the sigmoid squeezes probability differences by p (1 - p), 1/4 at p = 0.5 and far less away from
# it, so the largest |d p| a gate sees depends on how many of its fields lie near 0.5 (BF16 on the trained model: max
# |d p| 0.0115 but |d logit| 0.088, i.e. up to 0.022 at p = 0.5, which the 374 unseen images reached). Each gate
# measures max |d logit| on its fields; its logit bound b is MARGIN times that, rounded up (``logit_bound_of``); the
# band is what b maps to at the threshold (``band_from_logit``: sigmoid(logit_t + b) - t), never below the table's
# probability tolerance (the floor, ``Precision.band``). Outside the band the fast logit is more than b from the
# threshold's, so FP32's (within b) is on the same side: every label is FP32's as far as the logit bound holds.
# Gates require every label outside the band to agree and report how many gate fields fall inside it (the expected
# re-check share); the logit bound is recorded as ``logit_bound`` in the variant's gate (model_dir.py: recheck_band).
PRECISIONS = {p.name: p for p in (
    Precision("fp32", "model.onnx", ("cpu", "openvino", *GPU_BACKENDS), Tolerance(1e-4, 1e-4, rtol=1e-4),
              "the reference, run by every backend", "export", trt10_flags=(), openvino_hint="f32",
              tensor_cores=False),
    Precision("fp16", "model.fp16.onnx", ("cpu", *GPU_BACKENDS), Tolerance(1e-2, None),
              "the GPU tier (TensorRT, ONNX Runtime CUDA; the cpu backend checks it)", "--variants", auto="gpu",
              trt10_flags=("FP16", "OBEY_PRECISION_CONSTRAINTS")),
    Precision("bf16", "model.onnx", ("openvino",), Tolerance(3e-2, None),
              "the CPU tier, run by OpenVINO (use --backend openvino, or auto on a CPU with native BF16)",
              "--variants", auto="cpu", cpu_capability="BF16", openvino_hint="bf16"),
    Precision("int8", "model.int8.qdq.onnx", ("cpu", *GPU_BACKENDS), Tolerance(1e-2, None),
              "Q/DQ INT8 for TensorRT (python -m export int8)", "export int8",
              trt10_flags=("INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS")),
)}
CHOICES = ("auto", *PRECISIONS)  # --precision
ENGINE_PRECISIONS = tuple(p.name for p in PRECISIONS.values() if p.trt10_flags is not None)
OPTIONAL_VARIANTS = tuple(p.name for p in PRECISIONS.values() if p.made_by == "--variants")


def preferred(device: str) -> Precision | None:
    """The precision "auto" prefers on a "gpu" or a "cpu" (where its variant passed and the device supports it)."""
    return next((p for p in PRECISIONS.values() if p.auto == device), None)


def runs_on(backend: str) -> list[str]:
    """The precisions a backend runs."""
    return [p.name for p in PRECISIONS.values() if backend in p.backends]
