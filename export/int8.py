"""INT8 by explicit quantisation: Q/DQ nodes in the ONNX (what TensorRT 11 builds INT8 from), calibrated on real
fields with ONNX Runtime's static quantiser, then gated by the fidelity check before it joins the model directory.

Convolutions and dense layers are quantised (symmetric, per-channel weights: TensorRT requires zero points of 0);
the LSTM stays FP32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.manifest import Manifest, sha256_file
from runtime.preprocess import folder_fields

QDQ_FILE = "model.int8.qdq.onnx"


def quantize(model_dir: Path, calib_images: Path, calib_count: int = 32, log: Any = print) -> Path:
    """Write model_dir/.model.int8.qdq.onnx.tmp (not yet part of the model) and return its path."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static

    manifest = Manifest.load(model_dir)
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
    quantize_static(str(Path(model_dir) / "model.onnx"), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["Conv", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return tmp


def accept(model_dir: Path, tmp: Path) -> Manifest:
    """Move a gated Q/DQ model into the model directory and list it in the manifest."""
    final = Path(model_dir) / QDQ_FILE
    tmp.replace(final)
    m = Manifest.load(model_dir)
    m.files[QDQ_FILE] = sha256_file(final)
    m.save(model_dir)
    return m
