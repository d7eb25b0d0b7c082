"""What the page shows of a result: the classified pixels themselves (any accepted format, orientation applied,
scaled for display), the patches of the most malignant field and their preprocessed versions, as JPEG data URLs."""
from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

import cv2
import numpy as np

from runtime.model.geometry import plan_image
from runtime.model.preprocess import preprocess_fields

DISPLAY_WIDTH = 1600  # wider images are scaled down for the page; field coordinates scale with them


def jpeg(img: np.ndarray, quality: int = 90) -> str:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else ""


def display(bgr: np.ndarray) -> dict[str, Any]:
    """The pixels that were classified, as the page draws them (browsers cannot show TIFF, nor our orientation)."""
    scale = min(1.0, DISPLAY_WIDTH / bgr.shape[1])
    shown = bgr if scale == 1.0 else cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return {"image": jpeg(shown), "scale": scale}


def patch_views(bgr: np.ndarray, result: dict[str, Any], contract: Any) -> dict[str, Any]:
    """The patches of the most malignant field and their preprocessed versions, as images a person can see.
    Preprocessed values (mean-subtracted, in the model's channel order) are stretched to 0..255 per patch."""
    plan = plan_image(bgr, contract)
    best = int(np.argmax([f["probability"] for f in result["fields"]]))
    sub = replace(plan, field_origins=plan.field_origins[best:best + 1], grid=(1, 1))
    pre = preprocess_fields(bgr, sub, contract)[0]  # (T, 3, P, P)
    p = contract.patch
    raw, shown = [], []
    for (y, x), arr in zip(sub.patch_origins(), pre):
        raw.append(jpeg(bgr[y:y + p, x:x + p]))
        hwc = arr.transpose(1, 2, 0)
        if contract.channel_order == "RGB":
            hwc = hwc[:, :, ::-1]  # display as BGR for OpenCV's encoder
        lo, hi = hwc.min(), hwc.max()
        shown.append(jpeg(((hwc - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)))
    return {"field": best, "patches": raw, "preprocessed": shown} | display(bgr)
