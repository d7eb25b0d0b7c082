"""The CUDA preprocessing kernel without a GPU: nvcc builds a host harness that runs the kernel's per-thread code
for every thread index; its output must equal the numpy CPU path (FP32 bit-exact, FP16 = numpy's rounding)."""
from __future__ import annotations

import ctypes
import shutil

import cv2
import numpy as np
import pytest

from export.model import CONTRACT
from runtime.gpu import abi
from runtime.gpu.build import build_cubin, build_harness
from runtime.model.geometry import plan_fields
from runtime.model.manifest import Contract
from runtime.model.preprocess import preprocess_image

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")


@pytest.fixture(scope="module")
def harness():
    lib = ctypes.CDLL(str(build_harness()))
    lib.bhx_host_preprocess.argtypes = [ctypes.c_void_p] * 4
    lib.bhx_thread_count.argtypes = [ctypes.c_void_p]
    lib.bhx_thread_count.restype = ctypes.c_longlong
    return lib


def run_kernel(lib, sources, contract=CONTRACT, fp16=False, batch=None, field0=0):
    """sources: list of (uint8 buffer of one image incl. any row padding, SourceImage). Returns the dst tensor."""
    images = [im for _, im in sources]
    offsets, total = abi.layout(images)
    buf = np.zeros(total, np.uint8)
    for (data, _), off in zip(sources, offsets):
        buf[off:off + data.size] = data
    plans = [plan_fields(im.height, im.width, contract) for im in images]
    jobs = abi.job_table(images, offsets, plans)
    p = abi.params(contract, len(jobs), fp16, field0)
    n = batch or field0 + len(jobs)
    dst = np.full((n, contract.seq_len, 3, contract.patch, contract.patch), 7, np.float16 if fp16 else np.float32)
    assert lib.bhx_thread_count(p.ctypes.data) == abi.thread_count(contract, len(jobs))
    lib.bhx_host_preprocess(buf.ctypes.data, jobs.ctypes.data, p.ctypes.data, dst.ctypes.data)
    return dst


def source(bgr, channels=3, bgr_order=True, pad=0):
    """A (buffer, SourceImage) for a BGR image, re-laid-out as RGB/RGBA and/or with `pad` bytes after each row."""
    img = bgr if bgr_order else bgr[:, :, ::-1]
    if channels == 4:
        img = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    h, w, c = img.shape
    rows = np.zeros((h, w * c + pad), np.uint8)
    rows[:, : w * c] = img.reshape(h, -1)
    im = abi.SourceImage(h, w, c, bgr_order, w * c + pad)
    return rows.reshape(-1)[: im.nbytes], im


def reference(bgrs, contract=CONTRACT):
    return np.concatenate([preprocess_image(b, contract) for b in bgrs])


def assert_matches(got, want, fp16):
    if fp16:
        np.testing.assert_array_equal(got.view(np.uint16), want.astype(np.float16).view(np.uint16))
    else:
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # bit for bit


@pytest.fixture(scope="module")
def real(images_100x):
    return cv2.imread(str(images_100x[0])), cv2.imread(str(next(p for p in images_100x if "12465" in p.name)))


def test_struct_sizes_match_numpy(harness):
    assert harness.bhx_sizeof_fieldjob() == abi.FIELDJOB.itemsize == 32
    assert harness.bhx_sizeof_params() == abi.PARAMS.itemsize


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_real_700x460_and_700x456(harness, real, fp16):
    a, b = real
    assert b.shape[:2] == (456, 700)
    got = run_kernel(harness, [source(a), source(b)], fp16=fp16)
    assert_matches(got, reference([a, b]), fp16)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_rgba_rgb_order_and_odd_pitch(harness, real, fp16):
    a, b = real
    srcs = [source(a, channels=4), source(b, bgr_order=False), source(a, pad=5), source(b, channels=4, pad=3,
                                                                                         bgr_order=False)]
    got = run_kernel(harness, srcs, fp16=fp16)
    assert_matches(got, reference([a, b, a, b]), fp16)


def test_images_of_different_sizes_and_many_fields_in_one_launch(harness, real):
    a, _ = real
    big = cv2.resize(a, (2100, 1400))  # 3x3 fields of 672x448
    mid = np.ascontiguousarray(np.tile(a, (2, 1, 1))[:, :690])  # 690x920 -> 2x1 fields
    got = run_kernel(harness, [source(big), source(a), source(mid, pad=1)], fp16=False)
    assert len(got) == 9 + 1 + 2
    assert_matches(got, reference([big, a, mid]), False)


def test_writes_only_its_slots_at_a_batch_offset(harness, real):
    a, _ = real
    got = run_kernel(harness, [source(a)], batch=4, field0=2)
    assert np.all(got[:2] == 7) and np.all(got[3:] == 7)
    assert_matches(got[2:3], reference([a]), False)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_other_contracts_scalar_path(harness, fp16):
    """Patch not a multiple of 8 (scalar stores), overlapping stride, RGB model order, per-channel scale."""
    c = Contract(patch=20, stride=15, grid=(2, 2), channel_order="RGB", mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
                 scale=(1 / 58.395, 1 / 57.12, 1 / 57.375), threshold=0.5, labels=("n", "p"))
    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 256, (37, 41, 3), dtype=np.uint8), rng.integers(0, 256, (90, 35, 3), dtype=np.uint8)]
    got = run_kernel(harness, [source(imgs[0], pad=7), source(imgs[1], channels=4, bgr_order=False)], c, fp16)
    assert_matches(got, reference(imgs, c), fp16)


@pytest.mark.parametrize("arch", ["sm_75", "sm_87", "sm_90"])
def test_kernel_compiles_for_supported_gpus(arch):
    """sm_87 = Jetson Orin (JetPack 6), sm_90 = H100; sm_75 is CUDA 13's oldest target (Xavier's sm_72 needs the
    CUDA 11.4 of JetPack 5, which compiles the same C++14 source at first use)."""
    cubin = build_cubin(arch)
    assert cubin.stat().st_size > 1000 and b"bhx_preprocess" in cubin.read_bytes()
