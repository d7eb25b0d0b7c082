"""python -m runtime.triton_server: this model on a real Triton Inference Server, through PyTriton.

Triton gives what a lab's shared GPU server needs: dynamic batching across clients, a bounded queue that rejects
(HTTP 503, gRPC UNAVAILABLE) instead of growing, the KServe v2 HTTP/gRPC protocol, Prometheus metrics. The model
runs on this project's backend, chosen as everywhere else (--backend, --precision), and is served as
``breakhis_<precision>`` with its manifest, precision, re-check band and file sha256 as model parameters
(runtime/model/served.py); a precision other than FP32 comes with ``breakhis_fp32`` beside it, which clients use to
re-check that precision's borderline fields. Its input is the preprocessed fields, as in the repository `python -m
export triton` writes for a stock tritonserver, so one client (--backend triton) serves both.

PyTriton 0.7.0 pins numpy<2: it runs in its own environment, .venv-triton, which setup.sh makes (run from the
project's .venv, this command moves itself there). Triton's inference API has no authentication of its own: keep it
on 127.0.0.1 (the default) or behind a reverse proxy that checks tokens (docs/deploy.md); PyTriton guards its
model-repository, statistics, trace and logging APIs with an access token (--access-token-file, else a random one),
and with --restrict-inference its inference, metadata and model-config APIs too.
SIGTERM or Ctrl-C stops Triton cleanly: its shared memory and workspace are removed.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Any

# Runs in .venv-triton, which has the model's runtimes but not the image libraries: nothing here may import
# runtime.io or runtime.apps.options (tests/test_triton.py starts it there).
from runtime.backends.choose import BACKENDS, open_backend, reference_for
from runtime.errors import BreakhisError, Unavailable, report
from runtime.model.model_dir import ModelDir
from runtime.model.paths import default_model_dir
from runtime.model.precisions import CHOICES
from runtime.model.served import DEFAULT_NAME, Served, served_name

REPO = Path(__file__).resolve().parents[2]
# made by setup.sh: nvidia-pytriton with numpy<2, onnxruntime, openvino ($BREAKHIS_TRITON_VENV: another one)
TRITON_VENV = Path(os.environ.get("BREAKHIS_TRITON_VENV") or REPO / ".venv-triton")
PYTRITON = "nvidia-pytriton==0.7.0"


class TritonServerUnavailable(Unavailable):
    """PyTriton cannot run here, or a port it needs is taken; the message says which and what to do."""


def pytriton_or_move() -> None:
    """Return where PyTriton imports; else start this command again in .venv-triton (which has it), else raise."""
    try:
        import pytriton  # noqa: F401
        return
    except ImportError:
        pass
    python = TRITON_VENV / "bin" / "python"
    if python.is_file() and Path(sys.executable) != python:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
        os.execve(python, [str(python), "-m", "runtime.triton_server", *sys.argv[1:]], env)
    raise TritonServerUnavailable(f"PyTriton is not installed here and {TRITON_VENV} has no Python: make it with "
                                  f"`bash setup.sh` (or: python3 -m venv {TRITON_VENV} && {TRITON_VENV}/bin/pip "
                                  f"install '{PYTRITON}' onnxruntime openvino)")


def library_path() -> None:
    """Point Triton's python-backend stub at this interpreter's libpython before Triton starts: without it, the stub
    started from a pyenv or other non-system Python maps the system's libpython3.11 against another standard
    library, and no model loads (``_thread.RLock`` has no ``_recursion_count``)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir).is_dir():
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, (libdir, os.environ.get("LD_LIBRARY_PATH"))))


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Refuse at once a port that is taken (PyTriton would wait for its whole start timeout and then say little)."""
    for what, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, port))
            except OSError as e:
                raise TritonServerUnavailable(f"{what} port {host}:{port} cannot be used ({e.strerror}): choose "
                                              f"another with --{what}-port") from None


def bind_model(triton: Any, name: str, backend: Any, served: Served, args: argparse.Namespace) -> None:
    """One Triton model running ``backend``: dynamic batching up to --max-batch, a queue bounded at --max-queue
    requests (beyond it Triton rejects), ``served`` as its config parameters."""
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor

    manifest = served.manifest
    outputs = list(manifest.output_names)

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        got = backend.run(np.ascontiguousarray(inputs[manifest.input_name], np.float32))
        return {k: np.asarray(got[k], np.float32).reshape(-1, 1) for k in outputs}

    preferred = sorted({b for b in (1, 2, 4, 8, 16, 32) if b <= args.max_batch} | {args.max_batch})
    config = ModelConfig(max_batch_size=args.max_batch, batcher=DynamicBatcher(
        max_queue_delay_microseconds=args.max_queue_delay_us, preferred_batch_size=preferred,
        default_queue_policy=QueuePolicy(max_queue_size=args.max_queue)))
    triton.bind(model_name=name, infer_func=infer,
                inputs=[Tensor(name=manifest.input_name, dtype=np.float32, shape=manifest.contract.field_shape)],
                outputs=[Tensor(name=k, dtype=np.float32, shape=(1,)) for k in outputs], config=config, strict=True)
    # PyTriton 0.7.0 has no option for a model's config parameters; they are added to the config it generates, before
    # Triton is started (pinned version; tests/test_triton.py reads them back from the running server).
    model = next(m for m in triton._model_manager.models if m.model_name == name)
    model._get_triton_model_config().backend_parameters.update(served.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.triton_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help="model directory (default: the trained model where setup.sh exported it, else the reference)")
    ap.add_argument("--backend", choices=[b for b in BACKENDS if b != "triton"], default="auto",
                    help="what runs the model inside Triton (default: auto = the fastest here)")
    ap.add_argument("--precision", choices=CHOICES, default="auto",
                    help="model variant (default: auto, as everywhere: fp16 on a GPU, bf16 on a CPU with native BF16, "
                         "where it passed its gate; else fp32)")
    ap.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    ap.add_argument("--name", default=DEFAULT_NAME,
                    help=f"model name prefix (default {DEFAULT_NAME}: models {DEFAULT_NAME}_<precision>)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address for HTTP, gRPC and metrics (default 127.0.0.1). Triton's inference API has no "
                         "authentication: expose it only behind a proxy that checks tokens")
    ap.add_argument("--http-port", type=int, default=8000, help="KServe v2 HTTP (default 8000)")
    ap.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC (default 8001)")
    ap.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics (default 8002)")
    ap.add_argument("--max-batch", type=int, default=8, help="largest batch Triton forms, in fields (default 8)")
    ap.add_argument("--max-queue", type=int, default=32,
                    help="requests allowed to wait; beyond, Triton rejects (HTTP 503 / gRPC UNAVAILABLE; default 32)")
    ap.add_argument("--max-queue-delay-us", type=int, default=2000,
                    help="how long Triton waits to fill a batch, in microseconds (default 2000)")
    ap.add_argument("--exit-timeout", type=int, default=10,
                    help="at SIGTERM, seconds Triton waits for requests in progress to finish (default 10)")
    ap.add_argument("--access-token-file", type=Path, default=None,
                    help="the token for Triton's repository, statistics, trace and logging APIs (clients send it as "
                         "'triton-access-token'); default: a random one, printed at start")
    ap.add_argument("--restrict-inference", action="store_true",
                    help="the token is needed for inference, metadata and model config too (clients: --triton-header "
                         "triton-access-token=TOKEN over HTTP, triton-grpc-protocol-triton-access-token=TOKEN over "
                         "gRPC): a shared secret, in clear text unless TLS is in front (docs/deploy.md)")
    args = ap.parse_args(argv)
    try:
        pytriton_or_move()
        library_path()
        check_ports(args.host, {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port})
        token = args.access_token_file.read_text().strip() if args.access_token_file else None
        return serve(args, token)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BreakhisError as e:
        return report(e)


def serve(args: argparse.Namespace, token: str | None) -> int:
    from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig

    model = ModelDir.open(args.model if args.model is not None else default_model_dir())
    backend, notes = open_backend(args.backend, model, args.threads, args.precision)
    backends = [backend]
    try:
        precision = backend.precision
        fp32 = served_name(args.name, "fp32")
        models = [(served_name(args.name, precision), backend,
                   Served(model.manifest, precision, model.band(precision), backend.model_file, backend.file_sha256,
                          fp32 if precision != "fp32" else ""))]
        if precision != "fp32":  # the reference this precision's borderline fields are re-checked on
            opener, _ = reference_for(backend, model, args.threads)
            reference = opener()
            backends.append(reference)
            models.append((fp32, reference, Served(model.manifest, "fp32", 0.0, reference.model_file,
                                                   reference.file_sha256)))
        config = TritonConfig(http_address=args.host, http_port=args.http_port, grpc_address=args.host,
                              grpc_port=args.grpc_port, metrics_address=args.host, metrics_port=args.metrics_port,
                              exit_timeout_secs=args.exit_timeout)
        restricted = [*DEFAULT_PROTECTED_ENDPOINTS, *(["inference", "metadata", "model-config"]
                                                       if args.restrict_inference else [])]
        security = TritonSecurityConfig(access_token=token, restricted_endpoints=restricted)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        triton = Triton(config=config, security_config=security)
        for name, runs, served in models:  # bound before Triton starts: its models load with their parameters
            bind_model(triton, name, runs, served, args)
        with triton:  # starts Triton and loads the models; leaving it stops Triton and removes its workspace
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
            names = ", ".join(f"{name} ({runs.name})" for name, runs, _ in models)
            print(f"serving {names} with Triton on http://{args.host}:{args.http_port} and grpc://{args.host}:"
                  f"{args.grpc_port} (metrics :{args.metrics_port}); access token for the repository and statistics "
                  f"APIs: {'from ' + str(args.access_token_file) if token else security.access_token}",
                  file=sys.stderr, flush=True)
            while not stop.wait(1.0):
                if not triton.is_alive():
                    print("error: Triton stopped", file=sys.stderr)
                    return 1
        print("stopped", file=sys.stderr)
        return 0
    finally:
        for b in backends:
            b.close()
