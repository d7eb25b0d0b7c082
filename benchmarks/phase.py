"""One phase of ``python -m benchmarks``, alone in its own process: a variant (benchmarks/variants.py) image by image
or as a folder, or one of the product's paths (benchmarks/paths.py). Nothing else runs in the process, so no other
variant's threads (PyTorch's OpenMP workers keep spinning after each image) slow what is timed, and the process's
peak RSS is the phase's own. Prints its rows as one JSON line on stdout, the last line; the runner starts it.

  python -m benchmarks.phase '{"kind": "per-image", "name": "runtime_onnxruntime_cpu", "model": ..., ...}'
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def per_image(spec: dict[str, Any], images: list[Path]) -> dict[str, Any]:
    """Each image on its own (decode, preprocess, infer, one image at a time), ``repeats`` passes after the warm-up
    images; sample: an image. The first pass's probabilities come back for the fidelity columns."""
    from benchmarks.variants import RUNTIME_TRT_FP16, open_variant, warm_recheck

    v = open_variant(spec["name"], Path(spec["model"]), spec["threads"])
    for p in images[: spec["warmup"]]:
        v.run(p)
    warmed = warm_recheck(v)
    samples: list[float] = []
    stages: dict[str, list[float]] = {}
    probs: list[float] = []
    cpu0 = time.process_time()
    for rep in range(spec["repeats"]):
        for p in images:
            t0 = time.perf_counter()
            st, prob = v.run(p)
            samples.append(time.perf_counter() - t0)
            if rep == 0:
                probs.append(prob)
            for k, sec in st.items():
                stages.setdefault(k, []).append(sec)
    out: dict[str, Any] = {
        "how": f"image by image: {spec['warmup']} warm-up images{warmed}, then {spec['repeats']} passes over the "
               "images; sample: an image",
        "tier": v.tier, "images": len(samples), "samples_s": samples, "net_s": None,
        "cpu_s": time.process_time() - cpu0, "peak_rss_mb": None, "round": {},
        "precision": v.precision, "probabilities": probs, "stage_s": stages, "fields": dict(v.fields)}
    if hasattr(v.keep, "contract"):
        out["threshold"] = v.keep.contract.threshold
    if spec["name"] == RUNTIME_TRT_FP16:
        from benchmarks.gpu_floor import tensor_core_floor

        out["round"]["tensor_core_floor"] = tensor_core_floor(v, spec.get("gpu"), spec.get("fp16_tflops"))
    return {spec["name"]: out}


def folder(spec: dict[str, Any], images: list[Path]) -> dict[str, Any]:
    """The images as one list at the variant's batch size, ``repeats`` passes after a warm-up (the whole list on a
    GPU, where each batch shape is tuned once; else the warm-up images, at least one batch); sample: the time
    from one result to the next, the first from the pass's start."""
    from benchmarks.paths import intervals
    from benchmarks.variants import open_variant, warm_recheck

    v = open_variant(spec["name"], Path(spec["model"]), spec["threads"])
    batch = getattr(v.keep, "batch_size", 1)
    v.run_all(images if spec["suite"] == "gpu" else images[: max(spec["warmup"], batch)])
    warmed = warm_recheck(v)
    samples: list[float] = []
    cpu0 = time.process_time()
    for _ in range(spec["repeats"]):
        done, t0 = [], time.perf_counter()
        for _ in v.stream(images):
            done.append(time.perf_counter())
        samples += intervals(t0, done)
    out = {"how": f"a folder, batch {batch}: warm-up{warmed}, then {spec['repeats']} passes over the images; "
                  "sample: result to result",
           "tier": v.tier, "images": len(samples), "samples_s": samples, "net_s": None,
           "cpu_s": time.process_time() - cpu0, "peak_rss_mb": None, "round": {},
           "fields": dict(v.fields)}
    return {spec["name"]: out}


def path(spec: dict[str, Any], images: list[Path]) -> dict[str, Any]:
    from benchmarks.paths import PATHS, Context

    with tempfile.TemporaryDirectory(prefix=f"bench-{spec['name']}-") as tmp:
        ctx = Context(Path(spec["model"]), images, spec["threads"], spec["repeats"], spec["warmup"], Path(tmp),
                      spec.get("reverse", False))
        return PATHS[spec["name"]](ctx)


KINDS = {"per-image": per_image, "folder": folder, "path": path}


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    images = [Path(p) for p in spec["images"]]
    from benchmarks.paths import peak_rss_mb

    rows = KINDS[spec["kind"]](spec, images)
    rss = peak_rss_mb(os.getpid())
    for name, r in rows.items():  # where the product ran in another process, the path measured that one's
        if r["peak_rss_mb"] is None and "ray" not in name:  # Ray's actors are processes of their own
            r["peak_rss_mb"] = rss
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
