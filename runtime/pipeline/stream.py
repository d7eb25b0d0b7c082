"""A camera or video stream classified at a target rate, written back annotated (verdict, per-field boxes): the
capture loop below `python -m runtime.classify --camera` and `--video` (runtime/apps/classify.py)."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

GREEN, RED, AMBER = (84, 135, 25), (69, 53, 220), (0, 160, 224)  # BGR


@dataclass
class StreamStats:
    frames_read: int = 0
    frames_classified: int = 0
    errors: int = 0
    flagged: int = 0  # frames with a quality flag
    rechecked: int = 0  # fields re-checked at FP32 (borderline under a faster precision)
    seconds: float = 0.0
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # one per classified frame

    def summary(self) -> dict[str, Any]:
        s = max(self.seconds, 1e-9)
        return {"frames_read": self.frames_read, "frames_classified": self.frames_classified, "errors": self.errors,
                "flagged_frames": self.flagged, "rechecked_fields": self.rechecked,
                "read_fps": self.frames_read / s, "classified_fps": self.frames_classified / s}


def annotate(frame: np.ndarray, result: Any, positive: str) -> np.ndarray:
    """Draw each field's box and score and the image verdict onto a copy of the frame; fields and verdicts with
    the contract's ``positive`` label (its labels[1]) in red."""
    out = frame.copy()
    if result.error:
        cv2.putText(out, result.error[-80:], (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.6, RED, 2)
        return out
    for f in result.fields:
        color = AMBER if f.label is None else RED if f.label == positive else GREEN
        cv2.rectangle(out, (f.x, f.y), (f.x + f.width - 1, f.y + f.height - 1), color, 2)
        cv2.putText(out, f"{f.probability:.2f}", (f.x + 6, f.y + 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, color, 2)
    color = RED if result.label == positive else GREEN
    cv2.putText(out, f"{result.label} {result.probability:.3f}", (10, out.shape[0] - 12),
                cv2.FONT_HERSHEY_SIMPLEX, 0.9, color, 2)
    for i, line in enumerate(result.advice):  # the quality check: what to do, at the top of the frame
        cv2.putText(out, line[:70], (10, 30 + 28 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.7, AMBER, 2)
    return out


def run_stream(clf: Any, source: int | str, rate: float, out_path: Path | None = None,
               max_frames: int | None = None, show: bool = False) -> StreamStats:
    """Read frames as fast as they come; classify at most `rate` frames per second (the latest frame wins), and
    write every frame with the latest verdict drawn on it."""
    for path in (source, out_path):  # OpenCV takes paths as UTF-8 and crashes on other bytes
        if isinstance(path, (str, Path)) and not _utf8(str(path)):
            raise RuntimeError(f"{os.fsencode(path)!r}: OpenCV's video I/O cannot open a path that is not valid "
                               "UTF-8; rename the file")
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise RuntimeError(f"cannot open {'camera ' if isinstance(source, int) else ''}{source}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    writer = None
    stats, last, result = StreamStats(), -1e9, None
    t0 = time.perf_counter()
    try:
        while max_frames is None or stats.frames_read < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            stats.frames_read += 1
            now = time.perf_counter()
            if now - last >= 1.0 / rate:
                (result,) = clf.classify([frame])
                last = now
                stats.frames_classified += 1
                stats.errors += result.error is not None
                stats.rechecked += result.rechecked
                stats.flagged += bool(result.advice)
                stats.verdicts.append({"frame": stats.frames_read - 1, "time_s": round(now - t0, 3),
                                       "label": result.label, "probability": result.probability,
                                       "error": result.error, "advice": result.advice})
            shown = annotate(frame, result, clf.contract.labels[1]) if result is not None else frame
            if out_path is not None:
                if writer is None:
                    fourcc = cv2.VideoWriter.fourcc(*("mp4v" if out_path.suffix == ".mp4" else "MJPG"))
                    writer = cv2.VideoWriter(str(out_path), fourcc, fps, (frame.shape[1], frame.shape[0]))
                writer.write(shown)
            if show:
                cv2.imshow("breakhis-edge", shown)
                if cv2.waitKey(1) & 0xFF in (27, ord("q")):
                    break
    finally:
        stats.seconds = time.perf_counter() - t0
        cap.release()
        if writer is not None:
            writer.release()
    print(f"{stats.frames_read} frames read, {stats.frames_classified} classified, "
          f"{stats.summary()['read_fps']:.1f} frames/s", file=sys.stderr)
    return stats


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
