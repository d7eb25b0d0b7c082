"""The benchmark command runs end to end and writes the documented JSON (its numbers are reported, not checked)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.stats import RATIO_METHOD, NotMeasured, merge, summarise
from tests.conftest import run_module


def test_benchmark_runs_every_path_each_phase_alone_against_the_same_images(model_dir, shared_data, tmp_path):
    """One small run of the runner (2 images, 1 pass): a row for every path the product runs and for each variant,
    each taken in its own process and saying how, every ratio (one round: the ratio of the two means) against the
    right row; the cohorts timed by their slides' span."""
    import importlib.util

    out = tmp_path / "bench.json"
    proc = run_module("benchmarks", "--images", str(shared_data / "breakhis-100x"), "--model", str(model_dir),
                      "--limit", "2", "--rounds", "1", "--repeats", "1", "--warmup", "1", "--variants",
                      "runtime_onnxruntime_cpu,runtime_onnxruntime_cpu_batch4,runtime_onnxruntime_cpu_int8",
                      "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    rows = res["rows"]
    paths = {"folder", "watch burst", "slide", "server, 1 client", "server, 8 clients"}
    cohorts = {"cohort, one process"} | ({"cohort, ray 2 actors"} if importlib.util.find_spec("ray") else set())
    assert paths <= set(rows), sorted(rows)
    assert {"baseline_pytorch_fp32_eager", "runtime_onnxruntime_cpu", "runtime_onnxruntime_cpu_batch4"} <= set(rows)
    assert "no int8 variant" in res["skipped"]["runtime_onnxruntime_cpu_int8"]
    ref = res["image_by_image"]  # the paths' image-by-image row: the per-image row at the tier they ran
    assert rows[ref]["kind"] == "per-image"
    for name, r in rows.items():
        how = r["how"]
        assert "own child process" in how["process"] and how["threads"] > 0 and how["warmup"] == 1, name
        assert r["mean_ms"] > 0 and r["vs_baseline"] > 0, name
        assert r["peak_rss_mb"] is None if "ray" in name else r["peak_rss_mb"] > 40, name  # Ray's actors: elsewhere
        assert abs(r["vs_baseline"] - rows["baseline_pytorch_fp32_eager"]["mean_ms"] / r["mean_ms"]) < 1e-9, name
        if r["kind"] == "path":
            assert r["tier"] == rows[ref]["tier"] and r["image_by_image_row"] == ref, name
            assert abs(r["vs_image_by_image"] - rows[ref]["mean_ms"] / r["mean_ms"]) < 1e-9, name
        if r["samples"]:  # summarised the same way wherever there are per-image samples
            assert r["p95_ms"] >= r["p50_ms"] > 0 and r["spread"] is not None, name
    for name in cohorts:  # the slides' span: within the run's wall time, which has the fixed cost besides
        assert 0 < rows[name]["mean_ms"] * rows[name]["images"] / 1e3 < rows[name]["rounds"][0]["wall_s"], name
    assert rows["slide"]["images"] == 2 and rows["watch burst"]["samples"] == 2  # from the burst in place, 2 images
    for name in ("runtime_onnxruntime_cpu", "folder", "watch burst", "slide", "server, 1 client"):  # timed fields only,
        assert rows[name]["fields_classified"] == 2 and rows[name]["fields_rechecked"] == 0, name  # no warm-up's
    assert rows["server, 8 clients"]["samples"] == 8  # at least one request per client
    assert rows["runtime_onnxruntime_cpu_batch4"]["image_by_image_row"] == "runtime_onnxruntime_cpu"
    fid = rows["runtime_onnxruntime_cpu"]["fidelity"]
    assert fid["precision"] == "fp32" and fid["label_agreement"] == 1.0 and fid["probability_max_abs"] <= 1e-5
    assert fid["label_differences"] == 0 and rows["runtime_onnxruntime_cpu"]["recheck_share"] == 0.0
    stages = rows["runtime_onnxruntime_cpu"]["stages_ms"]
    assert set(stages) == {"decode", "quality", "preprocess", "inference"}  # the quality check's cost reported
    assert rows["baseline_pytorch_fp32_eager"]["vs_baseline"] == 1.0
    assert "vs 1by1" in proc.stdout


def test_a_rechecking_row_warms_its_recheck_up_before_timing_and_counts_its_timed_fields(model_dir, images_100x):
    """At a tier that re-checks (FP16 here), the runner's warm-up ends with the product's own (Classifier.open_recheck:
    the FP32 reference opened and run on one field), so that no timed image pays for opening it; the fields the
    warm-up counted are forgotten; the row's how says what was done. At FP32 there is nothing to warm."""
    from benchmarks.variants import _runtime, warm_recheck

    fast = _runtime(model_dir, 1, backend="cpu", precision="fp16", batch_size=1, decode_workers=1)
    fp32 = _runtime(model_dir, 1, backend="cpu", precision="fp32", batch_size=1, decode_workers=1)
    try:
        for v in (fast, fp32):
            v.run(images_100x[0])
            assert v.fields["classified"] == 1
        assert fast.keep.recheck.reference is None
        assert "FP32 reference opened and run on one field" in warm_recheck(fast)
        assert fast.keep.recheck.reference is not None and fast.fields == {"classified": 0, "rechecked": 0}
        assert warm_recheck(fp32) == "" and fp32.fields == {"classified": 0, "rechecked": 0}
    finally:
        fast.keep.close()
        fp32.keep.close()


def test_the_report_says_how_many_fields_were_rechecked():
    """The re-checked column: the share and how many of how many timed fields, where the row counted them."""
    from benchmarks.report import _rechecked

    assert _rechecked({"recheck_share": 3 / 64, "fields_rechecked": 3, "fields_classified": 64}) == "4.7% (3 of 64)"
    assert _rechecked({"recheck_share": None}) == "-" and _rechecked({"recheck_share": 0.5}) == "50.0%"
    r = merge([{**_raw([0.1, 0.2]), "fields": {"classified": 2, "rechecked": 1}},
               {**_raw([0.1, 0.2]), "fields": {"classified": 2, "rechecked": 0}}])
    assert (r["fields_classified"], r["fields_rechecked"], r["recheck_share"]) == (4, 1, 0.25)


def test_performance_doc_tables_are_what_the_committed_json_makes():
    """docs/performance.md's generated section equals what benchmarks.report makes from the committed JSON."""
    from benchmarks import report

    doc = report.DOC.read_text()
    assert report.BEGIN in doc and report.END in doc
    assert report.render(doc, report.generated()) == doc, "run: python -m benchmarks.report --write"
    first = json.loads(report.FIRST.read_text())
    for name, r in first["rows"].items():  # every row of the committed run is in the doc, with its mean
        assert f"| {name} | {r['kind']} |" in doc and f"| {r['mean_ms']:.1f} |" in doc


def test_report_compares_two_runs_ratio_by_ratio(tmp_path):
    """--compare prints each ratio in both runs and how much they differ (a run 10 % faster on one row shows 10 %)."""
    from benchmarks import report

    a = json.loads(report.FIRST.read_text())
    b = json.loads(report.FIRST.read_text())
    name = next(n for n, r in b["rows"].items() if r["vs_image_by_image"])
    b["rows"][name]["vs_image_by_image"] *= 1.1
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    proc = run_module("benchmarks.report", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert proc.returncode == 1  # 10 % is not ~5 %: the runs do not agree
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(name) and "vs_image_by_image" in ln)
    assert line.split()[-1] == "10.0%"
    assert "largest difference of a ratio 10.0%" in proc.stdout and "do not agree" in proc.stdout
    assert report.agreement(a, a)[0]  # the same run agrees with itself, but not with one whose ratios are made
    other = a | {"ratio_method": "something else"}  # another way, however close the figures
    ok, why = report.agreement(a, other)
    assert not ok and "not computed alike" in why


def test_summaries_refuse_nan_and_empty_samples():
    """A NaN or inf time is an error, never a figure."""
    for bad in ([0.1, float("nan")], [float("inf")], []):
        with pytest.raises(ValueError):
            summarise(bad)
    with pytest.raises(ValueError):
        summarise([], 4, float("nan"))
    assert summarise([0.1, 0.3])["mean_ms"] == 200.0


def test_rounds_merge_into_one_row_summarised_over_all_samples():
    """Each round is a fresh process; a row is every round's samples together, its CPU time over all its images."""
    def raw(samples, cpu, rss, **kw):
        return {"how": "h", "tier": {"backend": "b"}, "images": len(samples), "samples_s": samples, "net_s": None,
                "cpu_s": cpu, "peak_rss_mb": rss, "round": kw}

    r = merge([raw([0.1, 0.2], 0.4, 300.0, first=1), raw([0.3, 0.4], 0.8, 350.0, first=2)])
    assert r["samples"] == 4 and r["images"] == 4 and abs(r["mean_ms"] - 250.0) < 1e-9
    assert abs(r["cpu_ms"] - 300.0) < 1e-9 and r["peak_rss_mb"] == 350.0 and r["how"]["rounds"] == 2
    assert r["rounds"] == [{"first": 1}, {"first": 2}]
    whole = merge([{**raw([], 0.5, None), "images": 4, "net_s": 2.0}, {**raw([], None, None), "images": 4,
                                                                       "net_s": 6.0}])
    assert whole["mean_ms"] == 1000.0 and whole["p50_ms"] is None and whole["cpu_ms"] is None


def _raw(samples, net_s=None, images=None):
    """A phase's raw row for one round, as benchmarks/paths.row makes it."""
    return {"how": "h", "tier": {"backend": "b"}, "images": len(samples) if images is None else images,
            "samples_s": samples, "net_s": net_s, "cpu_s": 1.0, "peak_rss_mb": None, "round": {}}


def test_ratios_are_paired_by_round_symmetric_and_robust_to_one_slowed_phase():
    """Each round's ratio is of that round's two means; the row's ratio is the median of the forward rounds' and that
    of the reversed rounds', weighing half each: a machine 2x slower from round to round leaves a steady 2x at 2x,
    A against B is 1 / B against A, a phase slowed 30 % in one of 6 rounds does not move it (with 2 rounds a
    direction it does: a median of two is their mean, and the range shows it), and rounds that cannot be paired
    (different counts, a round without samples) give no ratio rather than a wrong one."""
    from benchmarks.stats import ratio, round_ratios

    base = merge([_raw([0.2, 0.2]), _raw([0.4, 0.4]), _raw([0.8, 0.8])])
    row = merge([_raw([0.1, 0.1]), _raw([0.2, 0.2]), _raw([0.4, 0.4])])
    assert base["round_means_ms"] == pytest.approx([200.0, 400.0, 800.0])
    assert round_ratios(base, row) == pytest.approx([2.0, 2.0, 2.0]) and ratio(base, row) == pytest.approx(2.0)
    a = merge([_raw([0.1])] * 4)
    b = merge([_raw([0.05]), _raw([0.05]), _raw([0.1]), _raw([0.1])])
    assert ratio(a, b) == pytest.approx(2 ** 0.5) and ratio(a, b) * ratio(b, a) == pytest.approx(1.0)
    disturbed = merge([_raw([0.2, 0.2]), _raw([0.2, 0.2]), _raw([0.6, 0.6])])
    steady = merge([_raw([0.1, 0.1])] * 3)
    assert round_ratios(disturbed, steady) == pytest.approx([2.0, 2.0, 6.0])
    assert ratio(disturbed, steady) == pytest.approx((2.0 * 6.0) ** 0.25 * 2.0 ** 0.5)  # rounds 1, 3 and 2 halves
    slowed = merge([_raw([0.05])] * 2 + [_raw([0.065])] + [_raw([0.05])] * 3)  # round 3: a phase 30 % slower
    assert ratio(a6 := merge([_raw([0.1])] * 6), slowed) == pytest.approx(2.0)
    assert min(round_ratios(a6, slowed)) == pytest.approx(0.1 / 0.065)
    whole = merge([_raw([], 1.0, 2), _raw([], 3.0, 2)])  # timed whole: a round's net time over its images
    assert whole["round_means_ms"] == pytest.approx([500.0, 1500.0])
    assert ratio(merge([_raw([0.2, 0.2])] * 2), row) is None and ratio(None, row) is None
    with pytest.raises(NotMeasured, match="no samples in round 2"):
        merge([_raw([0.1]), _raw([], images=1)])


@pytest.mark.parametrize("rounds", [2, 3, 4, 5, 6])
def test_a_steady_drift_of_the_machine_leaves_every_ratio_where_it_is(monkeypatch, rounds):
    """The runner's arithmetic with phases standing in for the timed ones (each phase's samples are its true cost
    times the machine's speed, 1 % slower per phase run): every path truly costs what the runtime image by image
    costs, at a tier no per-image row of the chosen variants has, so the runner adds the image-by-image row at
    `auto`'s tier to the rounds. Every ratio comes out at its true value within 0.5 % (it did not when that row ran
    after the rounds: 1.14x instead of 1.00x at 4 rounds), and that row ran once per round, in the rounds."""
    import argparse
    import itertools

    import benchmarks.__main__ as runner
    from benchmarks.variants import RUNTIME_AUTO

    true_ms = {"baseline_pytorch_fp32_eager": 1400, "runtime_onnxruntime_cpu": 900, RUNTIME_AUTO: 500, "folder": 500,
               "watch burst": 500, "server, 1 client": 500, "server, 8 clients": 500}
    produces = {"serve": ["server, 1 client", "server, 8 clients"], "watch": ["watch burst"]}
    clock, calls = itertools.count(), []

    def phase(spec):
        speed = 1 + 0.01 * next(clock)
        calls.append(spec["name"])
        out = {}
        for name in produces.get(spec["name"], [spec["name"]]):
            tier = {"backend": name.split("_")[0] if name.startswith(("baseline", "runtime_onnx")) else "bf16"}
            out[name] = {"how": "h", "tier": tier, "images": 4, "samples_s": [true_ms[name] * speed / 1e3] * 4,
                         "net_s": None, "cpu_s": 1.0, "peak_rss_mb": 1.0, "round": {}, "fields": {}}
        return out

    monkeypatch.setattr(runner, "run_phase", phase)
    args = argparse.Namespace(suite="cpu", variants="runtime_onnxruntime_cpu", model="m", threads=2, repeats=1,
                              warmup=1, fp16_tflops=None, rounds=rounds, as_jpeg=None)
    res = runner.one_run(args, [], [], ["folder", "watch", "serve"], {"cpu": "c", "cores": 2, "gpu": None})
    rows = res["rows"]
    assert calls.count(RUNTIME_AUTO) == rounds and res["image_by_image"] == RUNTIME_AUTO
    for name, r in rows.items():
        assert r["vs_baseline"] == pytest.approx(1400 / true_ms[name], rel=5e-3), name
        if r["kind"] == "path":
            assert r["vs_image_by_image"] == pytest.approx(1.0, rel=5e-3), name
            assert len(r["vs_image_by_image_rounds"]) == rounds
    assert res["ratio_method"] == RATIO_METHOD


def test_the_servers_clients_send_every_image_equally_often():
    """8 clients and 12 images: each image once (4 clients send 2, 4 send 1); 2 images: each 4 times, every client
    one. Sending some images more often than others (12 // 8 = 1 each sent 8 of the 12) made the 8-client row
    re-check another share of its fields than the other rows."""
    from collections import Counter

    from benchmarks.paths import shares

    for n, clients, each in ((12, 8, 1), (2, 8, 4), (16, 8, 1), (12, 1, 1)):
        images = [Path(f"{i}.png") for i in range(n)]
        dealt = shares(images, clients)
        assert len(dealt) == clients and all(dealt), (n, clients)
        assert Counter(p for d in dealt for p in d) == {p: each for p in images}, (n, clients)


def test_watch_burst_is_measured_from_the_burst_in_place_like_the_other_paths(model_dir, shared_data, tmp_path):
    """The real runtime.watch, a burst of one image: one sample (not none), from the moment the burst's files are in
    place to its record, as the folder and server rows count from the start of their pass; images == samples."""
    from benchmarks.paths import Context, watch

    image = min((shared_data / "breakhis-100x").glob("*.png"))
    r = watch(Context(model_dir, [image], threads=1, repeats=1, warmup=1, tmp=tmp_path))["watch burst"]
    assert r["images"] == len(r["samples_s"]) == 1 and r["samples_s"] == r["round"]["first_result_s"]
    assert "the first from the moment the burst's files are in place" in r["how"]
    assert merge([r])["samples"] == 1


def test_a_row_without_samples_is_not_measured_not_a_crash():
    """A watch burst of one image once gave no sample: merging its rounds must say so (the runner reports the row
    as skipped with the reason and keeps the others), never raise a TypeError that loses the run."""
    with pytest.raises(NotMeasured, match="no samples"):
        merge([_raw([], images=1), _raw([], images=1)])


def test_a_net_time_that_is_not_positive_is_never_averaged_in():
    """Cohort rounds of -0.5 s and 2.5 s over 2 images each once read "500 ms per image": a round whose net time
    (wall less the fixed cost) is not positive is not a measurement, and the row is refused, naming the round."""
    with pytest.raises(NotMeasured, match=r"round 1: -0\.500 s"):
        merge([_raw([], -0.5, 2), _raw([], 2.5, 2)])
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(NotMeasured, match="round 2"):
            merge([_raw([], 1.0, 2), _raw([], bad, 2)])
    assert merge([_raw([], 1.0, 2), _raw([], 3.0, 2)])["mean_ms"] == 1000.0


def test_each_path_is_compared_with_the_image_by_image_row_of_its_own_tier():
    """Two paths at two tiers: each against the per-image row of its own tier, never one shared reference; a path
    whose tier has no per-image row has none (and the run's note says so, which the tables print)."""
    from benchmarks.__main__ import same_tier_rows
    from benchmarks.report import table

    bf16, fp32, int8 = ({"backend": "openvino-cpu-bf16"}, {"backend": "onnxruntime-cpu-fp32"},
                        {"backend": "onnxruntime-cpu-int8"})
    rows = {"base": {"kind": "per-image", "tier": {"backend": "pytorch"}}, "ort": {"kind": "per-image", "tier": fp32},
            "ov": {"kind": "per-image", "tier": bf16}, "folder": {"kind": "path", "tier": fp32},
            "watch burst": {"kind": "path", "tier": bf16}, "slide": {"kind": "path", "tier": int8},
            "ort batch4": {"kind": "folder", "tier": fp32}}
    assert same_tier_rows(rows) == {"folder": "ort", "watch burst": "ov", "slide": None, "ort batch4": "ort"}
    result = {"machine": {"gpu": None, "cpu": "c", "cores": 2}, "images": 1, "repeats": 1, "rounds": 1, "threads": 2,
              "load_average_1min": {"start": 0.0, "end": 0.0}, "rows": {}, "skipped": {},
              "note": "no image-by-image row at the tier of slide"}
    assert "note: no image-by-image row at the tier of slide" in table(result)


def test_a_row_in_one_run_only_is_a_disagreement(tmp_path):
    """Two runs where a row ran in one only: the comparison lists it and the runs do not agree (exit 1), even
    where every ratio they share is equal."""
    from benchmarks import report

    a = json.loads(report.FIRST.read_text())
    b = json.loads(report.FIRST.read_text())
    gone = next(n for n, r in b["rows"].items() if r["kind"] == "path")
    del b["rows"][gone]
    assert report.one_run_only(a, b) == [f"{gone} (in run 1 only)"]
    assert report.agreement(a, a)[0] and not report.agreement(a, b)[0]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    proc = run_module("benchmarks.report", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert proc.returncode == 1 and f"{gone} (in run 1 only)" in proc.stdout and "do not agree" in proc.stdout
    assert f"{gone} (in run 1 only)" in report.compare_markdown(a, b)


def test_doc_is_made_from_the_run_just_made(tmp_path, capsys):
    """--doc needs the run's own --json (never the committed one), and a run of its own ignores an older run 2
    lying beside it instead of showing it as "the same command again"."""
    from benchmarks import report
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit):
        main(["--images", str(tmp_path / "none"), "--doc"])
    assert "--doc needs --json" in capsys.readouterr().err
    first = tmp_path / "run.json"
    first.write_text(report.FIRST.read_text())
    stale = json.loads(report.FIRST.read_text()) | {"date": "1999-01-01"}
    report.second_path(first).write_text(json.dumps(stale))
    assert "1999-01-01" in report.generated(first)  # beside it, read as run 2 where asked for
    alone = report.generated(first, single=True)
    assert "1999-01-01" not in alone and "The same command again" not in alone and "Second run: none" in alone


def test_device_check_dry_run_plans_every_gpu_step(tmp_path):
    """The one-command GPU check, without a GPU: the plan holds every step and each command it would run exists."""
    proc = run_module("benchmarks.device_check", "--dry-run", "--out", str(tmp_path / "device"))
    summary = json.loads(proc.stdout)
    steps = [s["step"] for s in summary["steps"]]
    for want in ("tests-gpu", "verify-onnxruntime-cuda-fp16", "verify-onnxruntime-cuda-fp32", "verify-tensorrt-fp16",
                 "verify-onnxruntime-cuda-fp16-nhwc", "bench-gpu", "bench-gpu-jpeg", "bench-kernel", "bench-slide",
                 "bench-decode", "bench-decode-jpeg"):
        assert want in steps
    assert all(s["rc"] == 0 for s in summary["steps"]), summary
    assert proc.returncode == 0 and "gpu" in summary["machine"]
    assert not (tmp_path / "device").exists()  # a dry run writes no results


def test_slide_benchmark_reports_rate_and_mask_savings(model_dir, shared_data, tmp_path):
    out = tmp_path / "slide.json"
    proc = run_module("benchmarks.slide", "--images", str(shared_data / "breakhis-100x"), "--model", str(model_dir),
                      "--backend", "cpu", "--rows", "2", "--cols", "3", "--tissue", "0.5", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    on, off = res["runs"]["mask on"], res["runs"]["mask off"]
    assert off["classified"] == 6 and on["classified"] == res["region"]["tissue_fields"]
    assert res["mask_savings"]["fields_skipped"] == 6 - on["classified"] and on["classified_fields_per_s"] > 0


def test_decode_benchmark_reports_every_decoder_and_thread_count(shared_data, tmp_path):
    out = tmp_path / "decode.json"
    proc = run_module("benchmarks.decode", "--images", str(shared_data / "breakhis-100x"), "--workers", "1", "2",
                      "--repeats", "1", "--as-jpeg", "90", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["decoder"], r["threads"]) for r in rows} == \
        {(d, w) for d in ("runtime", "opencv_imdecode", "opencv_under_stderr_lock") for w in (1, 2)}
    assert result["format"] == "JPEG quality 90 copies"
    assert all(r["images_per_s"] > 0 for r in rows) and "images/s" in proc.stdout
