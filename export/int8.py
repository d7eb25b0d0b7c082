"""INT8 by explicit quantisation: Q/DQ nodes in the ONNX (what TensorRT 11 builds INT8 from), calibrated on real
fields with ONNX Runtime's static quantiser, then gated by the fidelity check before it joins the model directory.

Convolutions and dense layers are quantised (symmetric, per-channel weights: TensorRT requires zero points of 0);
the LSTM stays FP32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from export.verify import ort_outputs
from runtime.model.fidelity import Comparison, compare
from runtime.model.manifest import Variant
from runtime.model.model_dir import ModelDir
from runtime.model.precisions import PRECISIONS
from runtime.pipeline.preprocess import folder_fields

QDQ_FILE = PRECISIONS["int8"].file


def quantize(model_dir: Path, calib_images: Path, calib_count: int = 32, log: Any = print) -> Path:
    """Write model_dir/.model.int8.qdq.onnx.tmp (not yet part of the model) and return its path."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = ModelDir.open(model_dir)
    manifest = model.manifest
    fields = folder_fields(calib_images, manifest.contract, calib_count)
    if not len(fields):
        raise ValueError(f"{calib_images}: no usable images for INT8 calibration")
    log(f"calibrating INT8 on {len(fields)} real fields from {calib_images} ...")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(fields[i:i + 1] for i in range(len(fields)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.items, None)
            return None if x is None else {manifest.input_name: x}

    tmp = Path(model_dir) / f".{QDQ_FILE}.tmp"
    fp32, _ = model.file(model.variant("fp32").file)
    quantize_static(str(fp32), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["Conv", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return tmp


def gate(model_dir: Path, candidate: Path, images: Path, skip: int) -> Comparison:
    """The INT8 candidate vs the FP32 model on ONNX Runtime CPU, on every field of the folder's images after the
    first ``skip`` (the calibration images), through the one comparison and tolerance table."""
    model = ModelDir.open(model_dir)
    held = folder_fields(images, model.contract, start=skip)
    if not len(held):
        raise ValueError(f"{images}: no images left after the {skip} calibration images to gate INT8 on")
    ref = ort_outputs(model.file(model.variant("fp32").file)[0], held)
    got = ort_outputs(candidate, held)
    return compare(ref, got, "int8", model.contract.threshold, f"onnxruntime-cpu {QDQ_FILE} (held-out images)")


def accept(model_dir: Path, tmp: Path, result: Comparison) -> ModelDir:
    """Move a gated Q/DQ model into the model directory and list it in the manifest's variant table."""
    tmp.replace(Path(model_dir) / QDQ_FILE)
    model = ModelDir.open(model_dir)
    model.accept("int8", Variant(QDQ_FILE, result.summary()), result.to_dict())
    return model


def reject(model_dir: Path, result: Comparison | str) -> None:
    """Record why INT8 was refused (export_report.json) and make sure no INT8 file or listing is left behind."""
    gate = None if isinstance(result, str) else result.to_dict()
    ModelDir.open(model_dir).reject("int8", result if isinstance(result, str) else result.reason(), gate, QDQ_FILE)
