"""INT8 by explicit quantisation: Q/DQ nodes in the ONNX (what TensorRT builds INT8 engines from), made by NNCF's
post-training quantisation with accuracy control on real fields, then judged like every faster tier: its bound is
derived from what it measures, its gate runs on held-out fields, and it is kept only where its effective time per
field (its own plus its re-check share at FP32) beats the best gated tier on this machine.

- Calibration and accuracy control on the first ``calib_count`` images' fields. The validation metric is the gate's
  own label check: the share of those fields whose INT8 label is FP32's; with a maximum drop of 0, NNCF keeps in
  floating point the layers that cost a label (symmetric activations and weights: TensorRT needs zero points of 0).
- The bounds: the largest |d probability| and |d logit| on the calibration fields, times MARGIN (a maximum
  measured on a few dozen fields grows on unseen ones: BF16's grew 1.9x from 48 to 374 images), the probability
  bound never below the table's INT8 tolerance. Its re-check band is what the logit bound maps to at the threshold,
  never below the probability bound (runtime/model/precisions.py; recorded as ``bound`` and ``logit_bound`` in the
  variant's gate; ``ModelDir.band``).
- The gate: every held-out field within both bounds, every label outside the band FP32's (``compare``).
- The speed: INT8 and FP32 per field on ONNX Runtime CPU at batch 1 (and BF16's gate figures where this CPU runs
  it); INT8's effective time = its time + its held-out re-check share x FP32's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from export.verify import ort_ms_per_field, ort_outputs
from runtime.io.decode import decoder_messages
from runtime.io.fields import folder_fields
from runtime.model.fidelity import Comparison, compare, effective_ms
from runtime.model.manifest import Variant
from runtime.model.model_dir import ModelDir
from runtime.model.precisions import MARGIN, PRECISIONS, logit_bound_of, round_up

QDQ_FILE = PRECISIONS["int8"].file
TIMED = 4  # fields each tier is timed on (after one warm-up)


def quantize(model_dir: Path, calib_images: Path, calib_count: int = 24,
             log: Any = print) -> tuple[Path, float, float]:
    """Write model_dir/.model.int8.qdq.onnx.tmp (not yet part of the model); returns it and the derived bounds on
    the probability and on the logit."""
    import nncf
    import onnx
    import onnxruntime as ort

    model = ModelDir.open(model_dir)
    manifest = model.manifest
    fields = folder_fields(calib_images, manifest.contract, calib_count)
    if not len(fields):
        raise ValueError(f"{calib_images}: no usable images for INT8 calibration")
    fp32, _ = model.file(model.variant("fp32").file)
    reference = ort_outputs(fp32, fields, input_name=manifest.input_name)
    threshold = manifest.contract.threshold
    name = manifest.input_name

    items = list(fields)  # NNCF hands the validation function these very arrays (or a subset of them)
    where = {id(x): i for i, x in enumerate(items)}

    def outputs(m: onnx.ModelProto, data: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(the logits and probabilities of ``m``, FP32's) on the fields in ``data``."""
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        data = list(data)
        runs = [sess.run(["logit", "probability"], {name: x[None]}) for x in data]
        at = [where[id(x)] for x in data]
        return ({k: np.concatenate([r[i].reshape(-1) for r in runs]) for i, k in enumerate(("logit", "probability"))},
                {k: reference[k][at] for k in ("logit", "probability")})

    def labels_kept(m: onnx.ModelProto, data: Any) -> tuple[float, list[float]]:
        got, ref = outputs(m, data)
        kept = ((got["probability"] > threshold) == (ref["probability"] > threshold)).astype(float)
        return float(kept.mean()), kept.tolist()

    dataset = nncf.Dataset(items, lambda x: {name: x[None]})
    log(f"INT8 (NNCF, accuracy control: every label of the {len(items)} calibration fields kept) ...")
    with decoder_messages() as said:  # NNCF's progress bars and INFO lines, kept off the console
        quantized = nncf.quantize_with_accuracy_control(
            onnx.load(str(fp32)), dataset, dataset, labels_kept, max_drop=0.0, drop_type=nncf.DropType.ABSOLUTE,
            preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(items))
    for line in said:
        if any(k in line for k in ("were reverted", "achieved required", "Total number of quantized")):
            log("  NNCF: " + line.split("nncf:", 1)[-1])
    got, ref = outputs(quantized, items)
    measured, measured_logit = (float(np.abs(got[k] - ref[k]).max()) for k in ("probability", "logit"))
    floor = PRECISIONS["int8"].tolerance.probability or 0.0
    bound = max(floor, round_up(MARGIN * measured))
    logit = logit_bound_of(measured_logit)
    log(f"  calibration fields: max |d probability| {measured:.3g}, |d logit| {measured_logit:.3g}; bounds "
        f"(x{MARGIN:g}) {bound:g} and {logit:g}")
    tmp = Path(model_dir) / f".{QDQ_FILE}.tmp"
    onnx.save(quantized, str(tmp))
    return tmp, bound, logit


