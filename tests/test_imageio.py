"""Decoding: formats, explicit colour conversions, and every kind of bad file named with its reason."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from runtime.imageio import ImageError, _header_size, decode, read_image


@pytest.fixture(scope="module")
def sample(shared_data):
    return shared_data / "breakhis-100x" / "SOB_M_DC-14-10926-100-003.png"


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif", ".bmp"])
def test_formats_decode_and_header_size_agrees(tmp_path, ext):
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    path = tmp_path / f"x{ext}"
    assert cv2.imwrite(str(path), img)
    assert _header_size(path.read_bytes()) == (70, 50)
    dec = read_image(path)
    assert dec.bgr.shape == (50, 70, 3) and dec.bgr.dtype == np.uint8 and dec.conversions == []
    if ext != ".jpg":
        np.testing.assert_array_equal(dec.bgr, img)


def test_png_matches_opencv_color_read(sample):
    np.testing.assert_array_equal(read_image(sample).bgr, cv2.imread(str(sample), cv2.IMREAD_COLOR))


def test_grayscale_is_converted_and_reported(tmp_path, sample):
    gray = cv2.imread(str(sample), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    dec = read_image(tmp_path / "g.png")
    assert dec.conversions == ["grayscale -> BGR (channel replicated)"]
    assert np.array_equal(dec.bgr[:, :, 0], gray) and np.array_equal(dec.bgr[:, :, 2], gray)


def test_rgba_drops_alpha_and_reports(tmp_path, sample):
    bgr = cv2.imread(str(sample))
    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    bgra[0, 0, 3] = 0
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    dec = read_image(tmp_path / "a.png")
    assert dec.conversions and "alpha dropped" in dec.conversions[0] and "transparent" in dec.conversions[0]
    np.testing.assert_array_equal(dec.bgr, bgr)


def test_16bit_is_scaled_and_reported(tmp_path, sample):
    bgr = cv2.imread(str(sample))
    cv2.imwrite(str(tmp_path / "w.png"), bgr.astype(np.uint16) * 257)
    dec = read_image(tmp_path / "w.png")
    assert dec.conversions == ["16-bit -> 8-bit (value / 257, rounded)"]
    np.testing.assert_array_equal(dec.bgr, bgr)


def _png_header_only(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"this is not an image, just text\n", "not a PNG, JPEG, TIFF or BMP"),
    (_png_header_only(100_000, 100_000), "10,000,000,000 pixels is above the limit"),
])
def test_bad_bytes_give_named_reasons(tmp_path, data, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=reason) as e:
        read_image(path)
    assert str(path) in str(e.value)


def test_truncated_png(tmp_path, sample):
    data = sample.read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        read_image(tmp_path / "t.png")


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a directory"):
        read_image(tmp_path)


def test_pixel_limit_is_configurable(sample):
    with pytest.raises(ImageError, match="700x460 = 322,000 pixels is above the limit of 1,000"):
        decode(sample.read_bytes(), "x.png", max_pixels=1000)
