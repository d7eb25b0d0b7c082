"""python -m export: turn weights into the artefacts under models/ (ONNX FP32 + FP16, manifest, report), and
build / check what is deployed from them (INT8 Q/DQ ONNX, TensorRT engines, fidelity against FP32)."""
from __future__ import annotations

import argparse
import functools
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

from runtime.backends.choose import BACKENDS
from runtime.model.paths import TRAINED_NAME
from runtime.model.precisions import ENGINE_PRECISIONS, PRECISIONS

# The trained model's provenance text, as setup.sh exports it (`python -m export trained`).
TRAINED_SOURCE = "VGG16-BiLSTM trained from scratch on public BreakHis 100X images (../shared/models/README.md)"

EPILOG = """examples:
  python -m export reference                      # seeded UNTRAINED model -> models/reference
  python -m export onnx --checkpoint my.pt -o models/breakhis-v1 --source "trained by X, 2026-11"
  python -m export keras --feature-extractor fe.h5 --classifier lstm.h5 -o models/breakhis-keras
  python -m export int8 -m models/reference --calib-images DIR       # Q/DQ ONNX, kept only if it passes the gate
  python -m export bf16 -m models/breakhis-v1      # the CPU's BF16 tier (OpenVINO), on a CPU with native BF16
  python -m export trt -m models/reference --precision fp16          # on the Jetson / GPU box itself
  python -m export triton -m models/breakhis-v1 -o triton-repo       # for a stock tritonserver
  python -m export verify -m models/reference --images DIR --backend tensorrt --precision fp16
  python -m export verify -m models/reference --images DIR --backend cpu --precision fp16   # FP16 ONNX on the CPU
"""


