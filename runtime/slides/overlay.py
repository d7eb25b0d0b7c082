"""The overlay image: the slide's thumbnail tinted by field probability, with its legend."""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from runtime.slides.fields import SlideField


def colour(p: float | None) -> tuple[int, int, int]:
    """Green (benign) through yellow (0.5) to blue (malignant): blue stands out on H&E's pinks and purples, where a
    red tint on eosin does not."""
    if p is None:
        return 128, 128, 128
    if p <= 0.5:
        return int(255 * 2 * p), 200 + int(55 * 2 * p), 0
    t = 2 * p - 1
    return int(255 * (1 - t)), int(255 - 195 * t), int(255 * t)


LEGEND = 44  # pixels of the legend strip under the overlay


def with_legend(overlay: np.ndarray, aggregate: dict[str, Any]) -> np.ndarray:
    """The overlay with a strip under it: the colour scale of p(malignant), what the outlines mean, and the region's
    verdict (or why there is none)."""
    h, w = overlay.shape[:2]
    width = max(w, 480)
    out = np.full((h + LEGEND, width, 3), 255, np.uint8)
    out[:h, :w] = overlay
    for i in range(160):  # the scale: p 0 .. 1
        r, g, b = colour(i / 159)
        out[h + 6:h + 20, 8 + i] = (b, g, r)
    text = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(out, "p(malignant) 0 .. 1; amber outline: quality flag", (176, h + 18), text, 0.4, (0, 0, 0), 1,
                cv2.LINE_AA)
    verdict = (f"{aggregate['label']} ({aggregate['rule']} = {aggregate['value']:.3f})" if aggregate["label"]
               else aggregate.get("note", "no verdict"))
    chars = max(40, (width - 16) // 8)  # about 8 pixels a character at this size: the note wrapped, never cut
    lines = [verdict[i:i + chars] for i in range(0, len(verdict), chars)]
    out = np.vstack([out, np.full((16 * (len(lines) - 1), width, 3), 255, np.uint8)])
    for k, line in enumerate(lines):
        cv2.putText(out, line, (8, h + 37 + 16 * k), text, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def overlay_image(thumb: np.ndarray, t_down: float, fields: list[SlideField]) -> np.ndarray:
    """The thumbnail with every classified field tinted by its probability, errors crossed, background untouched;
    a field with a quality flag outlined in amber (withheld ones untinted)."""
    tint, out = thumb.copy(), thumb.copy()
    boxes = [(f, (int(f.x / t_down), int(f.y / t_down)),
              (int((f.x + f.width) / t_down) - 1, int((f.y + f.height) / t_down) - 1)) for f in fields]
    for f, a, b in boxes:
        if f.status == "classified":
            r, g, bl = colour(f.probability)
            cv2.rectangle(tint, a, b, (bl, g, r), -1)
        elif f.status == "error":
            cv2.line(out, a, b, (0, 0, 0), 1)
    out = cv2.addWeighted(tint, 0.45, out, 0.55, 0)
    for f, a, b in boxes:
        if f.flags:
            cv2.rectangle(out, a, b, (0, 160, 224), 2)
        elif f.status == "classified":
            cv2.rectangle(out, a, b, (60, 60, 60), 1)
    return out
