"""The one option group for running a model, shared by every CLI (classify, serve, watch, benchmarks, export
verify), and the one way a CLI opens its Classifier."""
from __future__ import annotations

import argparse
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.backends.choose import BACKENDS, DECODERS, PREPROCESSORS
from runtime.io.decode import DEFAULT_MAX_PIXELS
from runtime.model.paths import MODELS, TRAINED_NAME, UNTRAINED_NAME
from runtime.model.precisions import CHOICES
from runtime.pipeline.quality import QC_MODES
from runtime.pipeline.recheck import RECHECK

if TYPE_CHECKING:
    from runtime.backends.triton import TritonTarget
    from runtime.pipeline.classifier import Classifier


def add_model_options(ap: argparse.ArgumentParser, backend_default: str = "auto",
                      max_pixels: int = DEFAULT_MAX_PIXELS,
                      max_pixels_why: str = "an image is decoded whole, about 3 bytes a pixel") -> None:
    """--model, --backend, --precision, --recheck, --qc, --preprocess, --decode, --batch-size, --threads,
    --decode-workers, --build-engine, --max-pixels; and the --triton-* options of --backend triton."""
    g = ap.add_argument_group("model and backend")
    g.add_argument("--model", type=Path, default=None,
                   help=f"model directory with manifest.json (default: $BREAKHIS_MODEL, else {MODELS.name}/"
                        f"{TRAINED_NAME} (trained) where setup.sh exported it, else {MODELS.name}/"
                        f"{UNTRAINED_NAME} (untrained))")
    g.add_argument("--backend", choices=BACKENDS, default=backend_default,
                   help=f"inference backend (default: {backend_default}; auto = the fastest available here)")
    g.add_argument("--precision", choices=CHOICES, default="auto",
                   help="model variant, the same meaning on every backend (default: auto = fp16 on a GPU, bf16 on a "
                        "CPU with native BF16 (OpenVINO), where the model has that variant and it passed its gate; "
                        "else fp32)")
    g.add_argument("--recheck", choices=RECHECK, default="on",
                   help="re-check borderline fields at fp32 (default: on: with a faster precision (fp16, bf16, int8) "
                        "a field whose probability lies within that precision's bound of the threshold is classified "
                        "again at fp32 and fp32's answer is its result, so every label is fp32's, at the cost of "
                        "those few fields; off gives that up: such a field may get the label opposite to fp32's)")
    g.add_argument("--qc", choices=QC_MODES, default="flag",
                   help="field quality check before the verdict: focus, exposure, tissue, stain, each a number with a "
                        "limit (docs/quality.md). flag (default): the verdict stands, marked, with what to do "
                        "('out of focus: re-focus and capture again'); withhold: a flagged field gets no label and the "
                        "image's verdict comes from its other fields (none left: no verdict, said why); off")
    g.add_argument("--preprocess", choices=PREPROCESSORS, default="auto",
                   help="where tiling + normalisation run (default: auto = GPU next to a GPU backend, else CPU)")
    g.add_argument("--decode", choices=DECODERS, default="auto",
                   help="where JPEGs are decoded (default: auto = on the GPU next to GPU preprocessing where "
                        "nvImageCodec is installed and refuses damaged JPEGs in its self-check; PNG always on the CPU)")
    g.add_argument("--batch-size", type=_positive, default=None,
                   help="fields per inference batch, across images (default: the backend's best: 1 on CPU, 8 on GPU)")
    g.add_argument("--threads", type=_positive, default=None, help="inference threads (default: all cores)")
    g.add_argument("--decode-workers", type=_positive, default=None,
                   help="threads reading and decoding images ahead of inference (default: next to CPU inference, "
                        "the cores, at most 4; next to GPU inference, the cores but one, at most 16)")
    g.add_argument("--build-engine", action="store_true",
                   help="build the TensorRT engine for this GPU if the model has none (takes minutes)")
    g.add_argument("--max-pixels", type=_positive, default=max_pixels,
                   help=f"refuse larger images from their header (default: {max_pixels:,}: {max_pixels_why})")
    t = ap.add_argument_group("Triton Inference Server (--backend triton; docs/deploy.md)")
    t.add_argument("--triton-url", default=None, metavar="URL",
                   help="the server the fields go to: http://HOST:PORT, grpc://HOST:PORT (https://, grpcs:// with "
                        "TLS); implies --backend triton. Decoding and preprocessing stay here; --model, where given, "
                        "must be the model the server runs (without it the contract is taken from the server)")
    t.add_argument("--triton-model", default=None, metavar="NAME",
                   help="the server's model (default: breakhis_<precision>; with --precision auto the first of "
                        "breakhis_fp16, breakhis_bf16, breakhis_fp32 it has ready)")
    t.add_argument("--triton-header", action="append", default=[], metavar="NAME=VALUE",
                   help="a header sent with every request, e.g. for a gateway in front of Triton (repeatable); "
                        "Triton's inference API itself has no authentication. Visible to other local users (ps): "
                        "put secrets in --triton-header-file")
    t.add_argument("--triton-header-file", type=Path, default=None, metavar="FILE",
                   help="headers sent with every request, one 'Name: value' per line (# comments), read like a token "
                        "file, e.g. 'Authorization: Bearer TOKEN' or 'triton-access-token: TOKEN'")
    t.add_argument("--triton-ca", type=Path, default=None, metavar="FILE",
                   help="a CA certificate (PEM) to trust for https:// and grpcs:// instead of the system's, for a "
                        "server with a certificate from a private CA")
    t.add_argument("--triton-timeout", type=float, default=60.0, metavar="S",
                   help="seconds one request may take (default 60)")
    t.add_argument("--triton-retries", type=int, default=4, metavar="N",
                   help="tries again, with a doubling pause from 0.25 s, while the server is full (503) or "
                        "unreachable; then the batch's images get the error (default 4)")


