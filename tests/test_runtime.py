"""The runtime gives the framework's answer: Classifier (ONNX Runtime CPU, our preprocessing) vs the PyTorch FP32
baseline with the original per-patch preprocessing, on real images; batching does not change results."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from benchmarks.baseline import Baseline
from runtime.pipeline.classifier import Classifier
from tests.conftest import run_module


@pytest.fixture(scope="module")
def clf(model_dir):
    with Classifier(model_dir, backend="cpu", batch_size=8) as c:
        yield c


def test_matches_pytorch_baseline_on_real_images(clf, model_dir, images_100x):
    paths = images_100x[::4]
    results = clf.classify(paths)
    base = Baseline(model_dir)
    want = np.array([base.classify(p) for p in paths])
    got = np.array([r.probability for r in results])
    assert all(r.error is None for r in results)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [r.label for r in results] == ["Malignant" if p > 0.5 else "Benign" for p in want]
    assert got.std() > 1e-3  # the model's answers differ between images: the comparison is meaningful


def test_batch_size_does_not_change_results(model_dir, images_100x, clf):
    paths = images_100x[:5]
    with Classifier(model_dir, backend="cpu", batch_size=1) as one:
        a = [r.probability for r in one.classify(paths)]
    b = [r.probability for r in clf.classify(paths)]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_errors_do_not_cost_the_batch(clf, images_100x, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    good = images_100x[0]
    res = clf.classify([good, tmp_path / "empty.png", good, np.zeros((100, 100, 3), np.uint8)])
    assert [r.error is None for r in res] == [True, False, True, False]
    assert res[0].probability == res[2].probability
    assert "empty.png: empty file" in res[1].error and "at least 672x448" in res[3].error


def test_large_image_is_tiled_into_fields(clf, images_100x):
    import cv2

    img = cv2.imread(str(images_100x[0]))
    big = np.tile(img, (2, 2, 1))  # 1400x920 -> 2x2 fields of 672x448
    (r,) = clf.classify([big])
    assert [(f.row, f.col, f.y, f.x, f.patches) for f in r.fields] == [
        (0, 0, 0, 0, 6), (0, 1, 0, 672, 6), (1, 0, 448, 0, 6), (1, 1, 448, 672, 6)]
    single = clf.classify([img])[0].probability
    assert r.fields[0].probability == pytest.approx(single, abs=1e-6)  # same pixels, same answer
    assert r.probability == max(f.probability for f in r.fields)


def test_runtime_never_imports_torch(model_dir, images_100x):
    code = ("import sys; sys.modules['torch'] = None\n"  # any 'import torch' now raises ImportError
            "from runtime.pipeline.classifier import Classifier\n"
            f"r = Classifier({str(model_dir)!r}, backend='cpu').classify([{str(images_100x[0])!r}])[0]\n"
            "assert r.error is None, r.error; print(r.label)")
    import subprocess
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("Benign", "Malignant")


def _imports(path):
    """Modules a source file imports (top level or inside functions), as dotted names."""
    import ast

    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_import_graph_has_no_circle_and_runtime_never_imports_export():
    from tests.conftest import REPO

    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for pkg in ("runtime", "export") for p in (REPO / pkg).rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    upward = sorted(f"{m} -> {i}" for m, deps in graph.items() if m.startswith("runtime") for i in deps
                    if i.startswith("export"))
    assert upward == []
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, "import circle: " + " -> ".join([*path, d])
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


# runtime's floors, lowest first: a module imports only from its own package or from a lower floor (docs/design.md)
FLOORS = (("runtime.errors",), ("runtime.model",), ("runtime.io",), ("runtime.gpu",), ("runtime.backends",),
          ("runtime.pipeline",), ("runtime.slides",), ("runtime.cohorts",), ("runtime.serving", "runtime.triton",
          "runtime.watchfolder"), ("runtime.apps",),
          ("runtime.classify", "runtime.serve", "runtime.triton_server", "runtime.watch", "runtime.slide",
           "runtime.cohort"))


def _floor(module):
    """The floor of a runtime module (None: the ``runtime`` package itself)."""
    return next((i for i, names in enumerate(FLOORS) for n in names if module == n or module.startswith(n + ".")),
                None)


def test_no_runtime_import_climbs_to_a_higher_floor():
    """gpu, backends, io and model never import pipeline, slides, cohorts or apps; slides and cohorts never import
    the servers' machinery (serving, triton), the watch folder or apps; those never import apps; only the entry points
    import apps. Each arrow that climbs is named."""
    from tests.conftest import REPO

    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (REPO / "runtime").rglob("*.py")}
    unplaced = sorted(m for m in modules if m != "runtime" and _floor(m) is None)
    assert unplaced == [], f"modules on no floor (add them to FLOORS): {unplaced}"
    climbing = sorted(f"{m} -> {i}" for m, p in modules.items() if m != "runtime" for i in _imports(p)
                      if i in modules and i != "runtime" and _floor(i) > _floor(m))
    assert climbing == []


def test_apps_holds_only_entry_points():
    """runtime/apps/ keeps argument parsing, progress, exit codes and the HTTP routes (issue 38): no module over 300
    lines, the folder at most 1,700, and no class defined there (what a class would hold, a slide, a pool, a queue,
    a watcher, belongs to the package whose job it is)."""
    import ast

    from tests.conftest import REPO

    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "runtime" / "apps").glob("*.py")}
    assert max(sizes.values()) <= 300 and sum(sizes.values()) <= 1700, sizes
    classes = [f"{p.name}: {n.name}" for p in (REPO / "runtime" / "apps").glob("*.py")
               for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)]
    assert classes == []


def test_auto_preprocessing_falls_back_to_the_cpu_with_a_note_when_the_kernel_cannot_run():
    """A runtime-only box: a GPU backend, but no nvcc to build the kernel (or no pycuda): the CPU path, said so."""
    from export.model import CONTRACT
    from runtime.errors import Unavailable
    from runtime.gpu.build import KernelBuildError
    from runtime.pipeline.preprocessors import open_preprocessor

    class DeviceInputBackend:  # the boundary: what a GPU backend offers the kernel
        device_input, input_fp16, stream = True, False, None

    assert issubclass(KernelBuildError, Unavailable)  # so every automatic fallback catches it
    notes: list[str] = []
    assert open_preprocessor("auto", DeviceInputBackend(), CONTRACT, 1, notes).name == "cpu"
    assert notes and notes[0].startswith("preprocess auto chose the CPU")
    with pytest.raises(Unavailable):
        open_preprocessor("gpu", DeviceInputBackend(), CONTRACT, 1, [])


def test_decode_pipeline_keeps_order_bounds_what_it_reads_ahead_and_passes_bad_files(model_dir, images_100x):
    """Decoding runs ahead in a pool of threads: results still come in input order and equal the sequential
    ones, a bad file in the middle gets its error without holding up the rest, and no more than a small window
    of inputs is read ahead of the results (so memory does not grow with the folder)."""
    from runtime.io.inputs import ImageInput

    items = [ImageInput(str(p)) for p in images_100x[:10]]
    items.insert(4, ImageInput("bad.png", data=b"\x89PNG\r\n\x1a\n not really"))
    pulled = []

    def stream():
        for it in items:
            pulled.append(it.name)
            yield it

    with Classifier(model_dir, backend="cpu", decode_workers=1) as seq:
        want = seq.classify(items)
    with Classifier(model_dir, backend="cpu", decode_workers=3) as par:
        got = []
        for r in par.classify_iter(stream()):
            got.append(r)
            assert len(pulled) - len(got) <= 2 * 3 + 2 * par.batch_size  # read ahead + the batch, never the folder
    assert [r.path for r in got] == [it.name for it in items]
    assert "bad.png" in got[4].error and all(r.error is None for i, r in enumerate(got) if i != 4)
    assert [r.probability for r in got] == [r.probability for r in want]


_PIPELINE_RSS = """
import itertools, sys, time
from pathlib import Path
import numpy as np
from runtime.pipeline.classifier import Classifier

