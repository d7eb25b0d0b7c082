"""python -m export triton: a model repository for a stock Triton Inference Server (the NGC container, JetPack's
Triton). One model per gated variant Triton runs: ``breakhis_fp32`` and, where their gates passed,
``breakhis_fp16`` and ``breakhis_int8`` (ONNX Runtime backend), and one per TensorRT engine built for this model
(``breakhis_<engine key>``: a plan runs only on the GPU and TensorRT it was built for). BF16 is OpenVINO's CPU tier
and has no file of its own: it is served by `python -m runtime.triton_server` instead.

Each config.pbtxt is built as Triton's own protobuf message (``tritonclient.grpc.model_config_pb2.ModelConfig``),
written as text and parsed back before anything is kept: max_batch_size, dynamic batching with preferred sizes, a
bounded queue that rejects, instance groups, the manifest, precision, re-check band and file sha256 as parameters
(runtime/model/served.py), and the TensorRT accelerator of ONNX Runtime's backend only for a precision whose gate
passed (FP16 for FP16; FP32 stays FP32: no accelerator that would lower it). Each model file is copied and its
sha256 checked against the manifest (or the engine's sidecar). The repository is written beside ``out`` and moved
into place only when complete."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime.model.manifest import ModelError, sha256_file
from runtime.model.model_dir import ModelDir
from runtime.model.served import DEFAULT_NAME, Served, served_name

ONNX_PRECISIONS = ("fp32", "fp16", "int8")  # the variants Triton's onnxruntime backend runs as their files say
KINDS = ("KIND_GPU", "KIND_CPU")


@dataclass(frozen=True)
class Serving:
    """How every model of the repository is served."""

    max_batch: int = 8
    max_queue: int = 32  # requests waiting; beyond, Triton rejects (HTTP 503 / gRPC UNAVAILABLE)
    delay_us: int = 2000  # how long Triton waits to fill a batch
    instances: int = 1
    kind: str = "KIND_GPU"


def config(name: str, served: Served, serving: Serving, platform: str, accelerate: str | None) -> str:
    """config.pbtxt of one model, from Triton's protobuf schema."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    m = served.manifest
    c = mc.ModelConfig(name=name, platform=platform, max_batch_size=serving.max_batch)
    c.input.add(name=m.input_name, data_type=mc.TYPE_FP32, dims=list(m.contract.field_shape))
    for out in m.output_names:
        c.output.add(name=out, data_type=mc.TYPE_FP32, dims=[1])
    b = c.dynamic_batching
    b.preferred_batch_size.extend(sorted({s for s in (1, 2, 4, 8, 16, 32) if s <= serving.max_batch}
                                         | {serving.max_batch}))
    b.max_queue_delay_microseconds = serving.delay_us
    b.default_queue_policy.max_queue_size = serving.max_queue
    b.default_queue_policy.timeout_action = mc.ModelQueuePolicy.REJECT
    c.instance_group.add(count=serving.instances, kind=getattr(mc.ModelInstanceGroup, serving.kind))
    for key, value in served.parameters().items():
        c.parameters[key].string_value = value
    if accelerate is not None:
        trt = c.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters["precision_mode"] = accelerate
    text = text_format.MessageToString(c)
    check_config(text, name)
    return text


def check_config(text: str, name: str) -> None:
    """Parse ``text`` with Triton's schema (ModelError where it does not parse or is not what was meant)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        parsed = text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as e:
        raise ModelError(f"{name}/config.pbtxt does not parse with Triton's model config schema: {e}") from None
    queue = parsed.dynamic_batching.default_queue_policy
    if parsed.name != name or parsed.max_batch_size < 1 or not queue.max_queue_size:
        raise ModelError(f"{name}/config.pbtxt: name, batching or queue bound lost in writing")


def write_repository(model: ModelDir, out: Path, serving: Serving = Serving(), base: str = DEFAULT_NAME) -> list[str]:
    """The repository at ``out`` (which must not exist, or be empty); the names of the models written."""
    if serving.kind not in KINDS or min(serving.max_batch, serving.max_queue, serving.instances) < 1:
        raise ValueError(f"kind one of {', '.join(KINDS)}; max batch, queue and instances at least 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out}: exists and is not empty (a repository is written whole; choose a new folder)")
    manifest = model.manifest
    fp32 = served_name(base, "fp32")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        written = []
        for precision in ONNX_PRECISIONS:
            if precision not in manifest.variants:
                continue
            file = model.variant(precision).file
            served = Served(manifest, precision, model.band(precision), file, manifest.files[file],
                            "" if precision == "fp32" else fp32)
            name = served_name(base, precision)
            accelerate = {"fp16": "FP16", "int8": "INT8"}.get(precision) if serving.kind == "KIND_GPU" else None
            _copy(model.path / file, tmp / name / "1" / "model.onnx", served.file_sha256)
            (tmp / name / "config.pbtxt").write_text(config(name, served, serving, "onnxruntime_onnx", accelerate))
            written.append(name)
        for sidecar in sorted(model.engines.glob("*.json")) if model.engines.is_dir() else []:
            from runtime.backends.engines import EngineInfo

            info = EngineInfo.from_json(sidecar.read_text())
            key, precision = info.target.key(), info.target.precision
            served = Served(manifest, precision, model.band(precision), sidecar.name[:-len(".json")] + ".engine",
                            info.engine_sha256, "" if precision == "fp32" else fp32)
            name = f"{base}_{key}"
            _copy(model.engines / served.model_file, tmp / name / "1" / "model.plan", served.file_sha256)
            plan_serving = Serving(min(serving.max_batch, info.profile.get("max", serving.max_batch)),
                                   serving.max_queue, serving.delay_us, serving.instances, "KIND_GPU")
            (tmp / name / "config.pbtxt").write_text(config(name, served, plan_serving, "tensorrt_plan", None))
            written.append(name)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        return written
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy(src: Path, dst: Path, sha256: str) -> None:
    """Copy a model file and check the copy's sha256 against the one recorded for it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    got = sha256_file(dst)
    if got != sha256:
        raise ModelError(f"{src}: sha256 {got[:12]} is not the {sha256[:12]} recorded for it (a changed or damaged "
                         "file): nothing written")
