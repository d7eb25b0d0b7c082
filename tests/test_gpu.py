"""The kernel on a real GPU through pycuda against the CPU path, on the real images. Skips without pycuda/a GPU."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from export.model import CONTRACT
from runtime.model.geometry import plan_image
from runtime.model.preprocess import preprocess_image
from tests.test_kernels import assert_matches  # same FP32 bit-exact / FP16 rounding rule


@pytest.fixture(scope="session")
def gpu_ok():
    """Skips (before any costly fixture) where pycuda or a CUDA device is missing."""
    from runtime.gpu.context import GpuUnavailable
    from runtime.gpu.context import import_pycuda as _import_pycuda

    try:
        _import_pycuda()
    except GpuUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module", params=[False, True], ids=["fp32", "fp16"])
def gpu(gpu_ok, request):
    from runtime.gpu.preprocessor import GpuPreprocessor

    g = GpuPreprocessor(CONTRACT, fp16=request.param)
    yield g
    g.close()


def _cpu(img):
    return preprocess_image(img, CONTRACT)


def test_every_real_image_matches_cpu(gpu, images_100x):
    for p in images_100x:
        img = cv2.imread(str(p))
        assert_matches(gpu.to_host([img], [plan_image(img, CONTRACT)]), _cpu(img), gpu.fp16)


def test_one_launch_many_images_rgba_and_large(gpu, images_100x):
    imgs = [cv2.imread(str(p)) for p in images_100x[:8]]
    imgs.append(cv2.resize(imgs[0], (2100, 1400)))
    srcs = imgs[:-2] + [cv2.cvtColor(imgs[-2], cv2.COLOR_BGR2BGRA), imgs[-1]]
    got = gpu.to_host(srcs, [plan_image(i, CONTRACT) for i in srcs])
    assert_matches(got, np.concatenate([_cpu(i) for i in imgs]), gpu.fp16)


def test_classifier_gpu_preprocess_gives_cpu_answers(gpu_ok, model_dir, images_100x):
    from runtime.pipeline.classifier import Classifier

    with Classifier(model_dir, backend="cpu", preprocess="gpu") as g, \
            Classifier(model_dir, backend="cpu", preprocess="cpu") as c:
        a = [r.probability for r in g.classify(images_100x[:4])]
        b = [r.probability for r in c.classify(images_100x[:4])]
    assert a == b


@pytest.fixture(scope="module")
def ort_cuda(gpu_ok):
    from runtime.backends import ort

    if not ort.cuda_available():
        pytest.skip("needs onnxruntime-gpu (this onnxruntime offers " + ", ".join(ort.providers()) + ")")
    return ort


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graphs_replay_fixed_bindings_and_pad_partial_batches(ort_cuda, model_dir, images_100x, precision):
    """Graphs captured for batch 1 and 8 on both device inputs: a lone field, a partial batch of 5 (padded to 8)
    and a full one give the uncaptured session's outputs on the same fields, replayed more than once."""
    from runtime.gpu.preprocessor import GpuPreprocessor
    from runtime.model.model_dir import ModelDir

    model = ModelDir.open(model_dir)
    imgs = [cv2.imread(str(p)) for p in images_100x[:8]]
    plans = [plan_image(i, CONTRACT) for i in imgs]
    plain = ort_cuda.OrtBackend(model, precision, cuda=True, graphs=False)
    want = plain.run(np.concatenate([_cpu(i) for i in imgs]))["probability"]
    plain.close()
    b = ort_cuda.OrtBackend(model, precision, cuda=True)
    gpu = GpuPreprocessor(CONTRACT, stream=b.stream)
    try:
        assert b.graphs and b.notes == [], b.notes
        assert b.fix_batches((1, 8)) == []  # captured, nothing to say
        for n, slot in [(1, 0), (5, 1), (8, 0), (5, 0), (1, 1), (8, 1)]:
            gpu.submit(imgs[:n], plans[:n], dst=b.input_ptrs[slot], slot=slot)
            got = b.run_device(n, slot)["probability"]
            assert got.shape == (n,) and np.isfinite(got).all()
            np.testing.assert_allclose(got, want[:n], atol=1e-5 if precision == "fp32" else 2e-3)
        assert sorted(b._bound) == [(1, 0), (1, 1), (8, 0), (8, 1)]  # one binding per captured graph, no more
        host = b.run(np.concatenate([_cpu(i) for i in imgs[:3]]))["probability"]  # host input: never captured
        np.testing.assert_allclose(host, want[:3], atol=1e-5 if precision == "fp32" else 2e-3)
    finally:
        gpu.close()
        b.close()


def test_classifier_on_onnxruntime_cuda_gives_cpu_labels(ort_cuda, model_dir, images_100x):
    """The whole GPU path (kernel into the backend's inputs, graphs, two slots) against the CPU reference."""
    from runtime.pipeline.classifier import Classifier

    with Classifier(model_dir, backend="onnxruntime-cuda", precision="fp32", batch_size=8) as g, \
            Classifier(model_dir, backend="cpu", precision="fp32") as c:
        assert g.preprocessor.name == "gpu" and g.backend.graphs
        a, b = g.classify(images_100x), c.classify(images_100x)
    np.testing.assert_allclose([r.probability for r in a], [r.probability for r in b], atol=1e-5)


def test_jpegs_decoded_on_the_gpu_give_the_cpu_labels_and_damaged_ones_are_still_refused(ort_cuda, model_dir,
                                                                                          images_100x, tmp_path):
    """With nvImageCodec (where it passes its damage self-check): every shared image as a JPEG is decoded on the
    GPU into the kernel's input, its pixels within MAX_DIFF of libjpeg's and its label the CPU-decoded one; a
    truncated and a zeroed JPEG in the same folder still get the CPU decoder's damage errors."""
    from runtime.gpu.jpeg import MAX_DIFF, GpuDecodeUnavailable, GpuJpegDecoder
    from runtime.pipeline.classifier import Classifier

    try:
        dec = GpuJpegDecoder()
    except GpuDecodeUnavailable as e:
        pytest.skip(str(e))
    paths = []
    for p in images_100x:
        paths.append(tmp_path / f"{p.stem}.jpg")
        cv2.imwrite(str(paths[-1]), cv2.imread(str(p)), [cv2.IMWRITE_JPEG_QUALITY, 95])
    for p in paths[:8]:
        data = p.read_bytes()
        img = dec.decode_file(data, p.name, 64_000_000)
        assert img is not None
        rgb = np.asarray(img.keep.cpu())
        libjpeg = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        assert np.abs(rgb.astype(int) - libjpeg).max() <= MAX_DIFF
    clean = paths[0].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(clean[:len(clean) // 2])
    inputs = [*paths, tmp_path / "truncated.jpg"]
    with Classifier(model_dir, backend="onnxruntime-cuda", precision="fp32", batch_size=8) as g, \
            Classifier(model_dir, backend="onnxruntime-cuda", precision="fp32", batch_size=8, decode="cpu") as c:
        assert g.gpu_jpeg is not None and c.gpu_jpeg is None
        a, b = g.classify(inputs), c.classify(inputs)
    assert [r.label for r in a[:-1]] == [r.label for r in b[:-1]]
    assert a[-1].error == b[-1].error and "Premature end of JPEG file" in a[-1].error