def peak_mb():
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(x for x in status if x.startswith("VmHWM")).split()[1]) / 1024

model, n, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
with Classifier(model, backend="cpu", decode_workers=4, batch_size=4) as c:
    def run(f):  # slower than decoding, as real inference is: unconsumed images would pile up without the bound
        time.sleep(0.04)
        return {"logit": np.zeros(len(f), np.float32), "probability": np.full(len(f), .25, np.float32)}

    c.backend.run = run
    before, done, grown = peak_mb(), 0, []
    for i, r in enumerate(c.classify_iter(itertools.islice(itertools.cycle(paths), n)), 1):
        done += r.error is None
        if i in (100, n):  # the peak after the first 100 inputs, and after all of them
            grown.append(peak_mb() - before)
print(done, *grown)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_pipeline_peak_rss_does_not_grow_with_the_number_of_inputs(model_dir, images_100x):
    """Stated bound (docs/performance.md, "The folder pipeline"): the pipeline holds the images read ahead (2 per decode
    worker plus a batch) and the batch in progress, whatever the folder size. A fresh process streams 1,000 inputs
    through ``classify_iter``; the growth of its peak RSS after the model is loaded stays under that bound after 100
    and after 1,000 (measured 48-62 MB, with either count, against 75; unbounded, 100 inputs alone would hold
    140 MB of pixels). Inference is replaced by a constant answer after a 40 ms wait per batch (slower than the
    decoders, as real inference is, so that decoded images would pile up if nothing bounded them): only the pipeline
    is under test, and 1,000 VGG16 passes would take minutes. One process, its peak read after the first 100 inputs
    and after all 1,000 (a peak only grows, and by the 100th result more inputs are read ahead than a 100-input run
    would ever hold: the first reading is at least what such a run would report)."""
    import subprocess

    workers, batch, image_mb, field_mb = 4, 4, 700 * 460 * 3 / 2**20, 6 * 3 * 224 * 224 * 4 / 2**20
    # x2: the bytes read and the pixels; 32 MB: the decode threads' allocator arenas and the codecs' buffers (the
    # narrow test model loads with no peak of its own for these to hide under)
    bound = (2 * workers + 2 * batch) * image_mb * 2 + batch * field_mb + 32
    proc = subprocess.run([sys.executable, "-c", _PIPELINE_RSS, str(model_dir), "1000", *map(str, images_100x)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    done, after_100, after_1000 = proc.stdout.split()
    assert int(done) == 1000 and float(after_100) < bound and float(after_1000) < bound, (after_100, after_1000, bound)


def test_onnxruntime_cuda_that_falls_back_to_the_cpu_is_refused_not_named_cuda(model_dir, monkeypatch):
    """ONNX Runtime builds a CPU-only session when the CUDA provider cannot start (here: it is not even built in,
    the same silent fallback). The backend must not then call itself onnxruntime-cuda."""
    from runtime.backends import ort
    from runtime.backends.base import BackendUnavailable
    from runtime.backends.choose import open_backend
    from runtime.model.model_dir import ModelDir

    if ort.cuda_available():
        pytest.skip("this onnxruntime has a CUDA provider: the fallback cannot be reproduced here")
    model = ModelDir.open(model_dir)
    with pytest.raises(ort.CudaDidNotStart, match="CUDA execution provider did not start.*only CPUExecutionProvider"):
        ort.OrtBackend(model, "fp32", cuda=True)
    monkeypatch.setattr(ort, "cuda_available", lambda: True)  # listed, as onnxruntime-gpu lists it without CUDA libs
    with pytest.raises(BackendUnavailable, match="backend onnxruntime-cuda: the CUDA execution provider did not"):
        open_backend("onnxruntime-cuda", model)
    backend, notes = open_backend("auto", model, precision="fp32")
    try:
        assert backend.name == "onnxruntime-cpu-fp32" and not backend.on_gpu
        assert any(n.startswith("onnxruntime-cuda skipped: the CUDA execution provider did not start") for n in notes)
    finally:
        backend.close()


def test_one_session_builder_fp32_keeps_tf32_off_and_fp16_keeps_tensor_cores(model_dir, monkeypatch):
    """The backend and the CUDA benchmark build their sessions through one function, so what is measured is what
    ships; FP32 means FP32 (TF32 off), FP16 keeps cuDNN's default math (use_tf32=0 would select FMA-only kernels)."""
    import onnxruntime

    from benchmarks import ort_cuda
    from runtime.backends import ort

    asked = []
    real = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession",  # records what a session was asked for, then makes it
                        lambda path, so=None, providers=None: asked.append(providers) or real(path, so))
    ort.make_session(model_dir / "model.fp16.onnx", "fp16", cuda=True)
    ort.make_session(model_dir / "model.onnx", "fp32", cuda=True)
    assert asked == [[("CUDAExecutionProvider", {}), "CPUExecutionProvider"],
                     [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]]

    class Built(Exception):
        pass

    def builder(*args, **kw):
        asked.append((args, kw))
        raise Built

    monkeypatch.setattr(ort, "make_session", builder)  # the benchmark's sessions come from the same builder
    with pytest.raises(Built):
        ort_cuda.time_config(model_dir / "model.fp16.onnx", "fp16", {"nhwc": True}, 1, (6, 3, 224, 224), 1)
    assert asked[-1] == ((model_dir / "model.fp16.onnx", "fp16"), {"cuda": True, "nhwc": True})
    assert ort_cuda.CONFIGS["runtime-fp16"] == ("fp16", {}) and ort_cuda.CONFIGS["runtime-fp32"] == ("fp32", {})
    assert ort.cuda_options("fp16", nhwc=True, graphs=True) == {"prefer_nhwc": "1", "enable_cuda_graph": "1"}
    assert ort.cuda_options("fp32", graphs=True) == {"use_tf32": "0", "enable_cuda_graph": "1"}


def test_nhwc_is_preferred_only_where_its_gate_passed_on_a_gpu(model_dir, tmp_path):
    """ONNX Runtime CUDA's NHWC layout is taken on the model directory's word only where `export verify --layout
    nhwc` recorded a pass for that precision: a failed, absent or unreadable record keeps NCHW."""
    import shutil

    from runtime.backends.base import BackendUnavailable
    from runtime.backends.choose import open_backend
    from runtime.model.model_dir import REPORT_NAME, ModelDir

    shutil.copytree(model_dir, tmp_path / "m")
    model = ModelDir.open(tmp_path / "m")
    assert not model.layout_passed("fp16", "nhwc")
    model.record_layout("fp16", "nhwc", False, {"fields": 48, "label_agreement": 0.98})
    assert not model.layout_passed("fp16", "nhwc")
    model.record_layout("fp16", "nhwc", True, {"fields": 48, "label_agreement": 1.0})
    assert model.layout_passed("fp16", "nhwc") and not model.layout_passed("fp32", "nhwc")
    assert model.report()["layouts"]["fp16"]["nhwc"] == {"passed": True, "fields": 48, "label_agreement": 1.0}
    assert "gates" in model.report()  # the export's own record is kept beside it
    (tmp_path / "m" / REPORT_NAME).write_text("[1, 2")
    assert not model.layout_passed("fp16", "nhwc")
    with pytest.raises(BackendUnavailable, match="unknown layout 'nchwc'; choose one of auto, nchw, nhwc"):
        open_backend("cpu", model, layout="nchwc")


def test_one_precision_table_drives_the_choices_the_refusals_and_the_build_plans(model_dir):
    """CLI choices, which backend runs what, TensorRT's precisions and the tolerances all come from one table."""
    from runtime.backends.base import BackendUnavailable
    from runtime.backends.choose import BACKENDS, open_backend
    from runtime.model.model_dir import ModelDir
    from runtime.model.precisions import CHOICES, ENGINE_PRECISIONS, PRECISIONS

    assert CHOICES == ("auto", *PRECISIONS)
    assert "{" + ",".join(CHOICES) + "}" in run_module("runtime.classify", "--help").stdout.replace("\n", "")
    assert ENGINE_PRECISIONS == ("fp32", "fp16", "int8")  # bf16 is OpenVINO's alone
    model = ModelDir.open(model_dir)
    for row in PRECISIONS.values():  # triton runs what its server serves (runtime/backends/triton.py)
        for name in set(BACKENDS) - {"auto", "triton", *row.backends}:
            with pytest.raises(BackendUnavailable, match=f"backend {name} has no {row.name} tier: it runs"):
                open_backend(name, model, precision=row.name)
    with pytest.raises(BackendUnavailable, match="backend triton needs a server: --triton-url"):
        open_backend("triton", model)


def test_with_two_slots_the_next_batch_is_staged_while_the_current_one_runs(model_dir, images_100x):
    """The overlap the GPU paths rely on, proved by event order: the stand-in's run of batch k lasts until batch
    k+1's staging has begun (a serial scheduler would never begin it, and the order below would fail), a slot is
    staged again only after its previous run ended, and the answers equal those of the in-series run."""
    import threading

    from runtime.backends import ort
    from runtime.model.model_dir import ModelDir
    from runtime.pipeline.decoding import prepare
    from runtime.pipeline.preprocessors import CpuPreprocessor
    from runtime.pipeline.scheduler import FieldScheduler

    model = ModelDir.open(model_dir)
    backend = ort.OrtBackend(model, "fp32")
    n_batches = 5  # one 700x460 image is one field: batch size 1, one image a batch
    events: list[tuple[str, int]] = []
    began = [threading.Event() for _ in range(n_batches)]

    class SlowStandIn(CpuPreprocessor):  # the real preprocessing and backend; the run is the slow stand-in
        staged = ran = 0

        def stage(self, images, plans, n, slot):
            k, self.staged = self.staged, self.staged + 1
            events.append(("stage", k))
            began[k].set()
            super().stage(images, plans, n, slot)

        def run(self, n, slot):
            k, self.ran = self.ran, self.ran + 1
            if k + 1 < n_batches:
                assert began[k + 1].wait(timeout=10), f"batch {k + 1} was not staged while batch {k} ran"
            out = super().run(n, slot)
            events.append(("run-end", k))
            return out

    def results(preprocessor):
        items = [prepare(str(p), model.contract, 64_000_000) for p in images_100x[:n_batches]]
        return list(FieldScheduler(preprocessor, 1, model.contract, "the stand-in").run(items))

    try:
        overlapped = results(SlowStandIn(backend, model.contract, 1, slots=2))
        serial = results(CpuPreprocessor(backend, model.contract, 1))
    finally:
        backend.close()
    for k in range(1, n_batches):
        assert events.index(("stage", k)) < events.index(("run-end", k - 1))  # staged while the previous one ran
    for k in range(2, n_batches):
        assert events.index(("stage", k)) > events.index(("run-end", k - 2))  # its slot was free again
    assert [r.path for r in overlapped] == [str(p) for p in images_100x[:n_batches]]
    assert [r.probability for r in overlapped] == [r.probability for r in serial]
    assert all(r.error is None and r.timings_ms["inference"] > 0 for r in overlapped)


def test_decode_workers_write_into_the_preprocessors_buffers_and_each_comes_back_when_its_image_is_done(
        model_dir, images_100x, tmp_path):
    """The GPU paths' page-locked pool, with ordinary memory as its allocator (the one boundary here): the
    classifier's own decodes land in pool buffers (PNG and JPEG), each is given back once its image's result is out
    and is reused by the next image, answers are the plain run's; inputs prepared by a caller (the server) keep
    their own memory and are never handed out again."""
    import cv2

    from runtime.gpu.pinned import HostPool
    from runtime.pipeline.preprocessors import CpuPreprocessor

    pool = HostPool(lambda n: np.empty(n, np.uint8), cap=64 << 20)
    seen: list[np.ndarray] = []

    class Pooled(CpuPreprocessor):  # the CPU path with the GPU paths' buffer methods
        def host_buffer(self, shape):
            return pool.take(shape)

        def stage(self, images, plans, n, slot):
            seen.extend((i.ctypes.data, pool.owns(i) and i.ctypes.data not in pool.idle) for i in images)  # in use
            super().stage(images, plans, n, slot)

        def release(self, image):
            pool.give(image)

    jpg = tmp_path / "field.jpg"
    cv2.imwrite(str(jpg), cv2.imread(str(images_100x[0])), [cv2.IMWRITE_JPEG_QUALITY, 95])
    inputs = [*map(str, images_100x[:6]), str(jpg)]
    with Classifier(model_dir, backend="cpu", decode_workers=2) as plain:
        want = [r.probability for r in plain.classify(inputs)]
        clf = plain
        clf.preprocessor = Pooled(clf.backend, clf.contract, clf.batch_size)
        clf.scheduler.preprocessor = clf.preprocessor
        got = [r.probability for r in clf.classify(inputs)]
        assert got == want and len(seen) == len(inputs) and all(in_use for _, in_use in seen)
        assert len({address for address, _ in seen}) < len(inputs)  # buffers came back and were reused
        assert len(pool.idle) == sum(len(v) for v in pool.free.values()) > 0  # all given back, none twice
        outside = clf.prepare(inputs[0])  # as the server prepares a request: its pixels stay its own
        assert not pool.owns(outside.bgr)
        assert clf.classify([outside])[0].probability == want[0] and not seen[-1][1]


def test_host_pool_reuses_gives_once_and_caps():
    from runtime.gpu.pinned import HostPool

    pool = HostPool(lambda n: np.empty(n, np.uint8), cap=3000)
    a = pool.take((10, 10, 3))
    assert a.shape == (10, 10, 3) and pool.owns(a) and not pool.owns(a[1:]) and not pool.owns(np.empty(300, np.uint8))
    pool.give(a)
    pool.give(a)  # a second give is ignored: the buffer is handed out once
    b, c = pool.take((300,)), pool.take((300,))
    assert b.ctypes.data == a.ctypes.data and c.ctypes.data != a.ctypes.data
    assert pool.take((3000,)) is None  # over the cap: the caller decodes into ordinary memory
    del c
    import gc

    gc.collect()
    assert pool.held == 300  # a buffer never given back is freed with it, and no longer counted


def test_gpu_jpeg_decoding_is_chosen_only_next_to_gpu_preprocessing(model_dir):
    """--decode: auto keeps JPEGs on the CPU next to CPU preprocessing, silently; gpu there is refused with the
    reason; an unknown choice is an error."""
    from runtime.gpu.jpeg import GpuDecodeUnavailable
    from runtime.pipeline.decoding import open_gpu_jpeg

    notes: list[str] = []
    assert open_gpu_jpeg("auto", "cpu", notes) is None and open_gpu_jpeg("cpu", "gpu", notes) is None
    assert notes == []
    with pytest.raises(GpuDecodeUnavailable, match="decode gpu needs GPU preprocessing"):
        Classifier(model_dir, backend="cpu", decode="gpu")
    with pytest.raises(ValueError, match="decode must be one of auto, cpu, gpu"):
        open_gpu_jpeg("nvjpeg", "gpu", notes)
    proc = run_module("runtime.classify", "--backend", "cpu", "--decode", "gpu", "x.png")
    assert proc.returncode != 0 and "decode gpu needs GPU preprocessing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_gpu_jpeg_decoders_self_check_refuses_a_decoder_that_decodes_damaged_jpegs(capfd):
    """nvImageCodec's own CPU backend (libjpeg-turbo inside it) decodes a JPEG with two thirds of its scan zeroed
    without an error: the self-check that stands before GPU decoding refuses it, says why, and prints nothing."""
    nvimgcodec = pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec is an optional extra (gpu-decode)")
    from runtime.gpu.jpeg import GpuDecodeUnavailable, GpuJpegDecoder

    capfd.readouterr()
    with pytest.raises(GpuDecodeUnavailable, match="decodes a corrupt JPEG without an error"):
        GpuJpegDecoder(device=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, backends=("CPU_ONLY",))
    assert capfd.readouterr().err == ""
