"""The product's paths, as a user runs them, each timed on the same images as the image-by-image rows of the same
run: the folder (`runtime.classify`'s pipeline), a burst of files into the watch folder (`python -m runtime.watch`),
a slide (an all-tissue mosaic of the images' fields), a cohort (one process, and Ray where it is installed) and the
server (`python -m runtime.serve`) under 1 and 8 clients. All run the tier `auto` picks, with the machine's threads.

Every path gives rows of per-image samples in seconds (benchmarks/stats.py summarises them): the time from one
result to the next where results are seen one by one (folder, watch, server), a whole pass per field where only the
pass is seen (slide), or the span of the slides' work where the run is a command (cohort). Each
row says how it was taken. ``PATHS`` is the table the runner (``python -m benchmarks``) goes through, one child
process per path.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.serve_compare import run_clients
from benchmarks.synthetic_slide import write_mosaic
from runtime.model.paths import REPO

CLIENTS = (1, 8)
WATCH_SETTLE_S = 0.2  # the watch's --settle: files in a burst are complete when moved in, so a short settle is safe
WATCH_INTERVAL_S = 0.05  # the watch's --interval between scans
TIMEOUT_S = 600.0  # a path that has not finished in this long has hung: the runner reports it and goes on


@dataclass
class Context:
    model: Path
    images: list[Path]
    threads: int
    repeats: int
    warmup: int
    tmp: Path
    reverse: bool = False  # a reversed round: a path with several rows takes them in reverse order too


Rows = dict[str, dict[str, Any]]


def row(how: str, tier: dict[str, Any], images: int, samples: list[float] | None = None, net_s: float | None = None,
        cpu_s: float | None = None, peak_rss_mb: float | None = None, fields: dict[str, int] | None = None,
        **extra: Any) -> dict[str, Any]:
    """A path's raw row for one round (the runner merges the rounds and summarises, benchmarks/stats.py): per-image
    ``samples`` in seconds, or ``net_s`` for the images where the path is timed whole; ``cpu_s``: the CPU time of
    the process running the product over those images; ``fields``: how many fields the timed images had
    ("classified") and how many of them were re-checked at FP32 ("rechecked"); anything else is kept per round."""
    return {"how": how, "tier": tier, "images": images, "samples_s": samples or [], "net_s": net_s, "cpu_s": cpu_s,
            "peak_rss_mb": peak_rss_mb, "fields": fields or {}, "round": extra}


def counted(results: list[dict[str, Any]]) -> dict[str, int]:
    """The fields of results as the product writes them (a record, an answer): classified, and re-checked."""
    return {"classified": sum(len(r.get("fields") or []) for r in results),
            "rechecked": sum(int(r.get("rechecked") or 0) for r in results)}


# what the paths that run the product in a process of its own do at start (Classifier.open_recheck)
OPENS_AT_START = "its re-checks' FP32 reference opened and run on one field at start, as the product does"


def peak_rss_mb(pid: int) -> float | None:
    """The peak RSS of a running process (VmHWM; not getrusage: Linux carries ru_maxrss across exec, so a child
    would report its parent's peak), read before it is stopped."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), None)


def cpu_s(pid: int) -> float:
    """The CPU time (user + system, all threads) a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def intervals(start: float, done: list[float]) -> list[float]:
    """The time from one result to the next, the first from ``start``: their sum is the pass's wall time."""
    done = sorted(done)
    return [b - a for a, b in zip([start, *done[:-1]], done)]


def tier_of_record(model: dict[str, Any]) -> dict[str, Any]:
    """The tier a result says it ran (its model block: backend, precision, what is re-checked)."""
    return {"backend": model.get("backend"), "precision": model.get("precision"), "recheck": bool(model.get("recheck"))}


def folder(ctx: Context) -> Rows:
    """The folder pipeline as `runtime.classify DIR` runs it: the Classifier's defaults (decode threads ahead of
    inference, the backend's batch)."""
    from benchmarks.variants import _runtime, warm_recheck

    v = _runtime(ctx.model, ctx.threads)
    v.run_all(ctx.images[: ctx.warmup])
    warmed = warm_recheck(v)
    samples = []
    cpu0 = time.process_time()
    for _ in range(ctx.repeats):
        done, t0 = [], time.perf_counter()
        for _ in v.stream(ctx.images):
            done.append(time.perf_counter())
        samples += intervals(t0, done)
    cpu = time.process_time() - cpu0
    clf = v.keep
    how = (f"in its own process: Classifier defaults ({clf.decode_workers} decode threads, batch {clf.batch_size}), "
           f"{ctx.warmup} warm-up images{warmed}, {ctx.repeats} passes; sample: result to result")
    out = {"folder": row(how, v.tier, len(ctx.images) * ctx.repeats, samples, cpu_s=cpu, fields=dict(v.fields))}
    clf.close()
    return out


def _stage(src: Path, name: str, staging: Path, folder: Path) -> Path:
    """Copy into a staging folder on the same file system, then rename in: the watch never sees half a file."""
    tmp = staging / name
    shutil.copyfile(src, tmp)
    dst = folder / name
    os.replace(tmp, dst)
    return dst


def _records(out: Path) -> list[dict[str, Any]]:
    if not out.is_file():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _wait_records(out: Path, n: int, proc: subprocess.Popen) -> list[dict[str, Any]]:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        recs = _records(out)
        if len(recs) >= n:
            return recs
        if proc.poll() is not None:
            raise RuntimeError(f"runtime.watch exited {proc.returncode} with {len(recs)} of {n} records")
        time.sleep(0.02)
    raise RuntimeError(f"runtime.watch wrote {len(_records(out))} of {n} records in {TIMEOUT_S:.0f} s")


def watch(ctx: Context) -> Rows:
    """A burst: the images moved into the watched folder at once, ``repeats`` times (new names each time); the
    records' ``finished_at`` times give the samples, measured like the folder's and the server's: from the moment
    the burst's files are all in place to each record, so a burst of N images gives N samples adding up to its wall
    time (the first includes the wait of --settle and a scan, the watch's rule; first_result_s says how long)."""
    folder, staging, out = ctx.tmp / "watch", ctx.tmp / "watch-staging", ctx.tmp / "watch.jsonl"
    folder.mkdir()
    staging.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "runtime.watch", str(folder), "--out", str(out), "--model",
                             str(ctx.model), "--threads", str(ctx.threads), "--interval", str(WATCH_INTERVAL_S),
                             "--settle", str(WATCH_SETTLE_S)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for i, p in enumerate(ctx.images[: ctx.warmup]):  # warm-up: the model loaded and run
            _stage(p, f"warm{i}-{p.name}", staging, folder)
        expected = min(ctx.warmup, len(ctx.images))
        _wait_records(out, expected, proc)
        samples, first, timed = [], [], []
        cpu0 = cpu_s(proc.pid)
        for rep in range(ctx.repeats):
            for i, p in enumerate(ctx.images):
                _stage(p, f"b{rep}-{i:04d}-{p.name}", staging, folder)
            t0 = time.time()  # the burst's files all in place (finished_at is the watch's time.time() too)
            expected += len(ctx.images)
            recs = _wait_records(out, expected, proc)[-len(ctx.images):]
            bad = [r for r in recs if r.get("error") or r.get("probability") is None]
            if bad:
                raise RuntimeError(f"runtime.watch: {len(bad)} images without a verdict: {bad[0].get('error')}")
            done = sorted(r["finished_at"] for r in recs)
            if done[0] < t0:  # a record before the burst was in place: staging outlasted --settle, not a burst
                raise RuntimeError(f"runtime.watch finished an image {t0 - done[0]:.3f} s before the burst was in place")
            first.append(done[0] - t0)
            samples += intervals(t0, done)
            timed += recs
        rss, cpu = peak_rss_mb(proc.pid), cpu_s(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    how = (f"python -m runtime.watch in its own process (--settle {WATCH_SETTLE_S}, --interval {WATCH_INTERVAL_S}; "
           f"{OPENS_AT_START}), {ctx.warmup} warm-up images, {ctx.repeats} bursts of {len(ctx.images)} images; "
           "sample: record to record (finished_at), the first from the moment the burst's files are in place (it "
           "includes --settle)")
    return {"watch burst": row(how, tier_of_record(recs[-1].get("model", {})), len(ctx.images) * ctx.repeats,
                               samples, cpu_s=cpu, peak_rss_mb=rss, fields=counted(timed), first_result_s=first)}


def _grid(n: int) -> tuple[int, int]:
    """rows x cols holding exactly n fields, as square as n allows."""
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def slide(ctx: Context) -> Rows:
    """An all-tissue mosaic of the images' fields (each image's top-left field, as the image itself is classified)
    through the slide path, ``repeats`` passes after a warm-up on a one-field mosaic; sample: a pass, per field."""
    from benchmarks.variants import RECHECK_WARMED, tier_of
    from runtime.pipeline.classifier import Classifier
    from runtime.slides.classify import classify_slide

    rows, cols = _grid(len(ctx.images))
    it = iter(ctx.images)
    mosaic, warm = ctx.tmp / "mosaic.tif", ctx.tmp / "warm.tif"
    write_mosaic(mosaic, [[next(it) for _ in range(cols)] for _ in range(rows)], levels=3)
    write_mosaic(warm, [[ctx.images[0]]], levels=1)
    samples, stages = [], {"plan_and_mask": 0.0, "classify": 0.0}
    fields = {"classified": 0, "rechecked": 0}
    with Classifier(ctx.model, threads=ctx.threads) as clf:
        classify_slide(clf, warm)
        clf.open_recheck()
        cpu0 = time.process_time()
        for _ in range(ctx.repeats):
            t0 = time.perf_counter()
            res = classify_slide(clf, mosaic)
            s = time.perf_counter() - t0
            if res.counts["classified"] != len(ctx.images):
                raise RuntimeError(f"the mosaic's {len(ctx.images)} fields: {res.counts}")
            samples.append(s / len(ctx.images))
            for k in fields:
                fields[k] += res.counts[k]
            for k in stages:  # the slide's own timings: planning and the tissue mask, then reading and classifying
                stages[k] += res.timings_ms[k] / (len(ctx.images) * ctx.repeats)
        tier = tier_of(clf)
        cpu = time.process_time() - cpu0
    warmed = RECHECK_WARMED if tier["recheck"] else ""
    how = (f"in its own process: classify_slide on a {rows}x{cols}-field all-tissue mosaic (tissue mask on), a "
           f"one-field warm-up{warmed}, {ctx.repeats} passes; sample: a pass, per field")
    return {"slide": row(how, tier, len(ctx.images) * ctx.repeats, samples, cpu_s=cpu, fields=fields,
                         stages_ms_per_field=stages)}


def _cohort_run(inputs: Path, out: Path, extra: list[str], ctx: Context) -> tuple[float, list[dict], dict, float]:
    """(wall s, the cohort's table, the model block of its run.json, the slides' span s) of one cohort run. The span: from the first slide's start to the last slide's record, each slide's record being written
    last (its outputs before it), its start its record's time less its own seconds (the table's, which end before
    its outputs are made): the slides' work, and none of the run's fixed cost (loading the model, starting the actors,
    the re-check's start, the table). The first slide's outputs fall outside it (about 25 ms a slide on the 2-core
    VM, 2026-12-07: the one-process cohort's 2 slides' outputs and table took 53 ms), so the span is short by that."""
    import csv

    from runtime.cohort import main as cohort
    from runtime.cohorts.units import RECORD

    t0 = time.perf_counter()
    rc = cohort([str(inputs), "--out", str(out), "--model", str(ctx.model), "--no-progress", *extra])
    seconds = time.perf_counter() - t0
    with open(out / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if rc not in (0, 1):  # 1: a slide without a verdict
        raise RuntimeError(f"runtime.cohort exited {rc}")
    records = [(p.stat().st_mtime, json.loads(p.read_text())["row"]["seconds"]) for p in out.rglob(f"*{RECORD}")]
    if len(records) != len(rows):
        raise RuntimeError(f"runtime.cohort wrote {len(records)} slide records for {len(rows)} slides")
    span = max(t for t, _ in records) - min(t - s for t, s in records)
    return seconds, rows, json.loads((out / "run.json").read_text())["model"], span


def cohort(ctx: Context) -> Rows:
    """`runtime.cohort` (its main, in this process) on slides made of the images (2 x repeats slides, each half of
    them), in one process and on Ray (where installed: 2 actors with half the cores each, or 1 with all). Timed by
    the slides' span (``_cohort_run``): the run's fixed cost is left out as it is measured, not taken off a wall time
    (a fixed cost measured on another run varied by 0.3-0.6 s, several per cent of a round)."""
    halves = [ctx.images[: len(ctx.images) // 2], ctx.images[len(ctx.images) // 2:]]
    full = ctx.tmp / "cohort"
    full.mkdir()
    for rep in range(ctx.repeats):
        for h, half in enumerate(h for h in halves if h):
            write_mosaic(full / f"s{rep}-{h}.tif", [list(half)], levels=2)
    fields = len(ctx.images) * ctx.repeats
    runs = {"cohort, one process": ["--threads", str(ctx.threads)]}
    if importlib.util.find_spec("ray") is not None:
        actors = 2 if ctx.threads >= 2 else 1
        runs[f"cohort, ray {actors} actor{'s' * (actors > 1)}"] = [
            "--ray", "local", "--actors", str(actors), "--cpus-per-actor", str(max(1, ctx.threads // actors))]
    out: Rows = {}
    for name, extra in list(runs.items())[:: -1 if ctx.reverse else 1]:
        tag = name.replace(" ", "-").replace(",", "")
        wall, rows, model, span = _cohort_run(full, ctx.tmp / tag, extra, ctx)
        classified = sum(int(r["classified"] or 0) for r in rows)
        if classified != fields or any(r["status"] == "error" for r in rows):
            raise RuntimeError(f"{name}: {classified} of {fields} fields classified")
        how = (f"runtime.cohort's main in its own process {' '.join(extra)} ({OPENS_AT_START}, outside the span): "
               f"{len(rows)} slides, {fields} fields; the slides' span: from the first slide's start to the last "
               "slide's record (its outputs written before it), per round")
        out[name] = row(how, tier_of_record(model), fields, net_s=span, wall_s=wall,
                        cpu_s=None,  # not of the span alone: the whole run's (here) or other processes' (Ray's)
                        fields={"classified": classified, "rechecked": sum(int(r["rechecked"] or 0) for r in rows)})
        if "ray" in name:
            import ray

            ray.shutdown()
    return out


def shares(images: list[Path], clients: int) -> list[list[Path]]:
    """What each of ``clients`` sends: the images dealt out in turn, every image equally often (once each where
    there are at least as many images as clients; else the list repeated until every client has one), so that
    every row sends the same images as often, its re-checked ones too."""
    work = images * max(1, -(-clients // len(images)))
    return [work[k::clients] for k in range(clients)]


def _http_load(url: str, images: list[Path], clients: int) -> tuple[list[float], list[dict]]:
    """``clients`` threads each posting its share of the images (``shares``) one after another; the completion
    times and the answers."""
    done: list[float] = []
    answers: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    dealt = shares(images, clients)

    def client(k: int) -> None:
        start.wait()
        for image in dealt[k]:
            req = urllib.request.Request(url + "/v1/classify", data=image.read_bytes(), method="POST")
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
                answer = json.loads(r.read())
            with lock:
                done.append(time.perf_counter())
                answers.append(answer)

    t0 = run_clients(clients, client, start)
    if len(done) != sum(map(len, dealt)):
        raise RuntimeError(f"the server answered {len(done)} of {sum(map(len, dealt))} requests")
    return intervals(t0, done), answers


def serve(ctx: Context) -> Rows:
    """`python -m runtime.serve` on a free localhost port, warmed by ``warmup`` requests; 1 client sending the
    images ``repeats`` times, then 8 clients sharing them (each sends its share, every image at least once)."""
    from benchmarks.serve_compare import _port, _start, _wait

    port = _port()
    url = f"http://127.0.0.1:{port}"
    proc = _start("runtime.serve", "--model", str(ctx.model), "--port", str(port), "--threads", str(ctx.threads),
                  "--max-pending", "256")
    out: Rows = {}
    try:
        _wait(lambda: urllib.request.urlopen(url + "/healthz", timeout=1).status == 200, proc, "runtime.serve")
        _http_load(url, ctx.images[: ctx.warmup], 1)
        for clients in CLIENTS[:: -1 if ctx.reverse else 1]:
            cpu0 = cpu_s(proc.pid)
            samples, answers = _http_load(url, ctx.images * ctx.repeats, clients)
            cpu = cpu_s(proc.pid) - cpu0
            bad = [a for a in answers if a.get("error") or a.get("probability") is None]
            if bad:
                raise RuntimeError(f"runtime.serve: {len(bad)} answers without a verdict: {bad[0].get('error')}")
            how = (f"python -m runtime.serve in its own process ({OPENS_AT_START}), {clients} client "
                   f"thread{'s' * (clients > 1)} here sharing {len(samples)} requests (image uploads, every image "
                   f"equally often), after {ctx.warmup} warm-up requests; sample: answer to answer")
            out[f"server, {clients} client{'s' * (clients > 1)}"] = row(
                how, tier_of_record(answers[-1].get("model", {})), len(samples), samples, cpu_s=cpu,
                peak_rss_mb=peak_rss_mb(proc.pid), fields=counted(answers))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out


# the runner's table: path -> what runs it (each in its own child process: python -m benchmarks.phase path NAME)
PATHS: dict[str, Callable[[Context], Rows]] = {
    "folder": folder,
    "watch": watch,
    "slide": slide,
    "cohort": cohort,
    "serve": serve,
}
