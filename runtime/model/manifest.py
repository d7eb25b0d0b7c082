"""The preprocessing contract and provenance stored beside a model artefact.

This module names the contract's fields; their *values* come from the export stage (export/model.py) and are
read back from ``manifest.json`` (by runtime/model/model_dir.py), so the runtime never re-types 224, the means or
the threshold.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import BreakhisError

FORMAT_VERSION = 2  # 2: the variant table (precision -> file + the gate it passed)
# A label is short plain text: it is printed, written into reports and shown on the page, and may come from a
# Triton server's manifest parameter. Letters, digits, spaces and _ . , ( ) + - only, 1..40 characters.
MAX_LABEL_CHARS = 40
LABEL_PUNCTUATION = " _.,()+-"

def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (model files are tens of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelError(BreakhisError):
    """A model directory that cannot be used: missing or corrupt files, or a manifest that does not fit the model."""


@dataclass(frozen=True)
class Contract:
    """How an image becomes the model's input, and how its output becomes a label."""

    patch: int  # square patch side, pixels
    stride: int  # distance between patch origins, pixels
    grid: tuple[int, int]  # (rows, cols) of patches in one field, row-major
    channel_order: str  # "BGR" or "RGB": the order the model expects
    mean: tuple[float, float, float]  # subtracted per channel, in channel_order
    scale: tuple[float, float, float]  # multiplied after the subtraction (1.0 = none)
    threshold: float  # probability > threshold -> labels[1]
    labels: tuple[str, str]  # (negative, positive)
    magnification: float | None = None  # objective magnification of the training images (100 for BreakHis 100X)
    mpp: float | None = None  # microns per pixel of the training images, where known

    @property
    def seq_len(self) -> int:
        """Patches per field: the length of the sequence the LSTM reads."""
        return self.grid[0] * self.grid[1]

    @property
    def field_shape(self) -> tuple[int, int, int, int]:
        """One field as the model reads it: (T, 3, P, P)."""
        return self.seq_len, 3, self.patch, self.patch

    @property
    def field_size(self) -> tuple[int, int]:
        """(height, width) in pixels covered by one field's patches."""
        rows, cols = self.grid
        return (rows - 1) * self.stride + self.patch, (cols - 1) * self.stride + self.patch

    def label(self, probability: float) -> str:
        return self.labels[1] if probability > self.threshold else self.labels[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Contract:
        try:
            c = cls(
                patch=int(d["patch"]),
                stride=int(d["stride"]),
                grid=(int(d["grid"][0]), int(d["grid"][1])),
                channel_order=str(d["channel_order"]),
                mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
                scale=tuple(float(v) for v in d.get("scale", (1.0, 1.0, 1.0))),  # type: ignore[arg-type]
                threshold=float(d["threshold"]),
                labels=(str(d["labels"][0]), str(d["labels"][1])),
                magnification=_optional_float(d.get("magnification")),
                mpp=_optional_float(d.get("mpp")),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ModelError(f"contract is incomplete or malformed: {e!r}") from e
        if c.channel_order not in ("BGR", "RGB") or len(c.mean) != 3 or len(c.scale) != 3:
            raise ModelError(f"contract has an unsupported channel order or mean/scale length: {d}")
        if c.patch <= 0 or c.stride <= 0 or min(c.grid) <= 0:
            raise ModelError(f"contract sizes must be positive: {d}")
        for label in c.labels:
            if not (0 < len(label) <= MAX_LABEL_CHARS and label == label.strip() and all(
                    ch.isalnum() or ch in LABEL_PUNCTUATION for ch in label)):
                raise ModelError(f"contract label {label[:60]!r} is not short plain text (1..{MAX_LABEL_CHARS} "
                                 f"letters, digits, spaces or {LABEL_PUNCTUATION.strip()})")
        if c.labels[0] == c.labels[1]:
            raise ModelError(f"contract labels must differ: {c.labels}")
        return c


def _optional_float(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass(frozen=True)
class Provenance:
    """Where the weights came from. ``trained`` is False for the seeded reference model."""

    source: str
    sha256: str
    trained: bool
    checkpoint: str | None = None  # path of the weights file the baseline can load (relative to the model dir)
    notes: str = ""
    source_files: dict[str, str] = field(default_factory=dict)  # original file name -> sha256
    metrics: dict[str, Any] = field(default_factory=dict)  # the trainer's held-out figures, where known
    held_out_patients: list[str] = field(default_factory=list)  # BreakHis patient ids never trained on


@dataclass(frozen=True)
class Variant:
    """One row of the artefact table: the ONNX file that gives this precision, and the gate it passed."""

    file: str
    gate: dict[str, Any] = field(default_factory=dict)  # fields, max |d| per output, label agreement
    runtime: str = ""  # the one runtime that gives this precision from the file ("openvino-cpu" for bf16); "" = any


@dataclass(frozen=True)
class Manifest:
    name: str
    contract: Contract
    provenance: Provenance
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    input_name: str = "fields"
    output_names: tuple[str, ...] = ("logit", "probability")
    variants: dict[str, Variant] = field(default_factory=dict)  # precision -> passing variant; nothing else listed

    def check_model(self, path: Path | str, inputs: dict[str, list], outputs: list[str],
                    stored_contract: str | None) -> None:
        """Refuse a model file whose inputs, outputs or embedded contract (JSON, where the file carries one) do not
        fit this manifest; any runtime's view of the file: input name -> shape (batch first), output names."""
        c = self.contract
        if self.input_name not in inputs:
            raise ModelError(f"{path}: has inputs {sorted(inputs)}, but the manifest says {self.input_name!r}")
        want, got = list(c.field_shape), inputs[self.input_name]
        if len(got) != 5 or list(got[1:]) != want:
            raise ModelError(f"{path}: input {self.input_name} has shape {got}, but the manifest's contract needs "
                             f"[batch, {', '.join(map(str, want))}] ({c.grid[0]}x{c.grid[1]} patches of {c.patch} px)")
        if not set(self.output_names) <= set(outputs):
            raise ModelError(f"{path}: has outputs {outputs}, but the manifest says {list(self.output_names)}")
        if stored_contract is not None and Contract.from_dict(json.loads(stored_contract)) != c:
            raise ModelError(f"{path}: the contract stored in the model file differs from {self.name}'s "
                             "manifest.json (the two files come from different exports)")

    def to_json(self) -> str:
        d = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "contract": self.contract.to_dict(),
            "provenance": asdict(self.provenance),
            "files": dict(sorted(self.files.items())),
            "input_name": self.input_name,
            "output_names": list(self.output_names),
            "variants": {k: asdict(v) for k, v in sorted(self.variants.items())},
        }
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path) -> Manifest:
        """Parse manifest.json's text (``path`` names it in errors); ModelDir.open is what reads the file."""
        try:
            d = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: manifest is not valid JSON: {e}") from e
        if not isinstance(d, dict) or d.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{path}: manifest format_version {d.get('format_version')!r}, this runtime reads "
                             f"{FORMAT_VERSION}: export the model again" if isinstance(d, dict)
                             else f"{path}: manifest is not a JSON object")
        try:
            prov = Provenance(**d["provenance"])
            return cls(
                name=str(d["name"]),
                contract=Contract.from_dict(d["contract"]),
                provenance=prov,
                files=dict(d.get("files", {})),
                input_name=str(d.get("input_name", "fields")),
                output_names=tuple(d.get("output_names", ("logit", "probability"))),
                variants={k: Variant(**v) for k, v in d.get("variants", {}).items()},
            )
        except (KeyError, TypeError) as e:
            raise ModelError(f"{path}: manifest is missing a field: {e}") from e

    def model_info(self) -> dict[str, Any]:
        """The short provenance block every result carries."""
        return {
            "name": self.name,
            "trained": self.provenance.trained,
            "source": self.provenance.source,
            "sha256": self.provenance.sha256,
        }
