"""python -m export: turn weights into the artefacts under models/ (ONNX FP32 + FP16, manifest, report)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EPILOG = """examples:
  python -m export reference                      # seeded UNTRAINED model -> models/reference
  python -m export onnx --checkpoint my.pt -o models/breakhis-v1 --source "trained by X, 2026-11"
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
    args = ap.parse_args(argv)

    # Heavy imports after argument parsing so that --help is instant.
    from export.artefacts import ExportError, default_parity_images, write_model_dir
    from export.weights import CheckpointError, load_checkpoint, sha256_file
    from runtime.manifest import Provenance

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
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


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
