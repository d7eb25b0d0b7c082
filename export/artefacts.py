"""Write a model directory: model.onnx (FP32, range-safe, parity-checked), model.fp16.onnx (only if it passed its
gate), weights.pt, manifest.json (the variant table, with BF16 where this CPU could gate it), export_report.json."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from export import bf16
from export import onnx_export as ox
from export import range_safe as rs
from export.model import CONTRACT, BreakHisNet
from export.verify import ort_outputs
from runtime.backends.openvino import native
from runtime.errors import CheckFailed
from runtime.io.fields import image_fields
from runtime.model.fidelity import compare
from runtime.model.manifest import Manifest, Provenance, Variant, sha256_file
from runtime.model.model_dir import REPORT_NAME, ModelDir
from runtime.model.paths import sample_images
from runtime.model.precisions import OPTIONAL_VARIANTS, PRECISIONS
from runtime.model.stain_reference import STAIN_REFERENCE_NAME, StainReference


class ExportError(CheckFailed):
    """The export produced something that failed its checks; nothing was written to the model directory."""


def default_parity_images() -> Path | None:
    return sample_images() if sample_images().is_dir() else None


FP16_FILE = PRECISIONS["fp16"].file


def nvidia_gpu_visible() -> bool:
    """An NVIDIA GPU on this machine (a driver's device node, or Jetson's), the only place FP16 variants run."""
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0/ctrl"))


def resolve_variants(choice: str) -> tuple[str, ...]:
    """--variants: "auto" makes what this machine can run (FP16 where an NVIDIA GPU is visible; BF16 is made
    where the CPU has native BF16, by its gate), "all" every one, "none" FP32 alone, or a list: "fp16,bf16"."""
    if choice == "auto":
        return tuple(v for v in OPTIONAL_VARIANTS if _why_not(v) is None)
    if choice == "all":
        return OPTIONAL_VARIANTS
    if choice == "none":
        return ()
    chosen = tuple(v for v in (x.strip() for x in choice.split(",")) if v and v != "fp32")
    unknown = [v for v in chosen if v not in OPTIONAL_VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {', '.join(unknown)} (choose from auto, all, or a list of "
                         f"{', '.join(OPTIONAL_VARIANTS)})")
    return tuple(v for v in OPTIONAL_VARIANTS if v in chosen)


def _why_not(variant: str) -> str | None:
    """Why this machine would not run ``variant`` (so "auto" does not make it), or None."""
    row = PRECISIONS[variant]
    if row.auto == "gpu" and not nvidia_gpu_visible():
        return (f"no NVIDIA GPU was visible at export, and {variant.upper()} runs only on GPUs (TensorRT, ONNX Runtime "
                f"CUDA); export again on the GPU machine, or with --variants {variant}")
    ok, why = native(variant)
    return None if ok else f"{variant}: {why}; run `python -m export {variant}` on a CPU with native " \
                           f"{row.cpu_capability}"


def gate_fields(folder: Path | None, n_images: int | None,
                seed: int = 0) -> tuple[np.ndarray, str, list[tuple[Path, int]]]:
    """Every field of the first ``n_images`` real images (all when None), where they came from in words, and each
    image with its number of fields (in order; none for synthetic fields); seeded synthetic fields only when no
    image folder is available."""
    if folder is not None:
        fields, sources = image_fields(folder, CONTRACT, n_images)
        if len(fields):
            return fields, f"{len(fields)} fields of real images from {folder}", sources
    p, t = CONTRACT.patch, CONTRACT.seq_len
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (6, t, 3, p, p)).astype(np.float32) - np.asarray(CONTRACT.mean, np.float32)[:, None, None]
    return x, "6 synthetic random fields (no image folder found: pass --parity-images)", []


def fp32_reference(sources: list[tuple[Path, int]], n_fields: int, ref: dict[str, np.ndarray]) -> dict:
    """The gate's FP32 answers (the unscaled FP32 model on ONNX Runtime CPU, what every variant was judged against)
    for each whole image among the first ``n_fields`` gate fields: its file name, sha256 and fields' probabilities
    and logits. Kept in the export report, so that the runtime's answers on those images can be compared with
    the gate's later without running FP32 again (tests/test_recheck.py)."""
    images, k = [], 0
    for path, n in sources:
        if k + n > n_fields:
            break
        images.append({"file": path.name, "sha256": sha256_file(path),
                       "probability": [float(v) for v in ref["probability"][k:k + n]],
                       "logit": [float(v) for v in ref["logit"][k:k + n]]})
        k += n
    return {"what": "FP32 (ONNX Runtime CPU, the model before range-safe rescaling) on the gate's images",
            "images": images}


