"""python -m benchmarks.decode: images decoded per second by the runtime's decoder (runtime/io/decode.py) with 1, 2,
4, ... threads over the same files read into memory, next to OpenCV's plain ``imdecode``: shows whether decoding
scales with the cores a folder pipeline gives it (on a GPU box it is what feeds the GPU).

  python -m benchmarks.decode --images ../shared/data/breakhis-100x --json benchmarks/results/decode-cpu.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from benchmarks import write_json
from benchmarks.__main__ import machine
from runtime.io.decode import FLAGS, decode, decoder_messages
from runtime.io.formats import is_image


def _rate(fn: Callable[[bytes], object], datas: list[bytes], workers: int, repeats: int) -> float:
    """Best of ``repeats`` passes, in images per second."""
    best = float("inf")
    with ThreadPoolExecutor(workers) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(fn, datas))
            best = min(best, time.perf_counter() - t0)
    return len(datas) / best


def _opencv_locked(data: bytes) -> object:
    with decoder_messages():
        return cv2.imdecode(np.frombuffer(data, np.uint8), FLAGS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="folder of images (read into memory first)")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="thread counts to try (default: 1, 2, 4, ... up to the cores)")
    ap.add_argument("--repeats", type=int, default=3, help="passes per setting; the best counts (default 3)")
    ap.add_argument("--as-jpeg", type=int, default=None, metavar="QUALITY",
                    help="decode JPEG copies of the images at this quality instead (as a camera writes them)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    paths = sorted(p for p in args.images.iterdir() if is_image(p.name))
    if not paths:
        ap.error(f"--images {args.images}: no images")
    datas = [p.read_bytes() for p in paths] if args.as_jpeg is None else \
        [cv2.imencode(".jpg", cv2.imread(str(p)), [cv2.IMWRITE_JPEG_QUALITY, args.as_jpeg])[1].tobytes() for p in paths]
    cores = os.cpu_count() or 1
    workers = args.workers or [w for w in (1, 2, 4, 8, 16, 32) if w <= cores]
    decoders: dict[str, Callable[[bytes], object]] = {
        "runtime": lambda d: decode(d, "x"),
        "opencv_imdecode": lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR),
        # what JPEG/TIFF/BMP decoding was before libjpeg-turbo ran in parallel: OpenCV, stderr captured, one at a time
        "opencv_under_stderr_lock": _opencv_locked,
    }
    rows = []
    print(f"{len(datas)} images, {cores} cores\ndecoder                  threads  images/s  ms/image  vs 1 thread")
    for name, fn in decoders.items():
        one = None
        for w in workers:
            rate = _rate(fn, datas, w, args.repeats)
            one = one or rate
            rows.append({"decoder": name, "threads": w, "images_per_s": rate, "scaling": rate / one})
            print(f"{name:24s} {w:7d} {rate:9.1f} {1e3 / rate:9.2f} {rate / one:11.2f}x")
    fmt = f"JPEG quality {args.as_jpeg} copies" if args.as_jpeg is not None else "as given"
    write_json(args.json, {"machine": machine(), "images": len(datas), "format": fmt, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
