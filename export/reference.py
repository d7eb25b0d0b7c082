"""The seeded, UNTRAINED reference model: reproducible weights for demos, tests and benchmarks.

The project cannot download ImageNet or BreakHis weights, so this model has random (He-initialised) weights and
BatchNorm statistics fitted to seeded synthetic images, which keeps its activations and probabilities in a useful
range. Its verdicts mean nothing; every artefact made from it is labelled ``trained: false``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from export.model import CONTRACT, BreakHisNet, build_model

DEFAULT_SEED = 20161455  # any fixed number; this one is the BreakHis paper's page


def _synthetic_fields(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Smooth, stain-coloured random images, preprocessed per the contract: (n, T, 3, P, P) float64."""
    c = CONTRACT
    h, w = c.field_size
    coarse = rng.uniform(0, 255, size=(n, 3, h // 16 + 1, w // 16 + 1))
    img = np.repeat(np.repeat(coarse, 16, axis=2), 16, axis=3)[:, :, :h, :w]
    img = img + rng.normal(0, 20, size=img.shape)
    img = np.clip(img, 0, 255) - np.asarray(c.mean)[None, :, None, None]
    rows, cols = c.grid
    p = c.patch
    fields = img.reshape(n, 3, rows, p, cols, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, rows * cols, 3, p, p)
    return torch.from_numpy(np.ascontiguousarray(fields))


def _set_bn(bn: nn.BatchNorm1d, x: torch.Tensor) -> None:
    assert bn.running_mean is not None and bn.running_var is not None
    bn.running_mean.copy_(x.mean(0).float())
    bn.running_var.copy_(x.var(0, unbiased=False).float())


@torch.no_grad()
def reference_model(seed: int = DEFAULT_SEED, width: float = 1.0) -> BreakHisNet:
    """Build the reference model from ``seed``; the same seed gives the same weights. ``width`` < 1 narrows the
    convolution stack (export/model.py: block_widths) for a fast model of the same structure."""
    torch.manual_seed(seed)
    model = build_model(width=width)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)  # type: ignore[arg-type]  # VGG convs have biases
        elif isinstance(m, nn.BatchNorm1d):
            nn.init.normal_(m.weight, 1.0, 0.1)
            nn.init.normal_(m.bias, 0.0, 0.1)
    # Fit BatchNorm statistics on synthetic fields, in float64 so that the result does not depend on the
    # machine's float32 summation order (the same seed must give the same weights everywhere).
    fields = _synthetic_fields(np.random.default_rng(seed), 2)
    m64 = model.double()
    enc, head = m64.encoder, m64.head
    pre_bn = torch.relu(enc.dense(enc.vgg16(fields.reshape(-1, 3, CONTRACT.patch, CONTRACT.patch)).mean(dim=(2, 3))))
    _set_bn(enc.bn, pre_bn)
    # Spread the LSTM inputs: treat every patch as its own short sequence too, so the head BN sees varied states.
    seq = enc.bn(pre_bn).reshape(-1, CONTRACT.seq_len, pre_bn.shape[1])
    seqs = torch.cat([seq, seq.flip(1), seq.roll(1, 1), seq.roll(2, 1)])
    _, (h_n, _) = head.lstm(seqs)
    _set_bn(head.bn, torch.cat([h_n[0], h_n[1]], dim=1))
    return model.float().eval()
