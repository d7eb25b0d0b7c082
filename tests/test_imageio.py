"""Decoding: formats, explicit colour conversions, and every kind of bad file named with its reason."""
from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest

from runtime.io.decode import FLAGS, ImageError, decode, png_significant_bits, probe, read_image, to_bgr8


@pytest.fixture(scope="module")
def sample(shared_data):
    return shared_data / "breakhis-100x" / "SOB_M_DC-14-10926-100-003.png"


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif", ".bmp"])
def test_formats_decode_and_header_size_agrees(tmp_path, ext):
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    path = tmp_path / f"x{ext}"
    assert cv2.imwrite(str(path), img)
    assert probe(path.read_bytes(), str(path)).pages == [(70, 50)]
    dec = read_image(path)
    assert dec.bgr.shape == (50, 70, 3) and dec.bgr.dtype == np.uint8 and dec.conversions == []
    if ext != ".jpg":
        np.testing.assert_array_equal(dec.bgr, img)


def test_png_matches_opencv_color_read_on_every_shared_image(shared_data):
    paths = sorted((shared_data / "breakhis-100x").glob("*.png"))
    assert len(paths) >= 40
    for path in paths:
        np.testing.assert_array_equal(read_image(path).bgr, cv2.imread(str(path), cv2.IMREAD_COLOR), err_msg=path.name)


def _pil_png(mode: str, **save) -> bytes:
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    im = im.quantize(16) if mode == "P" else im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, "PNG", **save)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["RGB", "L", "LA", "RGBA", "P", "P+tRNS", "1", "I;16", "interlaced"])
def test_png_layouts_give_what_opencv_gives(kind):
    """PNG pixels come from libpng through imagecodecs (parallel decoding); every colour type, bit depth and
    interlacing gives OpenCV's pixels and the same reported conversions."""
    if kind == "interlaced":
        data = _pil_png("RGB", optimize=False)
        data = cv2.imencode(".png", cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    else:
        data = _pil_png(kind.split("+")[0], **({"transparency": 3} if kind == "P+tRNS" else {}))
    expected = to_bgr8(cv2.imdecode(np.frombuffer(data, np.uint8), FLAGS), "x", png_significant_bits(data))
    dec = decode(data, "x.png")
    np.testing.assert_array_equal(dec.bgr, expected.bgr)
    assert dec.conversions == expected.conversions and dec.warnings == expected.warnings
    assert bool(dec.warnings) == (kind in ("P+tRNS", "I;16"))  # transparent pixels; 16 bits holding 8-bit values


def test_png_decoder_messages_go_to_their_own_image_and_png_decodes_run_in_parallel(sample, capfd):
    """libpng's warning about a second gAMA chunk belongs to that file's result, while clean PNGs decoded at the
    same time in other threads report nothing, and nothing reaches the console; PNG decodes never wait for the
    stderr lock that serialises OpenCV's decoders (it is held throughout here)."""
    from concurrent.futures import ThreadPoolExecutor

    from runtime.io import decode as imageio

    clean = sample.read_bytes()
    gama = b"gAMA" + struct.pack(">I", 45455)
    odd = clean[:33] + struct.pack(">I", 4) + gama + struct.pack(">I", zlib.crc32(gama)) + clean[33:]
    capfd.readouterr()
    with imageio._STDERR_LOCK, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: decode(odd if i % 4 == 0 else clean, f"f{i}.png"), range(16), timeout=60))
    for i, r in enumerate(results):
        assert r.warnings == (["PNG warning: gAMA: duplicate"] if i % 4 == 0 else []), i
    assert capfd.readouterr().err == ""


def _jpeg(bgr: np.ndarray, **params: int) -> bytes:
    flags = [v for k, x in params.items() for v in (getattr(cv2, f"IMWRITE_JPEG_{k.upper()}"), x)]
    return cv2.imencode(".jpg", bgr, flags)[1].tobytes()


def _zeroed(jpeg: bytes) -> bytes:
    """The last two thirds of the scan data zeroed: libjpeg still decodes it (flat rows) and only warns."""
    data = bytearray(jpeg)
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    cut = start + (len(data) - 2 - start) // 3
    data[cut:-2] = bytes(len(data) - 2 - cut)
    return bytes(data)


