"""The model on a real Triton Inference Server (PyTriton, in .venv-triton) on 127.0.0.1, and --backend triton against
it over HTTP and gRPC: the local backend's probabilities, batching across concurrent clients in Triton's own
statistics, a full queue as a clear per-item error and then success with retries, a server stopped mid-run (every
item answered once), a model that is not the local one refused; and the repository for a stock tritonserver,
checked with Triton's own config schema."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.io.decode import read_image
from runtime.model.manifest import Contract, ModelError, sha256_file
from runtime.model.model_dir import ModelDir
from runtime.model.precisions import PRECISIONS
from tests.conftest import REPO, run_module

TRITON_PYTHON = REPO / ".venv-triton" / "bin" / "python"
tritonclient = pytest.importorskip("tritonclient.http",
                                   reason="tritonclient not installed (setup.sh installs the triton extra)")


def _pytriton_missing() -> str | None:
    if not TRITON_PYTHON.is_file():
        return f"{TRITON_PYTHON.parent.parent} does not exist (setup.sh makes it; BREAKHIS_NO_TRITON skips it)"
    proc = subprocess.run([str(TRITON_PYTHON), "-c", "import pytriton"], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"PyTriton does not import in .venv-triton: {proc.stderr[-300:]}"


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    """``python -m runtime.triton_server`` on free loopback ports, as a user starts it (from the project's .venv)."""

    def __init__(self, model_dir: Path, tmp: Path, *extra: str) -> None:
        why = _pytriton_missing()
        if why:
            pytest.skip(why)
        self.http, self.grpc, metrics = _ports(3)
        self.token = "statistics-token-0123456789"
        self.token_file = tmp / "token"
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        self.log = tmp / "server.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.triton_server", "--model", str(model_dir), "--backend", "cpu",
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(metrics),
             "--access-token-file", str(tmp / "token"), "--exit-timeout", "2", *extra],
            cwd=REPO, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.http}"
        try:
            self._ready()
        except BaseException:
            self.stop()  # never left running behind a failed start
            raise

    def _ready(self) -> None:
        client = tritonclient.InferenceServerClient(f"127.0.0.1:{self.http}")
        for _ in range(240):
            try:
                if client.is_model_ready("breakhis_fp32"):
                    break
            except Exception:  # not listening yet
                pass
            if self.proc.poll() is not None:
                pytest.fail(f"triton_server exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            time.sleep(0.25)
        else:
            pytest.fail(f"Triton not ready in 60 s: {self.log.read_text()[-3000:]}")
        config = client.get_model_config("breakhis_fp32", headers={"triton-access-token": self.token})
        self.workspace = Path(config["parameters"]["workspace-path"]["string_value"])
        self.shm_prefix = f"pytrtion{self.proc.pid}"
        self.model_folders = model_folders(self.proc.pid)
        assert self.model_folders, "the stubs' model folders are found (else left_behind would not look for them)"

    def group(self) -> list[int]:
        """The running (not zombie) processes of the server's process group."""
        return group(self.proc.pid)

    def stats(self, model: str) -> dict:
        client = tritonclient.InferenceServerClient(f"127.0.0.1:{self.http}")
        return client.get_inference_statistics(model, headers={"triton-access-token": self.token})

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; a server that does not stop is killed with its Triton (its own
        session) and the test fails."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise

    def left_behind(self) -> list[str]:
        """What a stopped server left: processes of its group (Triton, its stubs, PyTriton's helpers), shared
        memory, PyTriton's workspace, the folders Triton wrote its models into."""
        left = [f"pid {p}" for p in self.group()]
        left += [f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(self.shm_prefix)]
        return left + [str(p) for p in [self.workspace, *self.model_folders] if p.exists()]


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command: state, ppid, pgrp, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def group(pgid: int) -> list[int]:
    """The running (not zombie) processes of process group ``pgid``, read from /proc."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, _, pgrp = _stat(entry)[:3]
        except OSError:
            continue
        if int(pgrp) == pgid and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def model_folders(pgid: int) -> list[Path]:
    """The folders Triton wrote the models of PyTriton into: its Python-backend stubs (in the server's process group)
    run <folder>/<version>/model.py."""
    folders = []
    for pid in group(pgid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"triton_python_backend_stub"):
            folders.append(Path(argv[1].decode()).parents[1])
    return folders


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    """The narrow reference model: FP16 on ONNX Runtime CPU as breakhis_fp16, FP32 beside it; batches of up to 4
    formed within 100 ms, at most 2 requests waiting."""
    server = Server(model_dir, tmp_path_factory.mktemp("triton"), "--precision", "fp16", "--max-batch", "4",
                    "--max-queue", "2", "--max-queue-delay-us", "100000")
    yield server
    assert server.stop() == 0, server.log.read_text()[-2000:]  # SIGTERM to the server's process only
    assert server.left_behind() == []
    log = server.log.read_text()
    assert "Traceback" not in log and server.token not in log and f"from {server.token_file}" in log


def _classifier(model_dir, url, **kw):
    from runtime.backends.triton import TritonTarget
    from runtime.pipeline.classifier import Classifier

    target = TritonTarget(url, kw.pop("model", None), retries=kw.pop("retries", 4))
    return Classifier(model_dir, backend="triton", triton=target, **kw)


def _at_once(n: int, model_dir, url: str, images: list, **kw) -> list:
    """n clients, each with its own Classifier on ``url`` at FP32, sending one image each at the same moment."""
    start, out = threading.Barrier(n), []

    def client(i: int) -> None:
        with _classifier(model_dir, url, precision="fp32", **kw) as clf:
            start.wait()
            out.extend(clf.classify([images[i]]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_triton_gives_the_local_backends_probabilities(served, model_dir, images_100x, scheme):
    from runtime.pipeline.classifier import Classifier

    url = served.url if scheme == "http" else f"grpc://127.0.0.1:{served.grpc}"
    images = images_100x[:8]
    with Classifier(model_dir, backend="cpu", precision="fp32") as local:
        want = np.array([r.probability for r in local.classify(images)])
    tol = PRECISIONS["fp32"].tolerance
    with _classifier(model_dir, url, precision="fp32") as remote:
        got = remote.classify(images)
        assert remote.backend.precision == "fp32" and remote.recheck is None
    assert all(r.error is None for r in got), [r.error for r in got]
    p = np.array([r.probability for r in got])
    assert np.all(np.abs(p - want) <= tol.probability + tol.rtol * np.abs(want)), np.abs(p - want).max()
    assert f"breakhis_fp32 v1 at {url}" in got[0].model.backend  # every result names server, model and version
    with _classifier(None, url) as auto:  # no local model: the contract is the server's; auto takes its FP16
        fast = auto.classify(images)
        assert auto.backend.precision == "fp16" and auto.manifest.contract == ModelDir.open(model_dir).contract
    assert [r.label for r in fast] == [r.label for r in got]  # FP32's labels: in-band fields re-checked on the server


def test_concurrent_clients_are_batched_by_triton(served, model_dir, images_100x):
    def batches() -> dict[int, int]:  # Triton's own statistics: runs per batch size
        stats = served.stats("breakhis_fp32")["model_stats"][0]["batch_stats"]
        return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats}

    # the clients send decoded images, so that little but the request lies between the barrier and Triton's queue;
    # where a loaded machine still spreads their arrivals beyond the 100 ms window, the 4 are sent again (3 tries)
    decoded = [read_image(p).bgr for p in images_100x[:4]]
    seen = []
    for _ in range(3):
        before = batches()
        results = _at_once(4, model_dir, served.url, decoded)
        assert len(results) == 4 and all(r.error is None for r in results), [r.error for r in results]
        after = batches()  # Triton ran fields of several clients together: a run of more than 1 field since before
        seen.append((before, after))
        if any(size > 1 and n > before.get(size, 0) for size, n in after.items()):
            return
    raise AssertionError(f"Triton never ran two clients' fields together in 3 tries: {seen}")


def test_a_full_queue_is_a_clear_per_item_error_and_retries_get_through(served, model_dir, images_100x):
    refused = _at_once(8, model_dir, served.url, images_100x, retries=0)
    assert len(refused) == 8
    errors = [r.error for r in refused if r.error]
    assert errors, "8 clients at once against a queue of 2: some must be refused"
    assert all("Exceeds maximum queue size" in e and "breakhis_fp32" in e and served.url in e for e in errors), errors
    assert all(r.label in ("Benign", "Malignant") for r in refused if not r.error)  # the others are answered
    retried = _at_once(8, model_dir, served.url, images_100x, retries=6)
    assert [r.error for r in retried] == [None] * 8


def test_a_server_stopped_mid_run_answers_every_item_once(model_dir, images_100x, tmp_path):
    from runtime.backends.triton import TritonTarget, TritonUnavailable
    from runtime.pipeline.classifier import Classifier

    server = Server(model_dir, tmp_path, "--precision", "fp32", "--restrict-inference")
    with pytest.raises(TritonUnavailable, match="triton-access-token"):  # inference needs the token too
        _classifier(model_dir, server.url)
    images = images_100x[:12]
    out = []
    target = TritonTarget(server.url, headers=(("triton-access-token", server.token),), retries=1)
    try:
        with Classifier(model_dir, backend="triton", triton=target, batch_size=1) as clf:
            for r in clf.classify_iter(images):
                out.append(r)
                if len(out) == 3:
                    assert server.stop() == 0
    finally:
        server.stop()
    assert [r.path for r in out] == [str(p) for p in images]  # each once, in order
    assert all((r.error is None) != (r.label is None) for r in out)
    assert all(r.label for r in out[:3]) and out[-1].error and "Triton at" in out[-1].error
    assert server.left_behind() == []


def test_a_server_with_another_model_is_refused(served, trained_dir):
    with pytest.raises(ModelError, match=r"is not the local model breakhis-scratch-v1: .*weights sha256"):
        _classifier(trained_dir, served.url, precision="fp32")
    proc = run_module("runtime.classify", "--triton-url", served.url, "--model", str(trained_dir), "x.png")
    assert proc.returncode != 0 and "weights sha256" in proc.stderr and "Traceback" not in proc.stderr
    from runtime.backends.triton import TritonUnavailable

    with pytest.raises(TritonUnavailable, match="Triton at http://127.0.0.1:9: liveness: "):  # nothing listens there
        _classifier(None, "http://127.0.0.1:9")


def test_the_repository_for_a_stock_tritonserver(model_dir, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path / "repo"
    run_module("export", "triton", "-m", str(model_dir), "-o", str(repo), "--max-queue", "16", check=True)
    model = ModelDir.open(model_dir)
    assert sorted(p.name for p in repo.iterdir()) == ["breakhis_fp16", "breakhis_fp32"]
    for precision in ("fp32", "fp16"):
        folder = repo / f"breakhis_{precision}"
        c = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert c.platform == "onnxruntime_onnx" and c.max_batch_size == 8
        assert list(c.input[0].dims) == [6, 3, 224, 224] and [o.name for o in c.output] == ["logit", "probability"]
        assert c.dynamic_batching.default_queue_policy.max_queue_size == 16
        assert c.dynamic_batching.default_queue_policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
        assert list(c.dynamic_batching.preferred_batch_size) == [1, 2, 4, 8] and c.instance_group[0].count == 1
        params = {k: v.string_value for k, v in c.parameters.items()}
        file = model.variant(precision).file
        assert sha256_file(folder / "1" / "model.onnx") == model.manifest.files[file] == params["breakhis_file_sha256"]
        assert Contract.from_dict(json.loads(params["breakhis_manifest"])["contract"]) == model.manifest.contract
        accelerators = c.optimization.execution_accelerators.gpu_execution_accelerator
        assert [dict(a.parameters) for a in accelerators] == ([{"precision_mode": "FP16"}] if precision == "fp16"
                                                              else [])  # FP32 stays FP32
    assert params["breakhis_recheck_model"] == "breakhis_fp32" and float(params["breakhis_band"]) == model.band("fp16")
    proc = run_module("export", "triton", "-m", str(model_dir), "-o", str(repo))  # written whole, never over
    assert proc.returncode != 0 and "not empty" in proc.stderr


def test_a_changed_model_file_writes_no_repository(model_dir, tmp_path):
    import shutil

    damaged = tmp_path / "model"
    shutil.copytree(model_dir, damaged)
    with open(damaged / "model.fp16.onnx", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    proc = run_module("export", "triton", "-m", str(damaged), "-o", str(tmp_path / "repo"))
    assert proc.returncode != 0 and "sha256" in proc.stderr
    assert not (tmp_path / "repo").exists() and not list(tmp_path.glob(".repo.*"))


def test_our_server_classifies_through_triton(served, model_dir, images_100x):
    """runtime.serve's worker thread sends the fields (the HTTP client is made per thread: gevent's rule). The URL
    carries credentials (sent as Basic authentication, which Triton ignores): neither the result nor /v1/model
    shows them."""
    import urllib.request

    from tests.test_serve import post, start_server

    with_password = served.url.replace("http://", "http://lab-user:url-password-0123456789@")
    proc, url = start_server(model_dir, "--triton-url", with_password, "--precision", "fp32", backend="triton")
    try:
        status, out = post(url, images_100x[0].read_bytes())
        assert status == 200 and out["label"] in ("Benign", "Malignant"), out
        assert out["model"]["backend"] == f"triton-fp32 (breakhis_fp32 v1 at {served.url})"
        model = urllib.request.urlopen(url + "/v1/model", timeout=30).read().decode()
        assert served.url in model and "url-password" not in model and "url-password" not in json.dumps(out)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_server_says_why_it_cannot_start(tmp_path):
    proc = run_module("runtime.triton_server", env={"BREAKHIS_TRITON_VENV": str(tmp_path / "none")})
    assert proc.returncode == 2 and "PyTriton is not installed here" in proc.stderr and "setup.sh" in proc.stderr
    if _pytriton_missing():
        pytest.skip(_pytriton_missing())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_module("runtime.triton_server", "--http-port", str(port))
    # refused by our check before Triton starts (PyTriton would wait out its start timeout and say little)
    assert proc.returncode != 0 and f"http port 127.0.0.1:{port} cannot be used" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_tensorrt_plan_built_for_the_server_joins_the_repository(model_dir, tmp_path):
    """The plan's bytes are opaque here (no TensorRT): what is checked is the mechanism, a plan per engine sidecar,
    its sha256 the sidecar's, served on the GPU as tensorrt_plan at the batch its profile allows."""
    import shutil

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from runtime.backends.engines import EngineInfo, EngineTarget, save

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    target = EngineTarget("10.3.0", "Orin", "8.7", ModelDir.open(model).manifest.files["model.onnx"], "fp16")
    plan = b"a serialized engine for this GPU and TensorRT" * 100
    save(ModelDir.open(model).engines, EngineInfo(target, "model.onnx", {"min": 1, "opt": 4, "max": 4}), plan)
    run_module("export", "triton", "-m", str(model), "-o", str(tmp_path / "repo"), check=True)
    name = f"breakhis_{target.key()}"
    folder = tmp_path / "repo" / name
    c = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert c.platform == "tensorrt_plan" and c.max_batch_size == 4 and not c.HasField("optimization")
    assert c.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert (folder / "1" / "model.plan").read_bytes() == plan
    params = {k: v.string_value for k, v in c.parameters.items()}
    assert params["breakhis_precision"] == "fp16" and params["breakhis_recheck_model"] == "breakhis_fp32"


def test_triton_options_are_checked(capsys):
    from runtime.apps.classify import main

    for args, said in ((["--triton-header", "novalue"], "--triton-header number 1 is not NAME=VALUE"),
                       (["--backend", "cpu"], "does not go with --backend cpu")):
        with pytest.raises(SystemExit, match=said):
            main(["--triton-url", "http://127.0.0.1:9", *args, "x.png"])
    assert main(["--triton-url", "ftp://host:1", "x.png"]) != 0
    assert "give http://HOST:PORT" in capsys.readouterr().err
