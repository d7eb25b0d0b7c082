"""python -m runtime.watch for real: files written slowly in pieces, a corrupt file among good ones, and a restart
in the middle (no result lost, none done twice)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO


def start(model_dir, folder, out, idle=None):
    args = [sys.executable, "-m", "runtime.watch", str(folder), "--results", str(out), "--model", str(model_dir),
            "--backend", "cpu", "--interval", "0.1", "--settle", "0.6"]
    if idle is not None:
        args += ["--exit-when-idle", str(idle)]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lines(out):
    return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []


def wait_for(pred, timeout=90):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("fmt", ["jsonl"])
def test_slow_writes_corrupt_file_and_restart(model_dir, images_100x, tmp_path, fmt):
    inbox, out = tmp_path / "inbox", tmp_path / f"results.{fmt}"
    inbox.mkdir()
    good = [p.read_bytes() for p in images_100x[:3]]
    proc = start(model_dir, inbox, out)
    try:
        # 1: written in three pieces with pauses shorter than --settle: must be read only once complete
        with open(inbox / "a.png", "wb") as f:
            for k in range(3):
                f.write(good[0][k * len(good[0]) // 3:(k + 1) * len(good[0]) // 3])
                f.flush()
                time.sleep(0.3)
        (inbox / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        assert wait_for(lambda: len(lines(out)) >= 2)
    finally:
        proc.send_signal(signal.SIGKILL)  # crash, not a clean stop
        proc.wait()
    first = {r["path"]: r for r in lines(out)}
    assert first[str(inbox / "a.png")]["error"] is None
    assert "bad.png" in first[str(inbox / "bad.png")]["error"]
    # 2: more files arrive while it is down; on restart only those are done
    (inbox / "b.png").write_bytes(good[1])
    (inbox / "c.png").write_bytes(good[2])
    proc = start(model_dir, inbox, out, idle=3)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "2 already done" in err
    rows = lines(out)
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(str(inbox / n) for n in ("a.png", "bad.png", "b.png", "c.png"))  # no duplicates
    by = {r["path"]: r for r in rows}
    assert by[str(inbox / "b.png")]["label"] in ("Benign", "Malignant")


def test_csv_output_and_torn_last_line(model_dir, images_100x, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "results.csv"
    inbox.mkdir()
    (inbox / "a.png").write_bytes(images_100x[0].read_bytes())
    proc = start(model_dir, inbox, out, idle=2)
    proc.communicate(timeout=120)
    text = out.read_text().splitlines()
    assert text[0].startswith("path,label,probability") and len(text) == 2 and "a.png" in text[1]
    with open(out, "a") as f:
        f.write(str(inbox / "b.png")[:10])  # a crash mid-line leaves a fragment; it must not count as done
    (inbox / "b.png").write_bytes(images_100x[1].read_bytes())
    (inbox / "text.png").write_bytes(b"not an image")
    proc = start(model_dir, inbox, out, idle=2)
    proc.communicate(timeout=120)
    assert proc.returncode == 1  # as every command: an input without a verdict
    import csv

    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [r["path"] for r in rows if r["label"]] == [str(inbox / "a.png"), str(inbox / "b.png")]
    # every row names the model and precision that made it, and carries the image's warnings
    assert text[0].endswith(",warnings,model,withheld") and all("@" in r["model"] for r in rows if r["finished_at"])


def _writer(path, data: bytes, pause: float, pieces: int = 2):
    """A real writer process: writes ``data`` to ``path`` in pieces with ``pause`` seconds between them."""
    code = ("import sys, time\n"
            "data = sys.stdin.buffer.read(); n = int(sys.argv[2]); pause = float(sys.argv[3])\n"
            "with open(sys.argv[1], 'wb') as f:\n"
            "    for k in range(n):\n"
            "        f.write(data[k * len(data) // n:(k + 1) * len(data) // n]); f.flush()\n"
            "        if k < n - 1: time.sleep(pause)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(path), str(pieces), str(pause)], stdin=subprocess.PIPE)
    p.stdin.write(data)
    p.stdin.close()
    return p


def test_a_writer_pausing_beyond_settle_and_a_reused_name_are_classified_again(model_dir, images_100x, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "results.jsonl"
    inbox.mkdir()
    proc = start(model_dir, inbox, out)
    try:  # the writer starts once the watch does (a start-up slower than its pause would see only the whole file)
        said = iter(proc.stderr.readline, "")
        assert any(line.startswith("watching") for line in said)
        w = _writer(inbox / "slow.png", images_100x[0].read_bytes(), pause=2.5)  # --settle is 0.6
        assert wait_for(lambda: len(lines(out)) >= 1)  # the half-written file, seen as settled
        w.wait()
        assert wait_for(lambda: len(lines(out)) >= 2)  # ... and the finished file, read again
        first, second = lines(out)
        assert first["error"] is not None and second["error"] is None
        assert second["supersedes"] == first["sha256"] and second["size"] == images_100x[0].stat().st_size
        (inbox / "slow.png").write_bytes(images_100x[1].read_bytes())  # capture software reuses the name
        assert wait_for(lambda: len(lines(out)) >= 3)
        third = lines(out)[2]
        assert third["error"] is None and third["supersedes"] == second["sha256"] != third["sha256"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_undecodable_names_survive_csv_and_restarts_under_another_spelling(model_dir, images_100x, tmp_path):
    """A Latin-1 name (not UTF-8) in the CSV output: recorded byte for byte, read back on restart, and a restart
    naming the folder by a relative path redoes nothing."""
    inbox, out = tmp_path / "inbox", tmp_path / "results.csv"
    inbox.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # what the file system gives Python for these bytes
    (inbox / name).write_bytes(images_100x[0].read_bytes())
    (inbox / "plain.png").write_bytes(images_100x[1].read_bytes())
    proc = start(model_dir, inbox, out, idle=2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    raw = out.read_bytes()
    assert b"caf\xe9.png" in raw and raw.count(b"\n") == 3  # header + 2 records, the name's bytes as they are
    rel = os.path.relpath(inbox, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "runtime.watch", rel, "--out", str(out), "--model", str(model_dir),
                             "--backend", "cpu", "--interval", "0.1", "--settle", "0.6", "--exit-when-idle", "2"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "(2 already done)" in err and out.read_bytes() == raw  # nothing redone under the other spelling


def test_slides_dropped_into_the_folder_go_through_the_slide_path(model_dir, images_100x, tmp_path):
    from benchmarks.synthetic_slide import write_mosaic

    inbox, out, slides = tmp_path / "inbox", tmp_path / "results.jsonl", tmp_path / "slides"
    inbox.mkdir()
    write_mosaic(tmp_path / "m.tif", [[images_100x[2], None, images_100x[9]]], levels=2)
    (inbox / "m.svs").write_bytes((tmp_path / "m.tif").read_bytes())  # every suffix the slide path reads is seen
    (tmp_path / "m.tif").rename(inbox / "m.tif")
    (inbox / "single.png").write_bytes(images_100x[0].read_bytes())
    proc = subprocess.run([sys.executable, "-m", "runtime.watch", str(inbox), "--out", str(out), "--model",
                           str(model_dir), "--backend", "cpu", "--interval", "0.1", "--settle", "0.3",
                           "--exit-when-idle", "2", "--slides", str(slides)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    recs = {os.path.basename(r["path"]): r for r in lines(out)}
    slide, single = recs["m.tif"], recs["single.png"]
    assert slide["error"] is None and slide["slide"]["counts"]["classified"] == 2
    assert recs["m.svs"]["error"] is None and recs["m.svs"]["fields"] == slide["fields"]
    assert slide["slide"]["aggregate"]["rule"] == "max" and slide["probability"] == max(
        f["probability"] for f in slide["fields"])
    made = sorted(p.name for p in slides.iterdir())
    stems = [f"m.svs.{slide['sha256'][:12]}", f"m.tif.{slide['sha256'][:12]}"]
    assert made == sorted(f"{stem}{s}" for stem in stems for s in (".csv", ".geojson", ".json", ".overlay.png",
                                                                              ".probability.ome.tif"))
    assert single["error"] is None and len(single["fields"]) == 1 and "slide" not in single


def test_without_slides_a_slide_file_is_named_once_and_not_waited_for(model_dir, images_100x, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "results.jsonl"
    inbox.mkdir()
    (inbox / "scan.svs").write_bytes(b"II*\x00" + bytes(100))
    (inbox / "single.png").write_bytes(images_100x[0].read_bytes())
    proc = start(model_dir, inbox, out, idle=1.5)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert [os.path.basename(r["path"]) for r in lines(out)] == ["single.png"]
    assert err.count("'scan.svs': a slide format") == 1 and "--slides DIR" in err


class _Answers:
    """Stands in for the classifier (the watcher's bookkeeping is under test): one answer per input, at once."""

    def open_recheck(self):
        pass  # nothing is re-checked here

    def classify_iter(self, items):
        from runtime.pipeline.results import Result

        for item in items:
            yield Result(path=item.name, label="Benign", probability=0.1, error=item.error)


def test_a_touched_unchanged_file_and_a_vanished_one_leave_nothing_pending(images_100x, tmp_path):
    from runtime.watchfolder.watcher import Watcher

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    a, b = inbox / "a.png", inbox / "b.png"
    a.write_bytes(images_100x[0].read_bytes())
    w = Watcher(inbox, tmp_path / "out.jsonl", _Answers(), settle=0.05)
    w.ready()
    time.sleep(0.1)
    assert w.poll() == 1 and not w.seen
    os.utime(a, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, bytes unchanged
    b.write_bytes(b"half a capt")  # seen once, then gone before it settled
    w.ready()
    b.unlink()
    time.sleep(0.1)
    assert w.poll() == 0  # nothing new to record: a's bytes are the ones already classified
    assert not w.seen, w.seen  # so --exit-when-idle can end, and the set does not grow
    for i in range(50):  # names that come and go never accumulate
        (inbox / f"tmp{i}.png").write_bytes(b"x")
        w.ready()
        (inbox / f"tmp{i}.png").unlink()
    w.ready()
    assert not w.seen


def test_the_watch_opens_its_rechecks_reference_at_start(model_dir, tmp_path):
    """A long-running service: at a tier that re-checks borderline fields (FP16 here), the watcher opens the FP32
    reference of the re-checks when it starts, before any capture arrives, instead of on the first borderline one."""
    from runtime.pipeline.classifier import Classifier
    from runtime.watchfolder.watcher import Watcher

    with Classifier(model_dir, backend="cpu", precision="fp16") as clf:
        assert clf.recheck is not None and clf.recheck.reference is None  # a classifier alone opens it on first need
        Watcher(tmp_path, tmp_path / "out.jsonl", clf, settle=0.05)
        assert clf.recheck.reference is not None and clf.recheck.fields == 0