def write_model_dir(model: BreakHisNet, out_dir: Path, name: str, provenance: Provenance, images: Path | None,
                    n_parity: int = 6, n_gate: int | None = None, range_safe: bool = True, log=print,
                    variants_made: tuple[str, ...] = OPTIONAL_VARIANTS, allow_synthetic: bool = False,
                    stain: StainReference | None = None) -> Manifest:
    """Export, gate and write every artefact; a variant that fails its gate is reported and not written, and one
    not in ``variants_made`` is not made (the report says why). Without real images, variants are gated on
    synthetic fields only with ``allow_synthetic`` (a gate on random fields says nothing of real ones): else none
    is made, and the report says how to make them. ``stain``: the stain reference recorded beside the files
    (export/stain_reference.py), hashed into the manifest like them.

    model.onnx is the range-safe (rescaled) FP32 model, identical in output to ``model``; model.fp16.onnx runs its
    convolution chain in float16. Files are written under temporary names and renamed only when the FP32 model
    passed, so a failed export leaves an existing model directory untouched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = {k: out_dir / f".{k}.tmp" for k in ("model.onnx", FP16_FILE, "weights.pt")}
    unscaled = out_dir / ".model.unscaled.onnx.tmp"
    threshold = CONTRACT.threshold
    try:
        fields, where, sources = gate_fields(images, n_gate)
        no_real = bool("synthetic" in where and not allow_synthetic and variants_made)
        if no_real:
            log(f"no variant besides FP32 is made: no real images to gate them on ({images or 'no folder'}); "
                "--parity-images FOLDER gates them on real images, --allow-synthetic on random fields")
            variants_made = ()
        if not variants_made:  # nothing to gate against FP32; the ranges (only FP16 needs them) from parity fields
            fields, where = fields[:n_parity], f"{where}: the first {min(n_parity, len(fields))} (FP32 only)"
        log(f"exporting ONNX (opset {ox.OPSET}, dynamic batch) ...")
        ox.export_onnx(model, unscaled, CONTRACT, provenance)
        conv_names = ox.conv_outputs(onnx.load(str(unscaled)))
        log(f"FP32 reference and convolution ranges on {where} (ONNX Runtime CPU) ...")
        ref = ort_outputs(unscaled, fields, extra_max=conv_names)
        maxima = [float(ref[n]) for n in conv_names]
        shifts = rs.plan_shifts(maxima) if range_safe else [0] * len(maxima)
        deployed = rs.rescale(model, shifts)
        ox.export_onnx(deployed, tmp["model.onnx"], CONTRACT, provenance)
        report: dict = {"gate_inputs": where, "opset": ox.OPSET, "range_safe": range_safe, "gates": {},
                        "rejected": {}, "not_made": {}}
        if sources:
            report["fp32_reference"] = fp32_reference(sources, len(fields), ref)

        p = fields[:n_parity]
        want = ox.torch_outputs(model, p)
        log(f"FP32 parity, PyTorch vs ONNX Runtime CPU on {len(p)} fields, batch 1 and 4:")
        for batch in (1, 4):
            got = ort_outputs(tmp["model.onnx"], p, batch=batch)
            fp32 = compare(want, got, "fp32", threshold, f"onnxruntime-cpu model.onnx batch {batch}")
            for line in fp32.lines():
                log("  " + line)
            report["gates"][f"fp32_batch{batch}"] = fp32.to_dict()
            if not fp32.ok:
                raise ExportError(f"FP32 parity failed: {fp32.reason()}")
            if batch == 1:
                variants = {"fp32": Variant("model.onnx", fp32.summary())}
        exact = {k: float(np.abs(got[k] - ref[k][:len(p)]).max()) for k in ox.OUTPUTS}
        report["rescaled_vs_original"] = exact
        log(f"  range-safe rescaling vs the original FP32 model: max|d| {exact}")

        got16 = None
        synthetic = "no real images to gate it on: export again with --parity-images FOLDER" if no_real else None
        if "fp16" not in variants_made:
            report["not_made"]["fp16"] = synthetic or _why_not("fp16") or "not asked for (--variants)"
            log(f"FP16 variant not made: {report['not_made']['fp16']}")
        else:
            log("making the FP16 variant (convolution chain float16; pooling, Dense, BatchNorm, LSTM float32) ...")
            problems = ox.fp16_structure(ox.make_fp16(tmp["model.onnx"], tmp[FP16_FILE]))
            if problems:
                raise ExportError("FP16 variant has the wrong precision layout:\n  " + "\n  ".join(problems))
            try:
                got16 = ort_outputs(tmp[FP16_FILE], fields, extra_max=conv_names)
            except Exception as e:  # ORT raises its own types; a variant that cannot be checked is not shipped
                report["rejected"]["fp16"] = f"could not be checked: ONNX Runtime CPU cannot run it ({str(e)[:200]})"
        after = [float(got16[n]) for n in conv_names] if got16 is not None else \
            [m * 2.0 ** s for m, s in zip(maxima, shifts)]
        report["ranges"] = [rs.LayerRange(layer, m, s, a).to_dict()
                            for (layer, _), m, s, a in zip(rs.convs(model), maxima, shifts, after)]
        log(f"  {'layer':24s} {'max before':>11s} {'shift':>6s} {'max after':>10s} {'headroom':>9s}")
        for r in report["ranges"]:
            log(f"  {r['layer']:24s} {r['max_before']:11.4g} {r['shift']:6d} {r['max_after']:10.4g} "
                f"{r['headroom']:8.3g}x")
        if got16 is not None:
            fp16 = compare(_outputs(ref), _outputs(got16), "fp16", threshold, "onnxruntime-cpu model.fp16.onnx")
            for line in fp16.lines():
                log("  " + line)
            report["gates"]["fp16"] = fp16.to_dict()
            # ONNX Runtime CPU keeps float32 between the ops of the chain, so an overflow can hide from the
            # outputs here; it cannot hide from the float16 convolution outputs themselves.
            over = [r["layer"] for r in report["ranges"] if not r["max_after"] < rs.FP16_MAX]
            if over:
                report["rejected"]["fp16"] = f"convolution outputs beyond float16's range ({rs.FP16_MAX:g}) " \
                                             f"in {', '.join(over)}"
            elif not fp16.ok:
                report["rejected"]["fp16"] = fp16.reason()
            else:
                variants["fp16"] = Variant(FP16_FILE, fp16.summary())
        if "fp16" not in variants:
            if "fp16" in report["rejected"]:
                log(f"FP16 variant REJECTED ({report['rejected']['fp16']}): not written, not listed")
            tmp.pop(FP16_FILE).unlink(missing_ok=True)
            (out_dir / FP16_FILE).unlink(missing_ok=True)  # never leave an old one a backend could load
        torch.save({"state_dict": model.state_dict(), "arch": model.arch}, tmp["weights.pt"])
        for final, t in tmp.items():
            t.replace(out_dir / final)
    finally:
        for t in [*tmp.values(), unscaled]:
            t.unlink(missing_ok=True)
    if "bf16" in variants_made:
        bf16.gate_into(report, variants, out_dir / "model.onnx", fields, _outputs(ref), threshold, log)
    else:
        report["not_made"]["bf16"] = synthetic or _why_not("bf16") or "not asked for (--variants)"
        log(f"BF16 variant not made: {report['not_made']['bf16']}")
    files = {f: sha256_file(out_dir / f) for f in tmp}
    manifest = Manifest(name=name, contract=CONTRACT, provenance=provenance, files=files,
                        input_name=ox.INPUT, output_names=ox.OUTPUTS, variants=variants)
    written = ModelDir.create(out_dir, manifest, report)
    if stain is not None:
        written.add_stain_reference(stain)
    else:
        (out_dir / STAIN_REFERENCE_NAME).unlink(missing_ok=True)  # never an older export's reference beside this one
    log(f"wrote {out_dir}: {', '.join(sorted(written.manifest.files))}, manifest.json ({', '.join(variants)}), "
        f"{REPORT_NAME}")
    return manifest


def _outputs(res: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: res[k] for k in ox.OUTPUTS}