def test_jpeg_decodes_in_parallel_with_opencvs_pixels_and_damage_still_refused(shared_data, capfd):
    """JPEGs go through libjpeg-turbo without the stderr lock (held throughout here): every shared image as a
    JPEG (baseline, progressive, grayscale) gives OpenCV's pixels exactly, and a truncated or zeroed one decoded at
    the same time in another thread is refused with libjpeg's own words, nothing reaching the console."""
    from concurrent.futures import ThreadPoolExecutor

    from runtime.io import decode as imageio

    images = [cv2.imread(str(p)) for p in sorted((shared_data / "breakhis-100x").glob("*.png"))]
    files = [_jpeg(b, quality=90) for b in images]
    files += [_jpeg(images[0], progressive=1), _jpeg(cv2.cvtColor(images[1], cv2.COLOR_BGR2GRAY))]
    bad = {"truncated.jpg": files[0][:len(files[0]) // 2], "zeroed.jpg": _zeroed(files[1])}
    capfd.readouterr()
    with imageio._STDERR_LOCK, ThreadPoolExecutor(4) as pool:
        decoded = list(pool.map(lambda d: decode(d, "x.jpg"), files, timeout=120))
        refused = list(pool.map(lambda kv: pytest.raises(ImageError, decode, kv[1], kv[0]), bad.items(),
                                timeout=60))
    for data, dec in zip(files, decoded):
        expected = to_bgr8(cv2.imdecode(np.frombuffer(data, np.uint8), FLAGS), "x")
        np.testing.assert_array_equal(dec.bgr, expected.bgr)
        assert dec.conversions == expected.conversions and dec.warnings == []
    assert "Premature end of JPEG file" in str(refused[0].value) and "truncated.jpg" in str(refused[0].value)
    assert "Corrupt JPEG data" in str(refused[1].value) and "zeroed.jpg" in str(refused[1].value)
    assert capfd.readouterr().err == ""


def test_cmyk_jpeg_takes_opencvs_path(sample):
    """A CMYK JPEG (Adobe's inverted ink, which libjpeg-turbo's decoder here does not undo) is decoded by OpenCV as
    before."""
    from PIL import Image

    buf = io.BytesIO()
    Image.open(sample).convert("CMYK").save(buf, "JPEG", quality=95)
    expected = to_bgr8(cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), FLAGS), "x")
    np.testing.assert_array_equal(decode(buf.getvalue(), "cmyk.jpg").bgr, expected.bgr)


def test_grayscale_is_converted_and_reported(tmp_path, sample):
    gray = cv2.imread(str(sample), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    dec = read_image(tmp_path / "g.png")
    assert dec.conversions == ["grayscale -> BGR (channel replicated)"]
    assert np.array_equal(dec.bgr[:, :, 0], gray) and np.array_equal(dec.bgr[:, :, 2], gray)


def test_rgba_transparent_pixels_are_composited_over_white_and_counted(tmp_path, sample):
    """Transparent pixels show what lies behind them; on a slide that is glass, white (not the black or whatever
    colour the transparent samples happen to hold): composited over white, and a warning says how many there were.
    A fully opaque RGBA image only loses its alpha channel."""
    bgr = cv2.imread(str(sample))
    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    cv2.imwrite(str(tmp_path / "opaque.png"), bgra)
    dec = read_image(tmp_path / "opaque.png")
    assert dec.conversions == ["RGBA -> RGB (alpha dropped, image was fully opaque)"] and dec.warnings == []
    np.testing.assert_array_equal(dec.bgr, bgr)
    bgra[:10, :, 3] = 0  # 10 rows fully transparent
    bgra[10, :5, 3] = 128  # 5 pixels half transparent
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    dec = read_image(tmp_path / "a.png")
    n = 10 * bgr.shape[1]
    assert dec.conversions == [f"RGBA -> RGB ({n + 5} transparent pixels composited over white, as glass)"]
    assert dec.warnings == [(f"{n + 5} of {bgr.shape[0] * bgr.shape[1]} pixels were transparent ({n} fully, 5 "
                             "partly): composited over white (glass); a microscope capture has no transparency, so "
                             "check how this image was made")]
    assert (dec.bgr[:10] == 255).all()
    half = (bgr[10, :5].astype(np.uint32) * 128 + 255 * 127 + 127) // 255
    np.testing.assert_array_equal(dec.bgr[10, :5], half)
    np.testing.assert_array_equal(dec.bgr[11:], bgr[11:])
    la = cv2.cvtColor(bgra, cv2.COLOR_BGRA2GRAY)  # grey + alpha (PNG colour type 4), through PIL
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.dstack([la, bgra[:, :, 3]]), "LA").save(buf, "PNG")
    dec = decode(buf.getvalue(), "la.png")
    assert (dec.bgr[:10] == 255).all() and f"{n + 5} of" in dec.warnings[0]


