"""CPU tiling + normalisation against the original path: patchify on the RGB image, then Keras preprocess_input."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from export.model import CONTRACT
from runtime.model.geometry import TilingError, plan_fields, plan_image
from runtime.model.manifest import Contract
from runtime.model.preprocess import preprocess_fields


def seed_path(rgb: np.ndarray) -> np.ndarray:
    """The original system, with the real packages: patchify (step 224) -> Keras vgg16.preprocess_input per patch
    -> (T, 3, 224, 224) in row-major patch order."""
    patchify = pytest.importorskip("patchify").patchify
    keras_vgg16 = pytest.importorskip("keras.applications.vgg16")
    patches = patchify(rgb, (224, 224, 3), step=224)  # (rows, cols, 1, 224, 224, 3)
    rows, cols = patches.shape[:2]
    out = [keras_vgg16.preprocess_input(patches[r, c, 0].astype(np.float32)) for r in range(rows) for c in range(cols)]
    return np.stack(out).transpose(0, 3, 1, 2)


def test_contract_derived_sizes():
    assert CONTRACT.seq_len == 6
    assert CONTRACT.field_size == (448, 672)


@pytest.mark.parametrize("name", ["SOB_B_A-14-22549AB-100-006.png", "SOB_M_PC-14-12465-100-010.png"])
def test_bit_exact_against_patchify_and_keras(shared_data, name):
    bgr = cv2.imread(str(shared_data / "breakhis-100x" / name), cv2.IMREAD_COLOR)
    plan = plan_image(bgr, CONTRACT)
    ours = preprocess_fields(bgr, plan, CONTRACT)
    ref = seed_path(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    assert ours.shape == (1, 6, 3, 224, 224) and ours.dtype == np.float32
    assert ref.dtype == np.float32
    np.testing.assert_array_equal(ours[0], ref)


def test_700x460_drops_right_28_and_bottom_12():
    img = np.zeros((460, 700, 3), np.uint8)
    img[448:, :] = 255  # bottom 12 rows
    img[:, 672:] = 255  # right 28 columns
    out = preprocess_fields(img, plan_fields(460, 700, CONTRACT), CONTRACT)
    assert np.all(out == -np.asarray(CONTRACT.mean, np.float32)[None, None, :, None, None])


def test_patch_order_is_row_major_and_channels_bgr():
    img = np.zeros((448, 672, 3), np.uint8)
    for k in range(6):  # mark each patch with its index in the blue channel (BGR image)
        r, c = divmod(k, 3)
        img[r * 224:(r + 1) * 224, c * 224:(c + 1) * 224, 0] = 10 * (k + 1)
    out = preprocess_fields(img, plan_fields(448, 672, CONTRACT), CONTRACT)
    for k in range(6):
        assert np.all(out[0, k, 0] == np.float32(10 * (k + 1)) - np.float32(CONTRACT.mean[0]))
        assert np.all(out[0, k, 1] == -np.float32(CONTRACT.mean[1]))


def test_many_fields_match_per_field_reference(shared_data):
    bgr = cv2.imread(str(shared_data / "breakhis-100x" / "SOB_M_DC-14-10926-100-003.png"))
    big = np.concatenate([np.concatenate([bgr, bgr[:, ::-1]], 1), np.concatenate([bgr[::-1], bgr], 1)], 0)
    plan = plan_image(big, CONTRACT)  # 1400x920 -> 2x2 fields
    assert plan.grid == (2, 2)
    out = preprocess_fields(big, plan, CONTRACT)
    for f, (y, x) in enumerate(plan.field_origins):
        crop = big[y:y + 448, x:x + 672]
        np.testing.assert_array_equal(out[f], seed_path(cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_BGR2RGB)))


def test_rgb_contract_and_scale():
    rgb_contract = Contract(patch=4, stride=4, grid=(1, 2), channel_order="RGB", mean=(1.0, 2.0, 3.0),
                            scale=(0.5, 0.25, 2.0), threshold=0.5, labels=("a", "b"))
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (5, 9, 3), dtype=np.uint8)
    out = preprocess_fields(bgr, plan_fields(5, 9, rgb_contract), rgb_contract)
    rgb = bgr[:4, :8, ::-1].astype(np.float32)
    want = (rgb - np.float32([1, 2, 3])) * np.float32([0.5, 0.25, 2.0])
    np.testing.assert_array_equal(out[0, 0], want[:, :4].transpose(2, 0, 1))
    np.testing.assert_array_equal(out[0, 1], want[:, 4:].transpose(2, 0, 1))


def test_too_small_names_the_size_needed():
    with pytest.raises(TilingError, match=r"600x400.*at least 672x448"):
        plan_fields(400, 600, CONTRACT)
