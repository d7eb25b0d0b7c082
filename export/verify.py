"""Fidelity of a deployed variant against the FP32 reference on real images, through ``runtime.model.fidelity.compare``
(one comparison, one tolerance table): a backend/precision as the runtime runs it (``verify``), or an ONNX file
that is not yet part of a model (``ort_outputs``, used by the export's gates). Torch-free: runs on the target."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.io.inputs import image_files
from runtime.model.fidelity import Comparison, compare
from runtime.pipeline.classifier import Classifier, Result

OUTPUTS = ("logit", "probability")  # the exported model's outputs, as the manifest lists them


def ort_outputs(path: Path, fields: np.ndarray, batch: int = 4, extra_max: tuple[str, ...] | list[str] = (),
                input_name: str = "fields") -> dict[str, np.ndarray]:
    """Run an ONNX file on ONNX Runtime CPU in batches: each output concatenated over the batches, and for each
    tensor named in ``extra_max`` its max |value| over all fields (exposed as an extra graph output)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    m = onnx.load(str(path))
    for name in extra_max:
        m.graph.output.append(helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [*OUTPUTS, *extra_max]
    res: dict[str, list] = {n: [] for n in names}
    for i in range(0, len(fields), batch):
        for name, v in zip(names, sess.run(names, {input_name: fields[i:i + batch]})):
            res[name].append(v.astype(np.float32) if name in OUTPUTS else np.abs(v.astype(np.float32)).max())
    return {n: np.concatenate(res[n]).reshape(-1) if n in OUTPUTS else np.asarray(max(res[n]), np.float32)
            for n in names}


def ort_ms_per_field(path: Path, precision: str, fields: np.ndarray, input_name: str = "fields") -> float:
    """Median ms per field of an ONNX file as the runtime runs it on the CPU (ONNX Runtime, batch 1), the first
    field a warm-up: how the export's gates time a tier."""
    import time

    from runtime.backends.ort import make_session

    session, ms = make_session(path, precision, cuda=False), []
    for i in range(len(fields)):
        t0 = time.perf_counter()
        session.run(None, {input_name: fields[i:i + 1]})
        ms.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ms[1:] or ms))


def _field_probs(results: list[Result], like: list[Result]) -> np.ndarray:
    """Field probabilities in order; an image the candidate failed on (e.g. a non-finite output) counts as NaN."""
    out: list[float] = []
    for got, ref in zip(results, like):
        out += [f.probability for f in got.fields] if got.error is None else [np.nan] * len(ref.fields)
    return np.asarray(out, np.float64)


def verify(model_dir: Path, images_dir: Path, backend: str = "tensorrt", precision: str = "fp16",
           limit: int | None = None, layout: str = "auto") -> Comparison:
    """The backend/precision (and ONNX Runtime CUDA's layout) as ``python -m runtime.classify`` would run it vs
    ONNX Runtime CPU FP32."""
    images = image_files(images_dir)[:limit]
    with Classifier(model_dir, backend="cpu", preprocess="cpu", precision="fp32") as ref:
        want = ref.classify(images)
        threshold = ref.contract.threshold
    keep = [i for i, r in enumerate(want) if r.error is None]  # unreadable images are nobody's fidelity
    if not keep:
        raise RuntimeError(f"{images_dir}: no usable images")
    images, want = [images[i] for i in keep], [want[i] for i in keep]
    with Classifier(model_dir, backend=backend, precision=precision, layout=layout, recheck="off") as cand:
        got = cand.classify(images)
        name, prec = cand.backend.name, cand.backend.precision
    return compare({"probability": _field_probs(want, want)}, {"probability": _field_probs(got, want)}, prec,
                   threshold, name)