def test_16bit_is_scaled_and_reported(tmp_path, sample):
    bgr = cv2.imread(str(sample))
    cv2.imwrite(str(tmp_path / "w.png"), bgr.astype(np.uint16) * 257)
    dec = read_image(tmp_path / "w.png")
    assert dec.conversions == ["16-bit -> 8-bit (value / 257, rounded)"]
    np.testing.assert_array_equal(dec.bgr, bgr)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _with_sbit(png: bytes, *bits: int) -> bytes:
    """The PNG with an sBIT chunk right after its header (where the standard puts it: before PLTE and IDAT)."""
    return png[:33] + _chunk(b"sBIT", bytes(bits)) + png[33:]


def test_16bit_png_of_12bit_data_is_scaled_by_its_sbit_or_its_used_range(sample):
    """12-bit samples stored as they are in a 16-bit PNG (what many cameras write) came out 16 times too dark
    (value / 257). With an sBIT chunk of 12 they are scaled by 255 / 4095, said in the conversion; without one, the
    same where every sample fits in 12 bits, with a warning that this was assumed; samples scaled up to 16 bits as
    the PNG standard asks (sBIT 12, values beyond 4095) stay value / 257. Each gives the original image's pixels."""
    bgr = cv2.imread(str(sample))
    twelve = (bgr.astype(np.uint32) * 4095 + 127) // 255  # the 8-bit image as 12-bit data, unscaled
    raw = cv2.imencode(".png", twelve.astype(np.uint16))[1].tobytes()
    assert png_significant_bits(raw) == (None, None) and png_significant_bits(_with_sbit(raw, 12, 12, 12)) == (12, None)
    dec = decode(_with_sbit(raw, 12, 12, 12), "camera.png")
    assert dec.conversions == [("16-bit -> 8-bit (12-bit data: value x 255 / 4095, rounded; its sBIT chunk says 12 "
                                "significant bits, stored unscaled)")] and dec.warnings == []
    assert np.abs(dec.bgr.astype(int) - bgr).max() <= 1 and abs(dec.bgr.mean() - bgr.mean()) < 0.5
    guessed = decode(raw, "camera.png")
    np.testing.assert_array_equal(guessed.bgr, dec.bgr)
    assert len(guessed.warnings) == 1 and "without an sBIT chunk" in guessed.warnings[0]
    assert "all fit in 12 bits" in guessed.warnings[0] and "16 times darker" in guessed.warnings[0]
    scaled = (twelve << 4) | (twelve >> 8)  # the standard's way: scaled up to 16 bits by bit replication
    dec = decode(_with_sbit(cv2.imencode(".png", scaled.astype(np.uint16))[1].tobytes(), 12, 12, 12), "std.png")
    assert dec.conversions == ["16-bit -> 8-bit (value / 257, rounded)"] and dec.warnings == []
    assert np.abs(dec.bgr.astype(int) - bgr).max() <= 1


def _png_bomb(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"this is not an image, just text\n", "not a PNG, JPEG, TIFF or BMP"),
    (_png_bomb(100_000, 100_000), "10,000,000,000 pixels is above the limit"),
])
def test_bad_bytes_give_named_reasons(tmp_path, data, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=reason) as e:
        read_image(path)
    assert str(path) in str(e.value) and "object at 0x" not in str(e.value)  # words, never a Python repr


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


