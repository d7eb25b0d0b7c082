"""python -m benchmarks.slide: fields per second on a large region through the slide path, with the tissue mask on
and off on the same synthetic pyramidal BigTIFF (real shared fields among blank glass), and what the mask saves.

  python -m benchmarks.slide --images ../shared/data/breakhis-100x --json benchmarks/results/slide-cpu.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_json
from benchmarks.synthetic_slide import write_mosaic


def main(argv: list[str] | None = None) -> int:
    from runtime.apps.options import add_model_options, open_classifier
    from runtime.slides.classify import classify_slide

    ap = argparse.ArgumentParser(prog="python -m benchmarks.slide", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="folder of 700x460 images to build the region from")
    ap.add_argument("--rows", type=int, default=8, help="rows of fields (default 8)")
    ap.add_argument("--cols", type=int, default=8, help="columns of fields (default 8)")
    ap.add_argument("--tissue", type=float, default=0.3, help="fraction of fields holding tissue (default 0.3)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    add_model_options(ap)
    args = ap.parse_args(argv)
    images = sorted(args.images.glob("*.png"))
    if not images:
        ap.error(f"--images {args.images}: no PNG images")
    rng = np.random.default_rng(0)
    layout = [[images[int(rng.integers(len(images)))] if rng.random() < args.tissue else None
               for _ in range(args.cols)] for _ in range(args.rows)]
    clf = open_classifier(args)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, clf:
        path = Path(tmp) / "region.tif"
        w, h = write_mosaic(path, layout, levels=4)
        classify_slide(clf, path, tissue_mask=True)  # warm-up
        for mask in (True, False):
            t0 = time.perf_counter()
            res = classify_slide(clf, path, tissue_mask=mask)
            s = time.perf_counter() - t0
            rows["mask on" if mask else "mask off"] = {
                "seconds": s, "fields": res.counts["fields"], "classified": res.counts["classified"],
                "classified_fields_per_s": res.counts["classified"] / s,
                "region_fields_per_s": res.counts["fields"] / s, "verdict": res.aggregate}
    on, off = rows["mask on"], rows["mask off"]
    result: dict[str, Any] = {"region": {"width": w, "height": h, "fields": on["fields"],
                         "tissue_fields": sum(p is not None for r in layout for p in r)},
              "backend": clf.backend.name, "runs": rows,
              "mask_savings": {"fields_skipped": off["classified"] - on["classified"],
                               "time_saved_fraction": 1 - on["seconds"] / off["seconds"]}}
    print(f"{w}x{h} region, {on['fields']} fields, backend {clf.backend.name}")
    for k, r in rows.items():
        print(f"  {k:9s} {r['classified']:4d} fields classified in {r['seconds']:6.1f} s: "
              f"{r['classified_fields_per_s']:.2f} classified fields/s, {r['region_fields_per_s']:.2f} region fields/s")
    print(f"  the mask skipped {result['mask_savings']['fields_skipped']} fields and saved "
          f"{result['mask_savings']['time_saved_fraction']:.0%} of the time")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
