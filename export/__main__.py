"""python -m export: turn weights into the artefacts under models/ (ONNX FP32 + FP16, manifest, report), and
build / check what is deployed from them (INT8 Q/DQ ONNX, TensorRT engines, fidelity against FP32)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EPILOG = """examples:
  python -m export reference                      # seeded UNTRAINED model -> models/reference
  python -m export onnx --checkpoint my.pt -o models/breakhis-v1 --source "trained by X, 2026-11"
  python -m export keras --feature-extractor fe.h5 --classifier lstm.h5 -o models/breakhis-keras
  python -m export int8 -m models/reference --calib-images DIR       # Q/DQ ONNX, kept only if it passes the gate
  python -m export trt -m models/reference --precision fp16          # on the Jetson / GPU box itself
  python -m export verify -m models/reference --images DIR --backend tensorrt --precision fp16
  python -m export verify -m models/reference --images DIR --onnx model.fp16.onnx   # FP16 ONNX on the CPU
"""


def _common(p: argparse.ArgumentParser, default_out: str | None) -> None:
    p.add_argument("-o", "--out", type=Path, default=Path(default_out) if default_out else None,
                   required=default_out is None, help="model directory to write" +
                   (f" (default: {default_out})" if default_out else ""))
    p.add_argument("--parity-images", type=Path, default=None,
                   help="folder of real images for the parity check (default: $BREAKHIS_SAMPLES, else "
                        "../shared/data/breakhis-100x beside the repo; seeded synthetic fields if neither exists)")
    p.add_argument("--parity-count", type=int, default=6, help="images used for the parity check (default: 6)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ref = sub.add_parser("reference", help="build the seeded, UNTRAINED reference model (demos, tests, benchmarks)")
    ref.add_argument("--seed", type=int, default=None, help="weight seed (default: the project's fixed seed)")
    _common(ref, "models/reference")
    onx = sub.add_parser("onnx", help="export a PyTorch state_dict of this architecture")
    onx.add_argument("--checkpoint", type=Path, required=True, help="state_dict saved with torch.save")
    onx.add_argument("--source", default="", help="where the weights come from (recorded in the manifest)")
    onx.add_argument("--untrained", action="store_true", help="mark the weights as untrained")
    _common(onx, None)
    ker = sub.add_parser("keras", help="import the original Keras .h5 pair (no TensorFlow needed)")
    ker.add_argument("--feature-extractor", type=Path, required=True, help="VGG16 + GAP + Dense + BN model (.h5)")
    ker.add_argument("--classifier", type=Path, required=True, help="Bidirectional LSTM + BN + Dense model (.h5)")
    _common(ker, None)
    i8 = sub.add_parser("int8", help="INT8 Q/DQ ONNX (for TensorRT 11), calibrated on real images and gated")
    i8.add_argument("-m", "--model", type=Path, default=Path("models/reference"), help="model directory")
    i8.add_argument("--calib-images", type=Path, required=True, help="folder of real images")
    i8.add_argument("--calib-count", type=int, default=32, help="the first N images calibrate (default 32); the "
                    "fidelity gate runs on the folder's remaining images")
    trt = sub.add_parser("trt", help="build a TensorRT engine for this GPU (TensorRT 10 or 11)")
    trt.add_argument("-m", "--model", type=Path, default=Path("models/reference"), help="model directory")
    trt.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp16")
    trt.add_argument("--min-batch", type=int, default=1)
    trt.add_argument("--opt-batch", type=int, default=8)
    trt.add_argument("--max-batch", type=int, default=32)
    trt.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace (default 1024: 8 GB Jetson)")
    trt.add_argument("--dla-core", type=int, default=None, help="build for this DLA core, GPU fallback (Jetson)")
    trt.add_argument("--timing-cache", type=Path, default=Path("models/timing.cache"),
                     help="timing cache loaded and saved (default: models/timing.cache)")
    trt.add_argument("--calib-images", type=Path, default=None, help="INT8 on TensorRT 10: calibration images")
    ver = sub.add_parser("verify", help="fidelity of a backend/engine vs the FP32 ONNX Runtime CPU reference")
    ver.add_argument("-m", "--model", type=Path, default=Path("models/reference"), help="model directory")
    ver.add_argument("--images", type=Path, required=True, help="folder of real images")
    ver.add_argument("--backend", default="tensorrt", choices=("tensorrt", "onnxruntime-cuda", "cpu"))
    ver.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp16")
    ver.add_argument("--onnx", default=None, help="instead: run this ONNX file of the model dir on ONNX Runtime CPU")
    ver.add_argument("--limit", type=int, default=None, help="use only the first N images")
    args = ap.parse_args(argv)
    if args.cmd == "trt":
        return _trt(args)
    if args.cmd == "verify":
        return _verify(args)
    if args.cmd == "int8":
        return _int8(args)

    # Heavy imports after argument parsing so that --help is instant.
    from export.artefacts import ExportError, default_parity_images, write_model_dir
    from export.keras_h5 import KerasImportError
    from export.weights import CheckpointError, load_checkpoint
    from runtime.manifest import Provenance, sha256_file

    if args.parity_count < 1:
        ap.error("--parity-count must be at least 1")
    t0 = time.perf_counter()
    try:
        if args.cmd == "reference":
            import torch

            from export.reference import DEFAULT_SEED, reference_model
            seed = DEFAULT_SEED if args.seed is None else args.seed
            print(f"building the untrained reference model (seed {seed}) ...", file=sys.stderr)
            model = reference_model(seed)
            digest = _state_sha256(model, torch)
            prov = Provenance(source=f"seeded reference model, seed {seed}", sha256=digest, trained=False,
                              checkpoint="weights.pt",
                              notes="UNTRAINED: random weights. Its verdicts are not a diagnosis.")
            name = "reference-untrained"
        elif args.cmd == "keras":
            from export.keras_h5 import import_pair

            model, arch = import_pair(args.feature_extractor, args.classifier)
            files = {p.name: sha256_file(p) for p in (args.feature_extractor, args.classifier)}
            prov = Provenance(source=f"Keras HDF5 pair {args.feature_extractor.name} + {args.classifier.name} "
                                     f"(Keras {', '.join(sorted(set(arch['keras_versions'])))})",
                              sha256=_combined_sha256(files), trained=True, checkpoint="weights.pt",
                              notes=f"imported architecture: {arch}", source_files=files)
            name = args.out.name
            print(f"imported: LSTM({arch['lstm_units']}), bidirectional={arch['bidirectional']}, "
                  f"BatchNorm eps {arch['bn_epsilon']}", file=sys.stderr)
        else:
            model = load_checkpoint(args.checkpoint)
            prov = Provenance(source=args.source or f"PyTorch state_dict {args.checkpoint.name}",
                              sha256=sha256_file(args.checkpoint), trained=not args.untrained,
                              checkpoint="weights.pt")
            name = args.out.name
        images = args.parity_images or default_parity_images()
        if args.parity_images is not None and not args.parity_images.is_dir():
            ap.error(f"--parity-images {args.parity_images}: not a directory")
        write_model_dir(model, args.out, name, prov, images, args.parity_count,
                        log=lambda m: print(m, file=sys.stderr))
    except (CheckpointError, ExportError, KerasImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def _trt(args: argparse.Namespace) -> int:
    from export.trt_build import TrtOptions, build_engine
    from runtime.backends.trt import TrtUnavailable
    from runtime.gpu import GpuUnavailable
    from runtime.manifest import ModelError

    opts = TrtOptions(precision=args.precision, min_batch=args.min_batch, opt_batch=args.opt_batch,
                      max_batch=args.max_batch, workspace_mb=args.workspace_mb, dla_core=args.dla_core,
                      timing_cache=str(args.timing_cache) if args.timing_cache else None,
                      calib_images=str(args.calib_images) if args.calib_images else None)
    try:
        build_engine(args.model, opts, log=lambda m: print(m, file=sys.stderr))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrtUnavailable, GpuUnavailable, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _int8(args: argparse.Namespace) -> int:
    import onnx

    from export.int8 import accept, quantize
    from export.trt_support import check_onnx
    from export.verify import verify
    from runtime.manifest import ModelError

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        tmp = quantize(args.model, args.calib_images, args.calib_count, log)
    except (ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        problems = check_onnx(onnx.load(str(tmp)))
        if problems:
            log("the Q/DQ model is outside TensorRT's ONNX support:\n  " + "\n  ".join(problems))
            return 1
        fid = verify(args.model, args.calib_images, onnx_file=tmp.name, start=args.calib_count)
        print("\n".join(fid.lines()).replace(tmp.name, "model.int8.qdq.onnx (held-out images)"))
        if not fid.ok:
            log("INT8 rejected by the fidelity gate: not added to the model directory")
            return 1
        accept(args.model, tmp)
        log(f"wrote {args.model / 'model.int8.qdq.onnx'} and listed it in manifest.json")
        return 0
    finally:
        tmp.unlink(missing_ok=True)


def _verify(args: argparse.Namespace) -> int:
    from export.verify import verify
    from runtime.backends import BackendUnavailable
    from runtime.manifest import ModelError

    try:
        fid = verify(args.model, args.images, args.backend, args.precision, args.onnx, args.limit)
    except (BackendUnavailable, ModelError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(fid.lines()))
    return 0 if fid.ok else 1


def _combined_sha256(files: dict[str, str]) -> str:
    """One identity for a set of source files: sha256 over their sorted names and hashes."""
    import hashlib

    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def _state_sha256(model, torch) -> str:
    """sha256 over the state_dict's names and float32 bytes: identifies reference weights without a file."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
