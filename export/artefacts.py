"""Write a model directory: model.onnx (FP32, parity-checked), model.fp16.onnx, weights.pt, manifest.json, report."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from export import onnx_export as ox
from export.model import CONTRACT, BreakHisNet
from runtime.manifest import Manifest, Provenance, sha256_file
from runtime.preprocess import folder_fields

REPO = Path(__file__).resolve().parent.parent
SAMPLE_IMAGES = REPO.parent / "shared" / "data" / "breakhis-100x"


class ExportError(Exception):
    """The export produced something that failed its checks; nothing was written to the model directory."""


def default_parity_images() -> Path | None:
    env = os.environ.get("BREAKHIS_SAMPLES")
    for cand in ([Path(env)] if env else []) + [SAMPLE_IMAGES]:
        if cand.is_dir():
            return cand
    return None


def parity_fields(folder: Path | None, n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """The first field of each of the first ``n`` real images, and a description of where they came from; seeded
    synthetic fields only when no image folder is available."""
    if folder is not None:
        fields = folder_fields(folder, CONTRACT, n, first_only=True)
        if len(fields):
            return fields, f"{len(fields)} real images from {folder}"
    p, t = CONTRACT.patch, CONTRACT.seq_len
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, t, 3, p, p)).astype(np.float32) - np.asarray(CONTRACT.mean, np.float32)[:, None, None]
    return x, f"{n} synthetic random fields (no image folder found: pass --parity-images)"


def write_model_dir(model: BreakHisNet, out_dir: Path, name: str, provenance: Provenance,
                    parity_images: Path | None, n_parity: int = 6, log=print) -> Manifest:
    """Export, check and write every artefact. Files are written under temporary names and renamed only when all
    checks pass, so a failed export leaves an existing model directory untouched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = {k: out_dir / f".{k}.tmp" for k in ("model.onnx", "model.fp16.onnx", "weights.pt")}
    try:
        log(f"exporting ONNX (opset {ox.OPSET}, dynamic batch) ...")
        ox.export_onnx(model, tmp["model.onnx"], CONTRACT, provenance)
        fields, where = parity_fields(parity_images, n_parity)
        log(f"parity PyTorch vs ONNX Runtime CPU on {where}:")
        report: dict = {"parity_inputs": where, "fp32": [], "fp16": []}
        parity = ox.fp32_parity(model, tmp["model.onnx"], fields)
        for r in parity:
            log("  " + r.line())
            report["fp32"].append(r.__dict__ | {"ok": r.ok})
        if not all(r.ok for r in parity):
            raise ExportError(f"FP32 parity failed: max |logit difference| above {ox.FP32_TOLERANCE:g}")
        log("making the FP16 variant (conv/dense FP16, LSTM FP32, float32 I/O) ...")
        f16 = ox.make_fp16(tmp["model.onnx"], tmp["model.fp16.onnx"])
        problems = ox.fp16_structure(f16)
        if problems:
            raise ExportError("FP16 variant has the wrong precision layout:\n  " + "\n  ".join(problems))
        report["fp16_structure"] = "ok: Conv/Gemm weights float16, LSTM weights float32, graph I/O float32"
        report["fp16"] = fp16_numeric(tmp["model.onnx"], tmp["model.fp16.onnx"], fields, log)
        torch.save({"state_dict": model.state_dict(), "arch": model.arch}, tmp["weights.pt"])
        for final, t in tmp.items():
            t.replace(out_dir / final)
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)
    files = {f: sha256_file(out_dir / f) for f in tmp}
    manifest = Manifest(name=name, contract=CONTRACT, provenance=provenance, files=files,
                        input_name=ox.INPUT, output_names=ox.OUTPUTS)
    manifest.save(out_dir)
    (out_dir / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out_dir}: {', '.join(sorted(files))}, manifest.json, export_report.json")
    return manifest


def fp16_numeric(fp32: Path, fp16: Path, fields: np.ndarray, log=print) -> list[dict] | str:
    """Run the FP16 variant where ONNX Runtime CPU can; report (not gate: the GPU runtimes are where it is used)."""
    try:
        ref, got = ox.onnx_outputs(fp32, fields), ox.onnx_outputs(fp16, fields)
    except Exception as e:  # ORT raises its own Fail/NotImplemented types; any of them means "cannot run here"
        msg = f"not run: ONNX Runtime CPU cannot execute the FP16 model here ({str(e).splitlines()[0][:200]})"
        log("  " + msg)
        return msg
    rows = [ox.compare("probability", ref["probability"], got["probability"], ox.FP16_TOLERANCE),
            ox.compare("logit", ref["logit"], got["logit"], None)]
    for r in rows:
        log("  fp16 vs fp32 " + r.line())
    return [r.__dict__ | {"ok": r.ok} for r in rows]
