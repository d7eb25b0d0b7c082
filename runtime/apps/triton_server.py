"""python -m runtime.triton_server: this model on a real Triton Inference Server, through PyTriton.

Triton gives what a lab's shared GPU server needs: dynamic batching across clients, a bounded queue that rejects
(HTTP 503, gRPC UNAVAILABLE) instead of growing, the KServe v2 HTTP/gRPC protocol, Prometheus metrics. The model
runs on this project's backend, chosen as everywhere else (--backend, --precision), and is served as
``breakhis_<precision>`` with its manifest, precision, re-check band and file sha256 as model parameters
(runtime/model/served.py); a precision other than FP32 comes with ``breakhis_fp32`` beside it, which clients use to
re-check that precision's borderline fields. Its input is the preprocessed fields, as in the repository `python -m
export triton` writes for a stock tritonserver, so one client (--backend triton) serves both.

PyTriton 0.7.0 pins numpy<2: it runs in its own environment, .venv-triton, which setup.sh makes (run from the
project's .venv, this command moves itself there).

Locked by default, with the rules of runtime.serve: the token comes from --access-token-file, read by the same
reader (runtime/serving/auth.py: one token of at least 16 printable characters without spaces), else a random one
written to a file only this user can read (its path is printed, never the token); PyTriton guards Triton's
model-repository, shared-memory, statistics, trace and logging APIs with it, and --restrict-inference its
inference, metadata and model-config APIs too. Binding to anything but loopback is refused unless
--restrict-inference with --access-token-file protects the inference API, or --insecure-no-auth says so. PyTriton
0.7.0 hands the token to tritonserver on its command line only (other local users can read it with ps:
docs/deploy.md says what to do). SIGTERM or Ctrl-C, to this process or its whole process group (as systemd and
`timeout` send it), stops Triton within --exit-timeout and a few seconds: then what is left of its processes is
killed and its shared memory, model folders and workspace are removed (runtime/triton/workspace.py), as are
those of runs that were killed, at start.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

# Runs in .venv-triton, which has the model's runtimes but not the image libraries: nothing here may import
# runtime.io or runtime.apps.options (tests/test_triton.py starts it there).
from runtime.backends.choose import BACKENDS, open_backend, reference_for
from runtime.errors import BreakhisError, report
from runtime.model.model_dir import ModelDir
from runtime.model.paths import default_model_dir
from runtime.model.precisions import CHOICES
from runtime.model.served import DEFAULT_NAME, Served, served_name
from runtime.serving.auth import AuthError, check_binding, read_tokens, readable_warning
from runtime.triton import workspace
from runtime.triton.server import TritonServerUnavailable, bind_model, check_ports, finish, library_path, start

REPO = Path(__file__).resolve().parents[2]
# made by setup.sh: nvidia-pytriton with numpy<2, onnxruntime, openvino ($BREAKHIS_TRITON_VENV: another one)
TRITON_VENV = Path(os.environ.get("BREAKHIS_TRITON_VENV") or REPO / ".venv-triton")
PYTRITON = "nvidia-pytriton==0.7.0"
MOVED = "BREAKHIS_TRITON_MOVED"  # set in the environment of the command started again in .venv-triton
STOP_GRACE_S = 5  # after Triton's --exit-timeout, the time left for unloading and PyTriton's cleanup; then killed


def pytriton_or_move() -> None:
    """Return where PyTriton imports; else start this command again in .venv-triton (which has it), else raise."""
    try:
        import pytriton  # noqa: F401
        return
    except ImportError:
        pass
    python = TRITON_VENV / "bin" / "python"
    if python.is_file() and Path(sys.executable) != python:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
               MOVED: "1"}
        os.execve(python, [str(python), "-m", "runtime.triton_server", *sys.argv[1:]], env)
    raise TritonServerUnavailable(f"PyTriton is not installed here and {TRITON_VENV} has no Python: make it with "
                                  f"`bash setup.sh` (or: python3 -m venv {TRITON_VENV} && {TRITON_VENV}/bin/pip "
                                  f"install '{PYTRITON}' onnxruntime openvino)")


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
    ap.add_argument("--token-file", "--access-token-file", dest="access_token_file", type=Path, default=None,
                    help="the token (one line, at least 16 characters, as runtime.serve's --token-file) for Triton's "
                         "repository, shared-memory, statistics, trace and logging APIs (clients send it as the "
                         "header 'triton-access-token'); default: a random one, written to a file only this user can "
                         "read, whose path is printed")
    ap.add_argument("--restrict-inference", action="store_true",
                    help="the token is needed for inference, metadata and model config too (clients: "
                         "--triton-header-file with 'triton-access-token: TOKEN' over HTTP, "
                         "'triton-grpc-protocol-triton-access-token: TOKEN' over gRPC): a shared secret, in clear text "
                         "unless TLS is in front (docs/deploy.md)")
    ap.add_argument("--insecure-no-auth", action="store_true",
                    help="allow binding beyond loopback without --restrict-inference and --access-token-file: "
                         "anyone who can reach the address can classify")
    args = ap.parse_args(argv)
    try:  # refused before anything starts (and before this command moves to .venv-triton)
        token = access_token(args.access_token_file)
        warning = check_host(args)
        if warning and not os.environ.get(MOVED):  # said once, before the move to .venv-triton
            print(warning, file=sys.stderr)
        pytriton_or_move()
        library_path()
        check_ports(args.host, {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port})
        return serve(args, token)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BreakhisError as e:
        return report(e)


def access_token(path: Path | None) -> str | None:
    """The token of --access-token-file, read by runtime.serve's reader (its rules, its messages); one token only:
    Triton takes one. None without the option."""
    if path is None:
        return None
    tokens = read_tokens(path)
    warning = readable_warning(path)  # the token files' one rule (runtime/serving/auth.py)
    if warning:
        print(warning, file=sys.stderr)
    if len(tokens) != 1:
        raise AuthError(f"{path}: {len(tokens)} tokens: Triton takes one (one line)")
    return tokens[0].decode()


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(args: argparse.Namespace) -> str | None:
    """runtime.serve's rule for binding (runtime/serving/auth.py): beyond loopback only where the inference API needs
    the token (--restrict-inference with --access-token-file), or with --insecure-no-auth (a warning); a warning
    too where the token would cross a network in clear text."""
    local, locked = is_loopback(args.host), args.restrict_inference and args.access_token_file is not None
    try:
        warning = check_binding(args.host, local, locked, args.insecure_no_auth)
    except AuthError:
        raise AuthError(f"refusing to bind {args.host} without authentication: Triton's inference API would answer "
                        "anyone who can reach it. Give --restrict-inference with --access-token-file FILE (clients "
                        "send the header triton-access-token), or say --insecure-no-auth") from None
    if not local and args.access_token_file is not None:  # PyTriton serves neither HTTP nor gRPC over TLS
        clear = (f"WARNING: Triton serves plain HTTP and gRPC on {args.host}: the access token crosses the network in "
                 "clear text, readable by anyone on the path; put a TLS proxy in front (docs/deploy.md)")
        warning = f"{warning}\n{clear}" if warning else clear
    return warning


def serve(args: argparse.Namespace, token: str | None) -> int:
    """Serve until SIGTERM or SIGINT; then stop Triton in order within --exit-timeout + STOP_GRACE_S, kill what is
    left, remove the run's files, and exit at once, whatever happened (PyTriton's threads must not keep a stopped
    server alive: issue 37)."""
    from pytriton.constants import PYTRITON_HOME

    removed = workspace.remove_stale(PYTRITON_HOME)
    if removed:
        print(f"note: removed what killed runs left: {', '.join(removed)}", file=sys.stderr)
    run = workspace.RunFolder(PYTRITON_HOME)
    stop = threading.Event()

    def stopping(*_: object) -> None:  # Triton's model folders noted while its stubs still run (a process group's
        stop.set()                     # SIGTERM ends them with Triton, which then leaves the folders)
        run.note(folders=workspace.triton_folders(os.getpid()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopping)
    made: dict[str, Any] = {"triton": None, "backends": []}  # filled as they are made
    code = 1
    try:
        code = serve_in(run, args, token, stop, made)
    except BreakhisError as e:
        code = report(e)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Exception:  # noqa: BLE001 (a bug: said, and everything is still stopped and removed)
        traceback.print_exc()
    finally:  # whatever happens here (stderr a closed pipe included), the run's folder goes and the process exits
        try:
            if made["triton"] is not None:
                finish(made["triton"], args.exit_timeout + STOP_GRACE_S)
        except OSError:
            pass
        except Exception:  # noqa: BLE001 (a bug in the stop: said, and the exit says it did not stop cleanly)
            traceback.print_exc()
            code = code or 1
        finally:
            run.remove()
            for backend in made["backends"]:
                backend.close()
            try:
                print("stopped", file=sys.stderr)
                sys.stdout.flush()
                sys.stderr.flush()
            except OSError:
                pass
            os._exit(code)


def serve_in(run: workspace.RunFolder, args: argparse.Namespace, token: str | None, stop: threading.Event,
             made: dict[str, Any]) -> int:
    """The model on Triton, in ``run``'s folder, until ``stop``: 0 when stopped so, 1 when Triton failed."""
    from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig

    if token is None:
        token = secrets.token_urlsafe(32)
        said = f"a random one in {run.secret('access-token', token)} (readable by this user only; removed at exit)"
    else:
        said = f"from {args.access_token_file}"
    model = ModelDir.open(args.model if args.model is not None else default_model_dir())
    backend, notes = open_backend(args.backend, model, args.threads, args.precision)
    made["backends"].append(backend)
    precision = backend.precision
    fp32 = served_name(args.name, "fp32")
    models = [(served_name(args.name, precision), backend,
               Served(model.manifest, precision, model.band(precision), backend.model_file, backend.file_sha256,
                      fp32 if precision != "fp32" else ""))]
    if precision != "fp32":  # the reference this precision's borderline fields are re-checked on
        opener, _ = reference_for(backend, model, args.threads)
        reference = opener()
        made["backends"].append(reference)
        models.append((fp32, reference, Served(model.manifest, "fp32", 0.0, reference.model_file,
                                               reference.file_sha256)))
    config = TritonConfig(http_address=args.host, http_port=args.http_port, grpc_address=args.host,
                          grpc_port=args.grpc_port, metrics_address=args.host, metrics_port=args.metrics_port,
                          exit_timeout_secs=args.exit_timeout)
    restricted = [*DEFAULT_PROTECTED_ENDPOINTS, *(["inference", "metadata", "model-config"]
                                                   if args.restrict_inference else [])]
    security = TritonSecurityConfig(access_token=token, restricted_endpoints=restricted)
    triton = Triton(config=config, workspace=run.path / "w", security_config=security)  # short: sockets inside
    run.note(shm_prefix=triton._python_backend_config["shm-region-prefix-name"])  # pinned PyTriton 0.7.0
    for name, runs, served in models:  # bound before Triton starts: its models load with their parameters
        bind_model(triton, name, runs, served, args)
    made["triton"] = triton
    if not start(triton, stop):
        return 0 if stop.is_set() else 1
    run.note(folders=workspace.triton_folders(os.getpid()))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    names = ", ".join(f"{name} ({runs.name})" for name, runs, _ in models)
    print(f"serving {names} with Triton on http://{args.host}:{args.http_port} and grpc://{args.host}:"
          f"{args.grpc_port} (metrics :{args.metrics_port}); access token: {said}; workspace {run.path}",
          file=sys.stderr, flush=True)
    while not stop.wait(1.0):
        if not triton.is_alive():
            print("error: Triton stopped", file=sys.stderr)
            return 1
    return 0