def test_corrupted_jpeg_that_still_decodes_is_refused_and_stderr_stays_clean(tmp_path, sample, capfd):
    """Two thirds of the scan data zeroed: libjpeg decodes it (flat grey rows) and only complains on stderr. The
    complaint belongs to that file: it becomes the file's error, and nothing unattributed reaches the console."""
    data = _zeroed(_jpeg(cv2.imread(str(sample)), quality=90))
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None  # it does decode
    capfd.readouterr()
    (tmp_path / "zeroed.jpg").write_bytes(data)
    with pytest.raises(ImageError, match="Corrupt JPEG data") as e:
        read_image(tmp_path / "zeroed.jpg")
    assert "zeroed.jpg" in str(e.value)
    assert capfd.readouterr().err == ""
    assert read_image(sample).warnings == []  # a clean file has nothing to report


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_viewers_do_and_reported(fmt, orientation):
    from PIL import Image, ImageOps

    rgb = np.random.default_rng(orientation).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(buf, fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
    dec = decode(buf.getvalue(), f"x.{fmt.lower()}")
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))[:, :, ::-1]
    assert dec.bgr.shape == shown.shape
    assert np.abs(dec.bgr.astype(int) - shown).max() <= (0 if fmt == "TIFF" else 2)  # JPEG: decoders may differ
    assert any("orientation" in c for c in dec.conversions) == (orientation != 1)


def test_multipage_tiff_uses_its_largest_page_and_says_so(tmp_path, sample):
    from PIL import Image

    full = Image.open(sample).convert("RGB")
    thumb = full.resize((100, 66))
    thumb.save(tmp_path / "scan.tif", save_all=True, append_images=[full])  # a thumbnail first, as scanners do
    dec = read_image(tmp_path / "scan.tif")
    assert dec.bgr.shape == (460, 700, 3) and "page 2 of 2" in dec.conversions[0]
    np.testing.assert_array_equal(dec.bgr, read_image(sample).bgr)


@pytest.mark.parametrize("which", ["first", "last"])
def test_png_with_a_damaged_image_data_checksum_is_refused(sample, which):
    """The pixels' zlib stream intact, only an IDAT chunk's CRC changed: the data still inflates, but the file is
    not what was written, so it gets no verdict."""
    data = bytearray(sample.read_bytes())
    i = data.find(b"IDAT") if which == "first" else data.rfind(b"IDAT")
    data[i + 4 + int.from_bytes(data[i - 4:i], "big")] ^= 0xFF
    with pytest.raises(ImageError, match="IDAT: CRC error"):
        decode(bytes(data), "x.png")


@pytest.mark.parametrize("kind,head", [(b"zTXt", b"Comment\x00\x00"), (b"iCCP", b"profile\x00\x00"),
                                       (b"iTXt", b"Comment\x00\x01\x00\x00\x00")])
def test_png_with_a_compressed_chunk_bomb_is_refused_before_decoding(sample, kind, head):
    """A metadata chunk that inflates to 64 MB (from 64 KB) ahead of the pixels: refused by the header read,
    before any decoder inflates it."""
    body = kind + head + zlib.compress(bytes(64 << 20), 9)
    clean = sample.read_bytes()
    data = clean[:33] + struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body)) + clean[33:]
    with pytest.raises(ImageError, match="too large"):
        decode(data, "bomb.png")


def test_decoding_into_a_given_buffer_gives_the_same_pixels(sample):
    """PNG (8-bit RGB) and JPEG are decoded into the buffer the caller gives (the GPU paths' page-locked memory);
    a PNG whose header says RGB but whose pixels are RGBA (a tRNS chunk), and a grey one, use their own memory."""
    from PIL import Image

    given: list[np.ndarray] = []

    def into(shape):
        given.append(np.empty(shape, np.uint8))
        return given[-1]

    png = sample.read_bytes()
    jpg = _jpeg(cv2.imread(str(sample)), quality=90)
    rgb = cv2.cvtColor(cv2.imread(str(sample)), cv2.COLOR_BGR2RGB)
    trns, grey = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb).save(trns, "PNG", transparency=(1, 2, 3))
    Image.fromarray(rgb).convert("L").save(grey, "PNG")
    for data, lands in [(png, True), (jpg, True), (trns.getvalue(), False),
                        (grey.getvalue(), False)]:
        given.clear()
        dec = decode(data, "x", into=into)
        np.testing.assert_array_equal(dec.bgr, decode(data, "x").bgr)
        assert (bool(given) and np.shares_memory(dec.bgr, given[-1])) == lands


