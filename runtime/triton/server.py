"""Triton through PyTriton, below the command (runtime/apps/triton_server.py): what Triton needs before it starts
(this interpreter's libpython for its python-backend stub, free ports), one model bound with dynamic batching, a
bounded queue and its served parameters, starting it without keeping a signal waiting, and its orderly stop within
a time limit. Runs in .venv-triton: nothing here imports runtime.io (the image libraries are not there)."""
from __future__ import annotations

import argparse
import os
import socket
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

from runtime.errors import Unavailable
from runtime.model.served import Served
from runtime.triton.workspace import descendants, kill_descendants, running


class TritonServerUnavailable(Unavailable):
    """PyTriton cannot run here, or a port it needs is taken; the message says which and what to do."""


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


def start(triton: Any, stop: threading.Event) -> bool:
    """Start Triton and load the models (in a thread: a SIGTERM meanwhile is not kept waiting); whether it started
    before ``stop`` was set. A start that failed is said. The thread never ends: PyTriton starts tritonserver with
    PR_SET_PDEATHSIG, which sends it SIGTERM when the thread that started it ends (the process ends it)."""
    failed: list[BaseException] = []
    adopt_orphans()

    def run() -> None:
        try:
            triton.run()
        except BaseException as e:  # noqa: BLE001 (PyTriton raises its own types, OSError and TimeoutError)
            failed.append(e)
        finally:
            stop_or_started.set()
        threading.Event().wait()

    stop_or_started = threading.Event()
    threading.Thread(target=run, daemon=True, name="triton-start").start()
    while not stop_or_started.wait(0.2):
        if stop.is_set():
            return False
    if failed and not stop.is_set():
        print(f"error: Triton did not start: {type(failed[0]).__name__}: {failed[0]}", file=sys.stderr)
    return not failed and not stop.is_set()


def finish(triton: Any, timeout_s: float) -> None:
    """PyTriton's orderly stop (SIGINT to tritonserver, models unloaded, workspace removed), given ``timeout_s``."""
    done = threading.Thread(target=triton.stop, daemon=True, name="triton-stop")
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        print(f"note: Triton did not stop in {timeout_s:g} s: killed", file=sys.stderr)
    end_descendants(KILL_AFTER_S)


KILL_AFTER_S = 3.0  # after the orderly stop, the time Triton's processes are given to end by themselves


def adopt_orphans() -> None:
    """Make this process the reaper of every process it starts, at any depth (Linux PR_SET_CHILD_SUBREAPER): a
    process whose parent ends first (Triton's python-backend stubs, when a process group's SIGTERM ends tritonserver
    before them) is then re-parented to this process instead of init, so ``end_descendants`` still finds it. Called
    by ``start``; where the call is not available (not Linux), descendants are found as before."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) where there is no C library to name
        pass


def end_descendants(grace_s: float) -> None:
    """Nothing of the run outlives this process (a service manager expects its stop to leave nothing): every process
    it started is given ``grace_s`` to end, then killed and waited for (workspace.kill_descendants)."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(running(p) for p in descendants(os.getpid())):
        time.sleep(0.1)
    kill_descendants(os.getpid())
