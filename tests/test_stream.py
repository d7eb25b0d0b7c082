"""--video: frames of a small video made here from the shared images are classified and annotated."""
from __future__ import annotations

import json

import cv2
import numpy as np

from tests.conftest import run_module


def test_video_is_classified_and_annotated(model_dir, images_100x, tmp_path):
    frames = [cv2.imread(str(p)) for p in images_100x[:3]]
    src = tmp_path / "in.avi"
    w = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"MJPG"), 5, (700, 460))
    for k in range(6):
        w.write(frames[k % 3])
    w.release()
    out = tmp_path / "out.avi"
    proc = run_module("runtime.classify", "--video", str(src), "--out-video", str(out), "--rate", "1000", "--json",
                      "--model", str(model_dir), "--backend", "cpu")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["frames_read"] == 6 and stats["frames_classified"] == 6 and stats["errors"] == 0
    assert stats["read_fps"] > 0
    assert [v["frame"] for v in stats["verdicts"]] == list(range(6))  # each frame's verdict, not only counts
    assert all(v["label"] in ("Benign", "Malignant") and v["error"] is None for v in stats["verdicts"])
    cap = cv2.VideoCapture(str(out))
    got = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        got.append(f)
    assert len(got) == 6
    cap = cv2.VideoCapture(str(src))
    ok, first_in = cap.read()
    diff = np.abs(got[0].astype(int) - first_in.astype(int)).sum(axis=2)
    assert (diff > 60).sum() > 500  # the verdict text and field box were drawn


def test_video_errors(model_dir, tmp_path):
    proc = run_module("runtime.classify", "--video", str(tmp_path / "none.avi"), "--model", str(model_dir))
    assert proc.returncode == 1 and "cannot open" in proc.stderr
    proc = run_module("runtime.classify", "--video", "x.avi", "img.png", "--model", str(model_dir))
    assert proc.returncode == 2 and "one of --camera / --video" in proc.stderr
