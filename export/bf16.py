"""The BF16 CPU tier's gate: ``model.onnx`` as OpenVINO runs it in BF16 against the FP32 reference, on every gate
field, through the one comparison and tolerance table. Measured only on a CPU with native BF16: elsewhere the variant
is not made and the report says why (a gate run in emulation, or silently in FP32, would certify nothing)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from export.verify import OUTPUTS, ort_ms_per_field, ort_outputs
from runtime.backends.openvino import compile_onnx, infer
from runtime.errors import BreakhisError, Unavailable
from runtime.io.fields import folder_fields
from runtime.model.fidelity import Comparison, compare, effective_ms
from runtime.model.manifest import Variant
from runtime.model.model_dir import ModelDir

RUNTIME = "openvino-cpu"
FP32_TIMED = 4  # fields the FP32 tier is timed on for the comparison (its time varies little between fields)


def gate(model_path: Path, fields: np.ndarray, reference: dict[str, np.ndarray], threshold: float,
         input_name: str = "fields") -> tuple[Comparison, dict[str, float]]:
    """BF16 outputs of every field (batch 1, as the runtime runs it) vs ``reference``, and the median ms per field
    of BF16 and of FP32 (ONNX Runtime CPU, batch 1, FP32_TIMED fields) on this machine, what ``--precision auto``
    weighs the re-check cost with; OpenVinoUnavailable where this machine cannot run BF16 natively."""
    request = compile_onnx(model_path, "bf16")[1].create_infer_request()
    runs, ms = [], []
    for i in range(len(fields)):
        t0 = time.perf_counter()
        runs.append(infer(request, input_name, list(OUTPUTS), fields[i:i + 1]))
        ms.append((time.perf_counter() - t0) * 1e3)
    got = {n: np.concatenate([r[n] for r in runs]) for n in OUTPUTS}
    fp32_ms = ort_ms_per_field(model_path, "fp32", fields[:FP32_TIMED + 1], input_name)
    return (compare(reference, got, "bf16", threshold, f"{RUNTIME} bf16 {model_path.name}"),
            {"bf16": float(np.median(ms[1:] or ms)), "fp32": fp32_ms})


def gate_into(report: dict, variants: dict[str, Variant], model_path: Path, fields: np.ndarray,
              reference: dict[str, np.ndarray], threshold: float, log: Any = print) -> None:
    """Run the gate and record its outcome: a listed variant, a rejection with the reason, or why it was not made."""
    for table in ("rejected", "not_made"):
        report.setdefault(table, {}).pop("bf16", None)
    variants.pop("bf16", None)
    log(f"BF16 tier: OpenVINO CPU, bf16 inference precision, on {len(fields)} fields ...")
    try:
        result, ms = gate(model_path, fields, reference, threshold)
    except Unavailable as e:
        report["not_made"]["bf16"] = f"{e}; run `python -m export bf16` on a CPU with native BF16"
        log(f"  BF16 variant not made: {e}")
        return
    except (BreakhisError, RuntimeError) as e:  # a variant that cannot be checked is not shipped
        report["rejected"]["bf16"] = f"could not be checked: OpenVINO cannot run it ({str(e).splitlines()[0][:200]})"
        log(f"  BF16 variant REJECTED ({report['rejected']['bf16']}): not listed")
        return
    for line in result.lines():
        log("  " + line)
    log(f"  speed        {ms['bf16']:.0f} ms per field (FP32 {ms['fp32']:.0f} ms), with the re-check share "
        f"{effective_ms(ms, result.recheck_share):.0f} ms")
    report.setdefault("gates", {})["bf16"] = result.to_dict() | {"ms_per_field": ms}
    if result.ok:
        variants["bf16"] = Variant(model_path.name, result.summary() | {"ms_per_field": ms}, RUNTIME)
    else:
        report["rejected"]["bf16"] = result.reason()
        log(f"  BF16 variant REJECTED ({result.reason()}): not listed")


def add_to_model(model_dir: Path, images: Path, n_images: int | None = None, log: Any = print) -> ModelDir:
    """Gate BF16 for an exported model directory (e.g. exported on a machine without BF16) and update its
    manifest and report; torch-free."""
    model = ModelDir.open(model_dir)
    manifest = model.manifest
    fields = folder_fields(images, manifest.contract, n_images)
    if not len(fields):
        raise ValueError(f"{images}: no usable images to gate BF16 on")
    fp32, _ = model.file(model.variant("fp32").file)  # what is gated
    log(f"FP32 reference on {len(fields)} fields (ONNX Runtime CPU) ...")
    reference = {k: v for k, v in ort_outputs(fp32, fields, input_name=manifest.input_name).items() if k in OUTPUTS}
    report = model.report()
    gate_into(report, manifest.variants, fp32, fields, reference, manifest.contract.threshold, log)
    model.save()
    model.write_report(report)
    return model
