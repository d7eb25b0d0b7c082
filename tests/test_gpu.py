"""The kernel on a real GPU through pycuda against the CPU path, on the real images. Skips without pycuda/a GPU."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from export.model import CONTRACT
from runtime.pipeline.preprocess import preprocess_image
from runtime.pipeline.tiling import plan_image
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
