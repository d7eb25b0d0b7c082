"""Range-safe FP16: exact power-of-two rescaling of the ReLU convolution chain.

A trained VGG16 without BatchNorm can have activations of any scale (the trained BreakHis model reaches ~3e6 after
its last convolution, float16 ends at 65504). ReLU, max-pool and global average pooling are positively homogeneous,
so scaling convolution k's weights by 2^(s_k - s_(k-1)) and its bias by 2^(s_k) scales its output by exactly 2^(s_k);
the Dense layer after the pooling takes 2^(-s_last). Powers of two are exact in binary floating point, so the FP32
model's outputs do not change, while every convolution output of the calibration fields lands in
(2^(TARGET_LOG2 - 1), 2^TARGET_LOG2]: at least FP16_MAX / 2^TARGET_LOG2 = 32x headroom in float16.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from export.model import BreakHisNet

FP16_MAX = 65504.0
TARGET_LOG2 = 11  # 2^11 = 2048: 32x below float16's maximum, 2^25 above its smallest normal number


@dataclass
class LayerRange:
    """One convolution: calibrated max |output| before and after rescaling, and the headroom left in float16."""

    layer: str
    max_before: float
    shift: int  # output scaled by 2^shift
    max_after: float  # measured on the FP16 variant where it ran, else max_before * 2^shift

    @property
    def headroom(self) -> float:
        return FP16_MAX / self.max_after if self.max_after > 0 else math.inf

    def to_dict(self) -> dict:
        return {"layer": self.layer, "max_before": self.max_before, "shift": self.shift,
                "max_after": self.max_after, "headroom": self.headroom}


def convs(model: BreakHisNet) -> list[tuple[str, nn.Conv2d]]:
    """The convolutions of the VGG16 chain in order, with their module names."""
    return [(f"encoder.vgg16.layers.{i}", m) for i, m in enumerate(model.encoder.vgg16.layers)
            if isinstance(m, nn.Conv2d)]


def plan_shifts(maxima: list[float], target_log2: int = TARGET_LOG2) -> list[int]:
    """The power of two per convolution that brings its calibrated max |output| into (2^(t-1), 2^t]."""
    return [target_log2 - math.ceil(math.log2(m)) if m > 0 else 0 for m in maxima]


@torch.no_grad()
def rescale(model: BreakHisNet, shifts: list[int]) -> BreakHisNet:
    """A copy of ``model`` with convolution k's output scaled by 2^shifts[k] and the Dense layer compensating:
    the same function in exact arithmetic, and in float32 too (powers of two only)."""
    out = copy.deepcopy(model)
    layers = convs(out)
    if len(shifts) != len(layers):
        raise ValueError(f"{len(shifts)} shifts for {len(layers)} convolutions")
    prev = 0
    for (_, conv), s in zip(layers, shifts):
        conv.weight.mul_(2.0 ** (s - prev))
        assert conv.bias is not None  # VGG16 convolutions have biases
        conv.bias.mul_(2.0 ** s)
        prev = s
    out.encoder.dense.weight.mul_(2.0 ** -prev)
    return out
