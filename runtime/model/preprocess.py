"""CPU preprocessing: BGR uint8 image -> the model's float32 (F, T, 3, P, P) input, vectorised with numpy views (the
contract's arithmetic; every field of a folder's images is runtime/io/fields.py)."""
from __future__ import annotations

import numpy as np

from runtime.model.geometry import FieldPlan, plan_image
from runtime.model.manifest import Contract


def preprocess_fields(bgr: np.ndarray, plan: FieldPlan, contract: Contract,
                      out: np.ndarray | None = None) -> np.ndarray:
    """Cut every patch of every field and normalise it: channel order, minus mean, times scale, NCHW float32.

    Matches the original path (patchify on the RGB image, then Keras ``preprocess_input``) bit for bit: each
    value is float32(pixel) - float32(mean), the subtraction done once in float32.
    """
    p = contract.patch
    t = contract.seq_len
    shape = (plan.n_fields, t, 3, p, p)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {shape}, got {out.dtype} {out.shape}")
    # (H-P+1, W-P+1, 3, P, P) view: every window already in CHW order; gather the patch origins from it.
    windows = np.lib.stride_tricks.sliding_window_view(bgr, (p, p), axis=(0, 1))
    origins = plan.patch_origins()
    patches = windows[origins[:, 0], origins[:, 1]]  # (F*T, 3, P, P) uint8, one copy
    if contract.channel_order == "RGB":
        patches = patches[:, ::-1]
    flat = out.reshape(-1, 3, p, p)
    np.subtract(patches, np.asarray(contract.mean, np.float32)[:, None, None], out=flat, dtype=np.float32)
    if any(s != 1.0 for s in contract.scale):
        flat *= np.asarray(contract.scale, np.float32)[:, None, None]
    return out


def preprocess_image(bgr: np.ndarray, contract: Contract) -> np.ndarray:
    """All fields of a BGR image, default (non-overlapping) tiling."""
    return preprocess_fields(bgr, plan_image(bgr, contract), contract)