def gate(model_dir: Path, candidate: Path, images: Path, skip: int, bound: float, logit: float) -> Comparison:
    """The INT8 candidate vs the FP32 model on ONNX Runtime CPU, on every field of the folder's images after the
    first ``skip`` (the calibration images), within its derived bounds (probability ``bound``, ``logit``)."""
    model = ModelDir.open(model_dir)
    held = folder_fields(images, model.contract, start=skip)
    if not len(held):
        raise ValueError(f"{images}: no images left after the {skip} calibration images to gate INT8 on")
    ref = ort_outputs(model.file(model.variant("fp32").file)[0], held)
    got = ort_outputs(candidate, held)
    return compare(ref, got, "int8", model.contract.threshold, f"onnxruntime-cpu {QDQ_FILE} (held-out images)",
                   bound=bound, logit_bound=logit)


def speed(model_dir: Path, candidate: Path, images: Path) -> dict[str, Any]:
    """ms per field at batch 1 on ONNX Runtime CPU for INT8 and FP32, and the best gated tier here besides INT8
    ("fp32", or "bf16" where this CPU runs it and its gate timed it, counting its re-checks)."""
    from runtime.backends.openvino import native

    model = ModelDir.open(model_dir)
    fields = folder_fields(images, model.contract, TIMED + 1)
    ms = {prec: ort_ms_per_field(path, prec, fields, model.manifest.input_name)
          for prec, path in (("int8", candidate), ("fp32", model.file(model.variant("fp32").file)[0]))}
    best, best_ms = "fp32", ms["fp32"]
    bf16 = model.manifest.variants.get("bf16")
    if bf16 is not None and native("bf16")[0] and bf16.gate.get("ms_per_field") and bf16.gate.get("fields"):
        share = bf16.gate.get("in_band", 0) / bf16.gate["fields"]
        bf16_ms = effective_ms(bf16.gate["ms_per_field"], share)
        # its gate timed it against its own FP32: scaled to this FP32 timing
        bf16_ms *= ms["fp32"] / bf16.gate["ms_per_field"]["fp32"]
        if bf16_ms < best_ms:
            best, best_ms = "bf16", bf16_ms
    return {"ms_per_field": ms, "best_other": best, "best_other_ms": best_ms}


def verdict(result: Comparison, figures: dict[str, Any]) -> str:
    """Why INT8 is refused ('' where it is kept): its gate, and its effective time (its own, plus its held-out
    re-check share at FP32's) against the best other tier here (``figures["effective_ms"]`` set either way)."""
    ms = figures["ms_per_field"]
    eff = figures["effective_ms"] = effective_ms(ms, result.recheck_share, "int8")
    why = [result.reason()] if not result.ok else []
    if eff >= figures["best_other_ms"]:
        why.append(f"slower than {figures['best_other']} here counting its re-checks: {eff:.0f} ms per field "
                   f"({ms['int8']:.0f} ms + {result.recheck_share:.0%} of fields in its band 0.5 +- {result.band:g} "
                   f"at FP32's {ms['fp32']:.0f} ms) against {figures['best_other_ms']:.0f} ms")
    return "; ".join(why)


def accept(model_dir: Path, tmp: Path, result: Comparison, figures: dict[str, Any]) -> ModelDir:
    """Move a gated Q/DQ model into the model directory and list it in the manifest's variant table, with its
    bound and its speed."""
    tmp.replace(Path(model_dir) / QDQ_FILE)
    model = ModelDir.open(model_dir)
    bound = next(o.tolerance for o in result.outputs if o.output == "probability")
    extra = {"bound": bound, "ms_per_field": figures["ms_per_field"]}
    model.accept("int8", Variant(QDQ_FILE, result.summary() | extra), result.to_dict() | figures)
    return model


def reject(model_dir: Path, reason: str, result: Comparison | None = None,
           figures: dict[str, Any] | None = None) -> None:
    """Record why INT8 was refused (export_report.json, with its figures) and make sure no INT8 file or listing is
    left behind."""
    gate = None if result is None else result.to_dict() | (figures or {})
    ModelDir.open(model_dir).reject("int8", reason, gate, QDQ_FILE)
