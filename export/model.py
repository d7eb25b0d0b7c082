"""The VGG16-BiLSTM classifier in PyTorch, layer for layer the original Keras system; no I/O here.

Keras original: VGG16(include_top=False) -> GlobalAveragePooling2D -> Dense(512, relu) -> BatchNormalization
per 224x224 patch, then Bidirectional(LSTM(500)) -> BatchNormalization -> Dense(1, sigmoid) over the patches of
one field. Keras BatchNormalization (inference) is y = gamma * (x - mean) / sqrt(var + eps) + beta, which is
PyTorch's eval-mode BatchNorm; Keras LSTM gates (i, f, c, o) are PyTorch's (i, f, g, o).
"""
from __future__ import annotations

import torch
from torch import nn

from runtime.model.manifest import Contract

# The preprocessing contract of the original system: the one place these values are typed. The export stage
# writes it into every model artefact; everything downstream reads it from there.
CONTRACT = Contract(
    patch=224,
    stride=224,
    grid=(2, 3),
    channel_order="BGR",  # Keras vgg16.preprocess_input ("caffe" mode): RGB -> BGR
    mean=(103.939, 116.779, 123.68),  # ImageNet BGR means, subtracted without scaling
    scale=(1.0, 1.0, 1.0),
    threshold=0.5,
    labels=("Benign", "Malignant"),
    magnification=100.0,  # BreakHis 100X fields; their microns per pixel are not stated by the dataset here
)

FEATURES = 512  # Dense(512) after global average pooling
LSTM_UNITS = 500  # per direction
BN_EPS = 1e-3  # Keras BatchNormalization default
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def block_widths(width: float = 1.0) -> tuple[tuple[int, ...], ...]:
    """VGG16's convolution widths, scaled by ``width`` (1 = VGG16; the narrow test model uses 1/8: same layers,
    same shapes of everything else, about 1/60 of the arithmetic)."""
    return tuple(tuple(max(1, round(c * width)) for c in block) for block in VGG16_BLOCKS)


class VGG16Features(nn.Module):
    """Keras VGG16(include_top=False): 13 conv3x3 'same' + ReLU, a 2x2 max-pool after each of 5 blocks."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for block in block_widths(width):
            for cout in block:
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
                cin = cout
            layers.append(nn.MaxPool2d(2, 2))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PatchEncoder(nn.Module):
    """One 512-d feature per preprocessed patch (N, 3, P, P) -> (N, 512)."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        self.vgg16 = VGG16Features(width)
        self.dense = nn.Linear(block_widths(width)[-1][-1], FEATURES)
        self.bn = nn.BatchNorm1d(FEATURES, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.vgg16(x).mean(dim=(2, 3))
        return self.bn(torch.relu(self.dense(x)))


class SequenceHead(nn.Module):
    """Bidirectional LSTM over a field's patch features -> BatchNorm -> Dense(1): (B, T, 512) -> logit (B, 1)."""

    def __init__(self, units: int = LSTM_UNITS, bidirectional: bool = True) -> None:
        super().__init__()
        width = units * (2 if bidirectional else 1)
        self.lstm = nn.LSTM(FEATURES, units, batch_first=True, bidirectional=bidirectional)
        self.bn = nn.BatchNorm1d(width, eps=BN_EPS)
        self.dense = nn.Linear(width, 1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(seq)
        # Keras Bidirectional(return_sequences=False): forward final state, then backward final state. (directions,
        # B, units) -> (B, directions * units) by a transpose and a reshape to a constant width: no shape arithmetic
        # in the exported graph.
        last = h_n.transpose(0, 1).reshape(-1, self.bn.num_features)
        return self.dense(self.bn(last))


class BreakHisNet(nn.Module):
    """fields (B, T, 3, P, P) float32, preprocessed per the contract -> (logit (B, 1), probability (B, 1))."""

    def __init__(self, contract: Contract = CONTRACT, units: int = LSTM_UNITS, bidirectional: bool = True,
                 width: float = 1.0) -> None:
        super().__init__()
        self.seq_len = contract.seq_len
        self.patch = contract.patch
        self.arch: dict = {"units": units, "bidirectional": bidirectional, "bn_eps": [BN_EPS, BN_EPS]}  # saved too
        if width != 1.0:
            self.arch["width"] = width
        self.encoder = PatchEncoder(width)
        self.head = SequenceHead(units, bidirectional)

    def set_bn_eps(self, encoder: float, head: float) -> None:
        """Epsilons read from an imported model's config (Keras default 1e-3)."""
        self.encoder.bn.eps, self.head.bn.eps = encoder, head
        self.arch["bn_eps"] = [encoder, head]

    def forward(self, fields: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(fields.reshape(-1, 3, self.patch, self.patch))
        logit = self.head(feats.reshape(-1, self.seq_len, FEATURES))
        return logit, torch.sigmoid(logit)


def build_model(contract: Contract = CONTRACT, units: int = LSTM_UNITS, bidirectional: bool = True,
                width: float = 1.0) -> BreakHisNet:
    """A fresh model in eval mode (BatchNorm uses its stored statistics, as Keras does at inference)."""
    return BreakHisNet(contract, units, bidirectional, width).eval()
