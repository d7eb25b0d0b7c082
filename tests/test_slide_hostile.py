"""The slide path against damaged and hostile files made here: destroyed tiles and tiles damaged yet still
decodable cost only the fields that touch them (errors, with the tile named once), files that are tiny, truncated,
unreadable or unopenable get one clear message and the documented exit code, small files claiming enormous images
are refused by a stated limit or finish in bounded time, and names of any bytes survive."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.synthetic_slide import write_mosaic
from runtime.io.decode import ImageError
from runtime.io.slide_source import MAX_SLIDE_PIXELS, MAX_THUMBNAIL_SOURCE_PIXELS, open_source
from runtime.model.manifest import sha256_file
from runtime.pipeline.classifier import Classifier
from runtime.slides.classify import classify_slide
from runtime.slides.files import output_stem
from tests.conftest import run_module

TILE = 256  # 2 x 3 fields of 672 x 448: 6 x 8 tiles at level 0


@pytest.fixture(scope="module")
def clf(model_dir):
    with Classifier(model_dir, backend="cpu") as c:
        yield c


def _mosaic(images, path: Path, compression: str = "zlib") -> Path:
    if compression == "zlib":
        write_mosaic(path, [images[0:3], images[3:6]], levels=1, tile=TILE)
    else:  # JPEG tiles, as scanners write them
        import tifffile

        ref = tmp = path.with_suffix(".ref.tif")
        write_mosaic(ref, [images[0:3], images[3:6]], levels=1, tile=TILE)
        with tifffile.TiffFile(ref) as t:
            rgb = t.asarray()
        tmp.unlink()
        tifffile.imwrite(path, rgb, tile=(TILE, TILE), photometric="rgb", compression="jpeg",
                         compressionargs={"level": 92}, description="|AppMag = 100")
    return path


def _tile_span(path: Path, index: int) -> tuple[int, int]:
    import tifffile

    with tifffile.TiffFile(path) as t:
        page = t.pages[0]
        return int(page.dataoffsets[index]), int(page.databytecounts[index])


def _damage(path: Path, index: int, how: str) -> None:
    offset, count = _tile_span(path, index)
    data = bytearray(path.read_bytes())
    if how == "destroy":  # the tile's bytes replaced: the codec refuses them
        data[offset:offset + count] = bytes(count)
    elif how == "stray-markers":  # bytes of a JPEG scan overwritten: libjpeg still returns pixels, with a warning
        data[offset + count // 2:offset + count // 2 + 40] = b"\xff\xd3" * 20
    elif how == "cut":  # the end of a JPEG tile lost (its end-of-image marker with it): decodes to padded grey
        data[offset + count // 2:offset + count] = bytes(count - count // 2)
    path.write_bytes(bytes(data))


# tile 1 = row 0, column 1 of 8: pixels x 256..512, y 0..256, inside field r0 c0 only
@pytest.mark.parametrize("compression,how", [("zlib", "destroy"), ("jpeg", "destroy"), ("jpeg", "stray-markers"),
                                             ("jpeg", "cut")])
def test_a_damaged_tile_costs_only_the_fields_it_touches(clf, images_100x, tmp_path, compression, how):
    path = _mosaic(images_100x, tmp_path / "slide.tif", compression)
    clean = classify_slide(clf, path, tissue_mask=False)
    assert clean.counts["classified"] == 6 and not any("cannot be decoded" in w for w in clean.warnings)
    _damage(path, 1, how)
    res = classify_slide(clf, path, tissue_mask=False)
    by_pos = {(f.row, f.col): f for f in res.fields}
    bad = by_pos[(0, 0)]
    assert bad.status == "error" and bad.probability is None and "level 0 tile 1" in bad.error
    assert res.counts == {"fields": 6, "classified": 5, "background": 0, "errors": 1, "rechecked": 0,
                          "flagged": 0, "withheld": 0}
    for f, c in zip(res.fields, clean.fields):  # the others keep exactly their results
        if (f.row, f.col) != (0, 0):
            assert f.status == "classified" and f.probability == c.probability
    assert sum("level 0 tile 1" in w for w in res.warnings) == 1  # said once
    # the unread field could be the malignant one: the region is Malignant only where a counted field makes it so
    counted = max(f.probability for f in res.fields if f.status == "classified")
    assert res.aggregate["label"] == ("Malignant" if counted > 0.5 else None)
    assert counted > 0.5 or "1 of 6 fields could not be read" in res.aggregate["note"]


def test_the_cli_reports_a_damaged_tile_once_without_noise(model_dir, images_100x, tmp_path):
    path = _mosaic(images_100x, tmp_path / "slide.tif")
    _damage(path, 1, "destroy")
    proc = run_module("runtime.slide", "--model", str(model_dir), "--backend", "cpu", "--no-progress",
                      "--no-tissue-mask", "--out", str(tmp_path / "out"), str(path))
    assert proc.returncode == 1  # documented: 1 when some fields or inputs failed
    assert "5 classified, 0 background, 1 errors" in proc.stdout
    assert proc.stdout.count("level 0 tile 1") == 1
    assert "Traceback" not in proc.stderr and "Task was destroyed" not in proc.stderr
    assert len([x for x in proc.stderr.splitlines() if x.strip()]) <= 2  # nothing but model notes


def _hostile(folder: Path, images) -> dict[str, Path]:
    folder.mkdir()
    good = _mosaic(images, folder / "good.tif")
    data = good.read_bytes()
    files = {"empty.svs": b"", "truncated.tif": data[:4096], "header-only.tif": data[:16],
             "text.tif": b"this is a text file, not a slide\n" * 20, "not-a-slide.ndpi": os.urandom(2048),
             "png-named.svs": images[0].read_bytes()}
    out = {}
    for name, content in files.items():
        (folder / name).write_bytes(content)
        out[name] = folder / name
    (folder / "folder.tif").mkdir()
    out["folder.tif"] = folder / "folder.tif"
    return out


def test_tiny_truncated_unreadable_and_unopenable_files_get_one_clear_message_each(model_dir, images_100x, tmp_path):
    files = _hostile(tmp_path / "in", images_100x)
    proc = run_module("runtime.slide", "--model", str(model_dir), "--backend", "cpu", "--no-progress",
                      "--out", str(tmp_path / "out"), *map(str, files.values()))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Task was destroyed" not in proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    for name in files:  # a PNG with a slide's name is not a TIFF either: refused too
        assert sum(name in x for x in errors) == 1, (name, proc.stderr)
    assert len(errors) == len(files)


def test_a_small_file_claiming_an_enormous_image_is_refused_by_the_stated_limit(tmp_path):
    import tifffile

    for (h, w), what in (((400_000, 400_000), "pixels, above the limit"),
                         ((50_000, 50_000), "smallest level is")):
        path = tmp_path / f"claim-{w}.tif"
        with tifffile.TiffWriter(path, bigtiff=True) as tw:  # never-written tiles: a few KB on disk
            tw.write(iter([np.full((512, 512, 3), 242, np.uint8)] + [None] * ((h // 512 + 1) * (w // 512 + 1) - 1)),
                     shape=(h, w, 3), dtype=np.uint8,
                     tile=(512, 512), photometric="rgb", compression="zlib")
        assert path.stat().st_size < 50e6
        with pytest.raises(ImageError, match=what):
            open_source(path)
    assert 400_000 ** 2 > MAX_SLIDE_PIXELS and 50_000 ** 2 > MAX_THUMBNAIL_SOURCE_PIXELS


def test_a_sparse_claim_within_the_limits_finishes_in_bounded_time_as_background(clf, images_100x, tmp_path):
    import tifffile

    h, w = 30_000, 40_000  # 1.2 gigapixels claimed, one tile (of glass) written
    path = tmp_path / "sparse.tif"
    tiles = (h // 512 + 1) * (w // 512 + 1)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(iter([np.full((512, 512, 3), 242, np.uint8)] + [None] * (tiles - 1)), shape=(h, w, 3),
                 dtype=np.uint8, tile=(512, 512), photometric="rgb", compression="zlib")
    t0 = time.monotonic()
    res = classify_slide(clf, path)
    assert time.monotonic() - t0 < 300  # a bound on a hang, not a speed check
    assert res.counts["classified"] == 0 and res.counts["background"] == res.counts["fields"] > 3000
    assert any(f"{tiles - 1} tiles were never written" in x for x in res.warnings)


def test_thin_images_are_read_in_few_blocks(tmp_path):
    import tifffile

    path = tmp_path / "thin.tif"
    tifffile.imwrite(path, np.full((3, 300_000, 3), 240, np.uint8), tile=(16, 4096), photometric="rgb")
    src = open_source(path)
    calls = []
    read = src.read
    src.read = lambda *a, **k: calls.append(a) or read(*a, **k)  # counts the block reads of the tissue map
    try:
        thumb, _ = src.thumbnail()
    finally:
        src.close()
    assert thumb.shape[1] == 1024 and len(calls) <= 100


def test_slide_names_of_any_bytes_survive(model_dir, images_100x, tmp_path):
    raw = os.fsencode(tmp_path) + "/scan-\U0001f52c-".encode() + b"\xff\xfe.tif"  # emoji and undecodable bytes
    path = Path(os.fsdecode(raw))
    _mosaic(images_100x, tmp_path / "src.tif").rename(path)
    out = tmp_path / "out"
    proc = run_module("runtime.slide", "--model", str(model_dir), "--backend", "cpu", "--no-progress",
                      "--out", str(out), os.fsdecode(raw))
    assert proc.returncode == 0, proc.stderr
    stem = output_stem(out, path.name, sha256_file(path))
    assert Path(f"{stem}.json").is_file() and Path(f"{stem}.geojson").is_file()
    assert "scan-\U0001f52c-" in proc.stdout and "Traceback" not in proc.stderr
    saved = json.loads(Path(f"{stem}.json").read_text())
    assert saved["counts"]["classified"] == 6


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists open files through /proc/self/fd")
def test_a_tiff_refused_for_its_sample_type_leaves_no_file_open(tmp_path):
    import tifffile

    path = tmp_path / "u16.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint16), tile=(32, 32), photometric="rgb")
    with pytest.raises(ImageError, match="uint16"):
        open_source(path)

    def open_files():
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                out.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                continue
        return out

    assert str(path) not in open_files()