def test_a_jpeg_with_a_harmless_warning_is_decoded_whole_with_the_warning_kept(sample, capfd):
    """An unknown JFIF revision makes libjpeg warn without harm: the image is decoded whole (through OpenCV's
    path), the warning kept on its result and nothing on the console. (libjpeg reports a file's first warning only:
    a harmless one hides later ones, as docs/user-guide.md says.)"""
    data = bytearray(_jpeg(cv2.imread(str(sample)), quality=90))
    assert data[6:11] == b"JFIF\x00"
    data[11] = 2  # JFIF 2.01
    capfd.readouterr()
    dec = decode(bytes(data), "rev2.jpg")
    assert dec.warnings == ["Warning: unknown JFIF revision number 2.01"]
    assert capfd.readouterr().err == ""
    np.testing.assert_array_equal(dec.bgr, to_bgr8(cv2.imdecode(np.frombuffer(bytes(data), np.uint8), FLAGS), "x").bgr)


def test_an_image_at_another_magnification_that_looks_out_of_focus_is_told_the_magnification(model_dir, shared_data,
                                                                                           tmp_path):
    """The shared 40X images, a region of each upsampled x2.5 to the model's 100X scale (as a region or slide at 40X
    is read): the focus check flags them. Under the BreakHis name, which says 40X, the result warns of the
    magnification and its advice names it instead of "re-focus"; the same pixels under a name that states no
    magnification keep the focus advice; the original 40X images are not flagged at all."""
    from dataclasses import replace

    from runtime.io.scale import Scale, magnification_advice, resample_factor
    from runtime.pipeline.classifier import Classifier

    forty = sorted(p for p in (shared_data / "breakhis-other").glob("*.png") if "-40-" in p.name)
    assert len(forty) == 2
    named, plain = [], []
    for i, p in enumerate(forty):
        img = cv2.imread(str(p))
        h, w = img.shape[:2]
        up = cv2.resize(img[:h * 2 // 5, :w * 2 // 5], (w, h), interpolation=cv2.INTER_LINEAR)
        (tmp_path / "named").mkdir(exist_ok=True)
        named.append(tmp_path / "named" / p.name)
        plain.append(tmp_path / f"field-{i}.png")
        for out in (named[-1], plain[-1]):
            cv2.imwrite(str(out), up)
    with Classifier(model_dir, backend="cpu", precision="fp32") as clf:
        results = clf.classify([*named, *plain, *forty])
        contract = clf.contract
    refocus = "out of focus: re-focus and capture again"
    told = ("out of focus at the model's scale: this image is 40X (BreakHis file name) and the model reads 100X "
            "fields: capture at 100X (re-focus only if it already is 100X)")
    for r in results[:2]:
        assert any("out_of_focus" in f.flags for f in r.fields) and any("says 40X" in w for w in r.warnings)
        assert told in r.advice and refocus not in r.advice
    for r in results[2:4]:
        assert any("out_of_focus" in f.flags for f in r.fields) and refocus in r.advice and told not in r.advice
    assert all(r.advice == [] and any("says 40X" in w for w in r.warnings) for r in results[4:])
    assert magnification_advice(Scale(40.0, None, "OME-XML"), contract, resampled=True) == (
        "out of focus at the model's scale: this image was upsampled x2.5 from 40X (OME-XML): capture at 100X "
        "(re-focus only if it already is 100X)")
    assert magnification_advice(Scale(100.0, None, "flag"), contract, resampled=True) is None
    fine = replace(contract, mpp=0.25)  # a model that states microns per pixel: an input at 0.5 is upsampled x2
    f, warn = resample_factor(Scale(None, 0.5, "OME-XML"), fine)
    assert f == 0.5 and warn == [("input is 0.5 microns per pixel (OME-XML), the model was trained on 0.25: "
                                  "upsampled 2x, with less detail than it was trained on")]
    assert magnification_advice(Scale(None, 0.5, "OME-XML"), fine, resampled=True) == (
        "out of focus at the model's scale: this image was upsampled x2 from 0.5 microns per pixel (OME-XML): capture "
        "at 100X (re-focus only if it already is 100X)")
    assert resample_factor(Scale(None, 0.25, "OME-XML"), fine) == (1.0, [])
