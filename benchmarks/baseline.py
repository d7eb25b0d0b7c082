"""The baseline: the original system's path, re-created in PyTorch FP32 eager.

Per image: read as RGB, ``patchify(img, (224, 224, 3), step=224)``, then Keras ``vgg16.preprocess_input`` applied
patch by patch (RGB -> BGR, per-channel mean subtraction in float32, as Keras's numpy code does it), then the
model in eager mode on that image's patches. Contract values come from the model's manifest, as everywhere.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from patchify import patchify

from export.weights import load_checkpoint
from runtime.model.model_dir import ModelDir


class Baseline:
    def __init__(self, model_dir: Path | str, threads: int | None = None, device: str = "cpu") -> None:
        self.manifest = ModelDir.open(model_dir).manifest
        self.contract = self.manifest.contract
        ckpt = self.manifest.provenance.checkpoint
        if not ckpt:
            raise FileNotFoundError(f"{model_dir}: manifest names no PyTorch checkpoint for the baseline")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("this PyTorch build has no CUDA device (install a CUDA build of torch on the GPU box)")
        self.device = torch.device(device)
        self.model = load_checkpoint(Path(model_dir) / ckpt).to(self.device)
        if threads:
            torch.set_num_threads(threads)

    def preprocess(self, path: Path | str) -> np.ndarray:
        """(1 field, T, 3, P, P) float32 for the top-left field, the way the original code made it."""
        c = self.contract
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{path}: cannot read image")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        grid = patchify(rgb, (c.patch, c.patch, 3), step=c.stride)
        rows, cols = c.grid
        out = []
        for r in range(rows):
            for col in range(cols):
                x = grid[r, col, 0].astype(np.float32)
                if c.channel_order == "BGR":
                    x = x[..., ::-1]
                for ch in range(3):
                    x[..., ch] -= c.mean[ch]
                out.append(x.transpose(2, 0, 1))
        return np.stack(out)[None]

    @torch.no_grad()
    def infer(self, fields: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(fields)).to(self.device)
        return self.model(x)[1].cpu().numpy().reshape(-1)  # .cpu() waits for the GPU

    def classify(self, path: Path | str) -> float:
        return float(self.infer(self.preprocess(path))[0])