def _common(p: argparse.ArgumentParser, default_out: str | None) -> None:
    p.add_argument("-o", "--out", type=Path, default=Path(default_out) if default_out else None,
                   required=default_out is None, help="model directory to write" +
                   (f" (default: {default_out})" if default_out else ""))
    p.add_argument("--parity-images", type=Path, default=None,
                   help="folder of real images for the ranges, the parity check and the variants' gates "
                        "(default: $BREAKHIS_SHARED/data/breakhis-100x, $BREAKHIS_SHARED defaulting to ../shared; "
                        "seeded synthetic fields if neither exists)")
    p.add_argument("--allow-synthetic", action="store_true",
                   help="without real images, gate the variants (FP16, BF16) on seeded random fields (default: make "
                        "none: a gate on random fields says nothing of real ones)")
    p.add_argument("--parity-count", type=int, default=6,
                   help="fields compared PyTorch vs ONNX Runtime at batch 1 and 4 (default: 6)")
    p.add_argument("--gate-count", type=int, default=None,
                   help="images that calibrate the FP16 ranges and gate the FP16 variant (default: all)")
    p.add_argument("--no-range-safe", action="store_true",
                   help="skip the power-of-two rescaling (to see the FP16 gate refuse an overflowing variant)")
    p.add_argument("--variants", default="auto", metavar="auto|all|LIST",
                   help="variants besides FP32 to make and gate (default: auto = what this machine runs: fp16 "
                        "where an NVIDIA GPU is visible, bf16 where the CPU has native BF16; all; none; or a list: "
                        "fp16,bf16)")
    p.add_argument("--stain-reference", type=Path, default=None, metavar="DIR",
                   help="folder of the model's own training images whose stains the model directory records for the "
                        "runtime's stain-drift check (default: the --parity-images folder's images, all of them, less "
                        "those of the patients the manifest lists as held out; docs/quality.md)")
    p.add_argument("--no-cache", action="store_true",
                   help="make the export even if an identical one (same weights, images, options, code, libraries "
                        "and CPU) passed its gates before (default: reuse it; export/cache.py)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ref = sub.add_parser("reference", help="build the seeded, UNTRAINED reference model (demos, tests, benchmarks)")
    ref.add_argument("--seed", type=int, default=None, help="weight seed (default: the project's fixed seed)")
    ref.add_argument("--width", type=float, default=1.0,
                     help="convolution widths as a fraction of VGG16's (default 1: VGG16); e.g. 0.125 makes a narrow "
                          "model of the same structure, about 60x less arithmetic, for fast structural tests")
    _common(ref, "models/reference")
    tr = sub.add_parser("trained", help="export the trained model from the shared folder, as setup.sh does "
                        f"(default -o models/{TRAINED_NAME})")
    _common(tr, f"models/{TRAINED_NAME}")
    onx = sub.add_parser("onnx", help="export a PyTorch state_dict of this architecture")
    onx.add_argument("--checkpoint", type=Path, required=True, help="state_dict saved with torch.save")
    onx.add_argument("--source", default="", help="where the weights come from (recorded in the manifest)")
    onx.add_argument("--untrained", action="store_true", help="mark the weights as untrained")
    onx.add_argument("--train-report", type=Path, default=None,
                     help="the trainer's JSON report: its held-out metrics and patients go into the manifest")
    _common(onx, None)
    ker = sub.add_parser("keras", help="import the original Keras .h5 pair (no TensorFlow needed)")
    ker.add_argument("--feature-extractor", type=Path, required=True, help="VGG16 + GAP + Dense + BN model (.h5)")
    ker.add_argument("--classifier", type=Path, required=True, help="Bidirectional LSTM + BN + Dense model (.h5)")
    _common(ker, None)
    i8 = sub.add_parser("int8", help="INT8 Q/DQ ONNX (NNCF; what TensorRT builds INT8 from), calibrated on real "
                        "images, gated, and kept only where it is the fastest tier counting its re-checks")
    i8.add_argument("-m", "--model", type=Path, default=None,
                    help="model directory (default: the trained model where setup.sh exported it, else the reference)")
    i8.add_argument("--calib-images", type=Path, required=True, help="folder of real images")
    i8.add_argument("--calib-count", type=int, default=24, help="the first N images calibrate (default 24) with NNCF's "
                    "accuracy control (every label of theirs kept) and set INT8's bound; the fidelity gate runs on the "
                    "folder's remaining images; INT8 is kept only where, counting its re-checks, it beats the best "
                    "tier here")
    b16 = sub.add_parser("bf16", help="gate the BF16 CPU tier (OpenVINO) for an exported model on this CPU and list "
                         "it if it passes (the export does this itself where the CPU has native BF16)")
    b16.add_argument("-m", "--model", type=Path, default=None,
                     help="model directory (default: the trained model where setup.sh exported it, else the reference)")
    b16.add_argument("--images", type=Path, default=None,
                     help="folder of real images to gate on (default: $BREAKHIS_SHARED/data/breakhis-100x)")
    b16.add_argument("--count", type=int, default=None, help="gate on the first N images (default: all)")
    trt = sub.add_parser("trt", help="build a TensorRT engine for this GPU (TensorRT 10 or 11)")
    trt.add_argument("-m", "--model", type=Path, default=None,
                    help="model directory (default: the trained model where setup.sh exported it, else the reference)")
    trt.add_argument("--precision", choices=ENGINE_PRECISIONS, default="fp16",
                     help="engine precision: a variant of the model that passed its gate (default: fp16)")
    trt.add_argument("--min-batch", type=int, default=1, help="smallest batch of fields the engine takes (default 1)")
    trt.add_argument("--opt-batch", type=int, default=8,
                     help="batch the engine is tuned for, and INT8 calibration's batch (default 8)")
    trt.add_argument("--max-batch", type=int, default=32, help="largest batch of fields (default 32)")
    trt.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace (default 1024: 8 GB Jetson)")
    trt.add_argument("--dla-core", type=int, default=None, help="build for this DLA core, GPU fallback (Jetson)")
    trt.add_argument("--timing-cache", type=Path, default=None,
                     help="timing cache loaded and saved (default: the model's engines/timing.cache)")
    trt.add_argument("--calib-images", type=Path, default=None, help="INT8 on TensorRT 10: calibration images")
    trt.add_argument("--calib-count", type=int, default=64,
                     help="INT8 on TensorRT 10: the first N images calibrate (default 64)")
    tri = sub.add_parser("triton", help="a model repository for a stock Triton Inference Server (config.pbtxt + "
                         "model file per gated variant, checked with Triton's own config schema)")
    tri.add_argument("-m", "--model", type=Path, default=None,
                     help="model directory (default: the trained model where setup.sh exported it, else the reference)")
    tri.add_argument("-o", "--out", type=Path, required=True, help="repository folder to write (new, or empty)")
    tri.add_argument("--max-batch", type=int, default=8, help="largest batch Triton forms, in fields (default 8)")
    tri.add_argument("--max-queue", type=int, default=32,
                     help="requests allowed to wait; beyond, Triton rejects with 503/UNAVAILABLE (default 32)")
    tri.add_argument("--max-queue-delay-us", type=int, default=2000,
                     help="how long Triton waits to fill a batch, microseconds (default 2000)")
    tri.add_argument("--instances", type=int, default=1, help="model instances per device (default 1)")
    tri.add_argument("--kind", choices=["gpu", "cpu"], default="gpu",
                     help="where the ONNX models' instances run (default gpu; TensorRT plans always on the GPU)")
    ver = sub.add_parser("verify", help="fidelity of a backend/engine vs the FP32 ONNX Runtime CPU reference")
    ver.add_argument("-m", "--model", type=Path, default=None,
                    help="model directory (default: the trained model where setup.sh exported it, else the reference)")
    ver.add_argument("--images", type=Path, required=True, help="folder of real images")
    ver.add_argument("--backend", default="tensorrt", choices=[b for b in BACKENDS if b != "auto"],
                     help="the backend to check (default: tensorrt)")
    ver.add_argument("--precision", choices=list(PRECISIONS), default="fp16",
                     help="the model variant to check (default: fp16); tolerances from runtime/model/precisions.py")
    ver.add_argument("--layout", choices=["auto", "nchw", "nhwc"], default="auto",
                     help="onnxruntime-cuda's memory layout (default auto: NHWC only where it passed before); "
                          "an explicit one's result is recorded in the model directory, and the runtime prefers "
                          "NHWC for that precision only where it passed")
    ver.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ver.add_argument("--json", type=Path, default=None, help="also write the comparison here as JSON")
    args = ap.parse_args(argv)
    if getattr(args, "model", "") is None:
        from runtime.model.paths import default_model_dir

        args.model = default_model_dir()
    if args.cmd == "trt":
        return _trt(args)
    if args.cmd == "verify":
        return _verify(args)
    if args.cmd == "int8":
        return _int8(args)
    if args.cmd == "bf16":
        return _bf16(args)
    if args.cmd == "triton":
        return _triton(args)

    # Heavy imports after argument parsing so that --help is instant.
    from export import cache
    from export.artefacts import default_parity_images, resolve_variants, write_model_dir
    from export.stain_reference import stain_reference
    from export.weights import load_checkpoint
    from runtime.errors import BreakhisError, report
    from runtime.model.manifest import Provenance, sha256_file
    from runtime.model.paths import trained_weights

    if args.parity_count < 1:
        ap.error("--parity-count must be at least 1")
    try:
        variants_made = resolve_variants(args.variants)
    except ValueError as e:
        ap.error(str(e))
    if args.cmd == "trained":
        shared = trained_weights()
        if not (shared / "weights.pt").is_file():
            print(f"error: {shared / 'weights.pt'}: the trained model's weights are not there (set BREAKHIS_SHARED "
                  "to the shared folder)", file=sys.stderr)
            return 2
        report_file = shared / "train_report.json"
        args.checkpoint, args.train_report, args.source, args.untrained = \
            shared / "weights.pt", report_file if report_file.is_file() else None, TRAINED_SOURCE, False
    t0 = time.perf_counter()
    try:
        if args.cmd == "reference":
            import torch

            from export.reference import DEFAULT_SEED, reference_model
            seed = DEFAULT_SEED if args.seed is None else args.seed
            if not 0 < args.width <= 1:
                ap.error("--width must be in (0, 1]")
            narrow = f", convolution width x{args.width:g}" if args.width != 1 else ""
            print(f"building the untrained reference model (seed {seed}{narrow}) ...", file=sys.stderr)
            model = reference_model(seed, args.width)
            digest = _state_sha256(model, torch)
            prov = Provenance(source=f"seeded reference model, seed {seed}{narrow}", sha256=digest, trained=False,
                              checkpoint="weights.pt",
                              notes="UNTRAINED: random weights. Its verdicts are not a diagnosis." +
                                    (" NARROW: not the VGG16 widths; for structural tests." if narrow else ""))
            name = "reference-untrained" + (f"-w{args.width:g}" if narrow else "")
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
        else:  # onnx, trained
            model = load_checkpoint(args.checkpoint)
            metrics, held_out = _train_report(args.train_report) if args.train_report else ({}, [])
            prov = Provenance(source=args.source or f"PyTorch state_dict {args.checkpoint.name}",
                              sha256=sha256_file(args.checkpoint), trained=not args.untrained,
                              checkpoint="weights.pt", metrics=metrics, held_out_patients=held_out)
            name = args.out.name
        images = args.parity_images or default_parity_images()
        if args.parity_images is not None and not args.parity_images.is_dir():
            ap.error(f"--parity-images {args.parity_images}: not a directory")
        if args.stain_reference is not None and not args.stain_reference.is_dir():
            ap.error(f"--stain-reference {args.stain_reference}: not a directory")
        stain = stain_reference(args.stain_reference, images, prov.held_out_patients, _log)
        options = {"parity_count": args.parity_count, "gate_count": args.gate_count,
                   "range_safe": not args.no_range_safe, "variants": list(variants_made),
                   "allow_synthetic": args.allow_synthetic, "stain_reference": None if stain is None else
                   hashlib.sha256(stain.to_json().encode()).hexdigest()}
        key = cache.export_key(prov, images, options)
        if args.no_cache or cache.reuse(key, args.out, name, prov, log=_log) is None:
            write_model_dir(model, args.out, name, prov, images, args.parity_count, args.gate_count,
                            range_safe=not args.no_range_safe, log=_log, variants_made=variants_made,
                            allow_synthetic=args.allow_synthetic, stain=stain)
            cache.store(key, args.out, log=_log)
    except BreakhisError as e:
        return report(e)
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def _errors_to_exit_codes(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The subcommands' one mapping: a BreakhisError reports itself (runtime/errors.py); a ValueError or
    RuntimeError (bad options, unusable image folders) is a usage error, exit 2."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from runtime.errors import BreakhisError, report

        try:
            return fn(args)
        except BreakhisError as e:
            return report(e)
        except (ValueError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def _log(message: str) -> None:
    print(message, file=sys.stderr)


@_errors_to_exit_codes
def _trt(args: argparse.Namespace) -> int:
    from runtime.backends.trt_build import TrtOptions, build_engine
    from runtime.model.model_dir import ModelDir

    opts = TrtOptions(precision=args.precision, min_batch=args.min_batch, opt_batch=args.opt_batch,
                      max_batch=args.max_batch, workspace_mb=args.workspace_mb, dla_core=args.dla_core,
                      timing_cache=str(args.timing_cache) if args.timing_cache else None,
                      calib_images=str(args.calib_images) if args.calib_images else None,
                      calib_count=args.calib_count)
    opts.validate()
    build_engine(ModelDir.open(args.model), opts, log=_log)
    return 0


@_errors_to_exit_codes
def _int8(args: argparse.Namespace) -> int:
    import onnx

    from export.int8 import accept, gate, quantize, reject, speed, verdict
    from export.trt_support import check_onnx

    tmp, bound, logit = quantize(args.model, args.calib_images, args.calib_count, _log)
    try:
        problems = check_onnx(onnx.load(str(tmp)))
        if problems:
            reject(args.model, "outside TensorRT's ONNX support: " + "; ".join(problems))
            _log("the Q/DQ model is outside TensorRT's ONNX support:\n  " + "\n  ".join(problems))
            return 1
        result = gate(args.model, tmp, args.calib_images, args.calib_count, bound, logit)
        print("\n".join(result.lines()))
        figures = speed(args.model, tmp, args.calib_images)
        why = verdict(result, figures)
        ms = figures["ms_per_field"]
        print(f"  speed        INT8 {ms['int8']:.0f} ms per field, FP32 {ms['fp32']:.0f} ms (ONNX Runtime CPU, "
              f"batch 1); with its re-checks {figures['effective_ms']:.0f} ms against {figures['best_other']}'s "
              f"{figures['best_other_ms']:.0f} ms")
        if why:
            reject(args.model, why, result, figures)
            _log(f"INT8 refused ({why}): not added to the model directory")
            return 1
        accept(args.model, tmp, result, figures)
        _log(f"wrote {args.model / 'model.int8.qdq.onnx'} and listed it in manifest.json")
        return 0
    finally:
        tmp.unlink(missing_ok=True)


@_errors_to_exit_codes
def _bf16(args: argparse.Namespace) -> int:
    from export.bf16 import add_to_model
    from runtime.backends.openvino import native
    from runtime.model.manifest import ModelError
    from runtime.model.paths import sample_images

    ok, why = native("bf16")
    if not ok:
        print(f"error: cannot gate BF16 here: {why}", file=sys.stderr)
        return 2
    m = add_to_model(args.model, args.images or sample_images(), args.count, log=_log)
    try:
        m.variant("bf16")
    except ModelError as e:  # it was gated and refused
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.model}: bf16 listed in manifest.json (runs on OpenVINO CPU)")
    return 0


@_errors_to_exit_codes
def _verify(args: argparse.Namespace) -> int:
    from export.verify import verify

    result = verify(args.model, args.images, args.backend, args.precision, args.limit, args.layout)
    print("\n".join(result.lines()))
    if args.backend == "onnxruntime-cuda" and args.layout != "auto":
        from runtime.model.model_dir import ModelDir

        ModelDir.open(args.model).record_layout(args.precision, args.layout, result.ok, result.to_dict())
        print(f"recorded in {args.model}: {args.precision} in {args.layout} {'passed' if result.ok else 'FAILED'}")
    if args.json:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0 if result.ok else 1


def _train_report(path: Path) -> tuple[dict, list[str]]:
    """(held-out metrics, held-out patient ids) from a trainer's report: {"final": {...}, "val_patients": [...]}."""
    import json

    from export.weights import CheckpointError

    try:
        d = json.loads(path.read_text())
        final = d.get("final", {})
        metrics = {k: final[k] for k in ("val_acc", "val_auc", "train_acc") if k in final}
        metrics |= {k: d[k] for k in ("split", "train_images", "val_images") if k in d}
        return metrics, [str(p) for p in d.get("val_patients", [])]
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable training report ({e})") from None


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



def _triton(args: argparse.Namespace) -> int:
    from export.triton_repo import Serving, write_repository
    from runtime.errors import BreakhisError, report
    from runtime.model.model_dir import ModelDir

    serving = Serving(args.max_batch, args.max_queue, args.max_queue_delay_us, args.instances,
                      f"KIND_{args.kind.upper()}")
    try:
        model = ModelDir.open(args.model)
        names = write_repository(model, args.out, serving)
    except BreakhisError as e:
        return report(e)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {', '.join(names)} (tritonserver --model-repository {args.out}; clients: "
          f"--triton-url http://HOST:8000)", file=sys.stderr)
    if "bf16" in model.manifest.variants:
        print("note: bf16 is OpenVINO's CPU tier, not a file a stock Triton backend runs: serve it with python -m "
              "runtime.triton_server", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