def classifier_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Classifier's keyword arguments the options describe (a cohort's Ray actors get them too)."""
    triton = None
    if args.triton_url and args.backend not in ("auto", "triton"):
        raise SystemExit(f"error: --triton-url sends the fields to Triton: it does not go with --backend "
                         f"{args.backend}")
    if args.triton_url:
        triton = triton_target(args)
    elif args.backend == "triton":
        raise SystemExit("error: --backend triton needs --triton-url http://HOST:PORT or grpc://HOST:PORT")
    return {"model_dir": args.model, "backend": "triton" if triton else args.backend, "triton": triton,
            "precision": args.precision,
            "preprocess": args.preprocess, "batch_size": args.batch_size, "threads": args.threads,
            "allow_build": args.build_engine, "max_pixels": args.max_pixels, "decode_workers": args.decode_workers,
            "decode": args.decode, "recheck": args.recheck, "qc": args.qc}


def triton_target(args: argparse.Namespace) -> TritonTarget:
    """The TritonTarget of the --triton-* options; SystemExit naming the option, or the header by its name or
    position, never a header's value."""
    from runtime.backends.triton import HeaderError, TritonTarget, parse_headers

    headers: list[tuple[str, str]] = []
    for i, h in enumerate(args.triton_header, 1):
        name, eq, value = h.partition("=")
        if not eq or not name:
            raise SystemExit(f"error: --triton-header number {i} is not NAME=VALUE")
        headers.append((name, value))
    try:
        if args.triton_header_file:
            headers += parse_headers(read_secret(args.triton_header_file).splitlines(), str(args.triton_header_file))
        if args.triton_ca and not args.triton_ca.is_file():
            raise SystemExit(f"error: --triton-ca {args.triton_ca}: no such file")
        return TritonTarget(args.triton_url, args.triton_model, tuple(headers), args.triton_timeout,
                            max(0, args.triton_retries), str(args.triton_ca) if args.triton_ca else None)
    except HeaderError as e:
        raise SystemExit(f"error: {e}") from None


def read_secret(path: Path) -> str:
    """The text of a file of secrets (headers), read as a token file is: SystemExit naming the file where it cannot
    be read; a warning, not a refusal, where every local user may read it (the token files' rule and reasons,
    runtime/serving/auth.py)."""
    from runtime.serving.auth import readable_by_others

    try:
        text = path.read_text("utf-8")
        shared = readable_by_others(path)
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path}: cannot read the header file ({type(e).__name__}: {e})") from None
    if shared:
        print(f"WARNING: {path}: the header file is readable by every local user (mode "
              f"{stat.S_IMODE(path.stat().st_mode):o}): chmod o-r {path}", file=sys.stderr)
    return text


def open_classifier(args: argparse.Namespace, **overrides: Any) -> Classifier:
    """The Classifier the options describe; raises a BreakhisError (ModelError, Unavailable) when it cannot."""
    from runtime.pipeline.classifier import Classifier

    return Classifier(**(classifier_options(args) | overrides))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value
