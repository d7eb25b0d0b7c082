"""A model on Triton Inference Server: its name, its one input and outputs, and the parameters that carry its
manifest (contract, provenance, files), precision, re-check band and FP32 sibling. One description, used by the
repository export (export/triton_repo.py), the PyTriton server (runtime/apps/triton_server.py) and the client
(runtime/backends/triton.py), so that whatever serves a model, one client reads it and checks it.

The input is the preprocessed fields, ``(batch, T, 3, P, P)`` FP32, exactly the ONNX file's input: decoding and
preprocessing stay with the client (our CPU path or GPU kernel), as everywhere else in the runtime. A field is
T x 3 x P x P x 4 bytes on the wire (3.6 MB for 6 patches of 224 px)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.model.manifest import Manifest, ModelError

DEFAULT_NAME = "breakhis"  # a precision's model is DEFAULT_NAME + "_" + precision: breakhis_fp32, breakhis_fp16
PREFIX = "breakhis_"  # every parameter of ours starts so (Triton's own parameters keep their names)


def served_name(base: str, precision: str) -> str:
    """The Triton model name of a precision: ``base_precision`` (breakhis_fp32, breakhis_fp16, ...)."""
    return f"{base}_{precision}"


@dataclass(frozen=True)
class Served:
    """What a served model says of itself, as config parameters (strings)."""

    manifest: Manifest
    precision: str
    band: float  # its re-check band (0 for FP32): fields within it of the threshold are classified again at FP32
    model_file: str  # the file it runs (an ONNX variant of the manifest, or a TensorRT plan)
    file_sha256: str
    recheck_model: str = ""  # the FP32 model on the same server that re-checks its in-band fields ("" for FP32)

    def parameters(self) -> dict[str, str]:
        manifest = json.dumps(json.loads(self.manifest.to_json()), separators=(",", ":"), sort_keys=True)
        return {PREFIX + "manifest": manifest, PREFIX + "precision": self.precision, PREFIX + "band": repr(self.band),
                PREFIX + "file": self.model_file, PREFIX + "file_sha256": self.file_sha256,
                PREFIX + "recheck_model": self.recheck_model}

    @classmethod
    def from_parameters(cls, params: dict[str, str], where: str) -> Served:
        """Read back what ``parameters`` wrote; ModelError naming ``where`` (server and model) where it is not ours
        or is damaged."""
        missing = [k for k in ("manifest", "precision", "band", "file", "file_sha256") if PREFIX + k not in params]
        if missing:
            raise ModelError(f"{where}: not a breakhis-edge model (its config has no parameters "
                             f"{', '.join(PREFIX + k for k in missing)}; serve it with python -m runtime.triton_server "
                             "or a repository from python -m export triton)")
        try:
            band = float(params[PREFIX + "band"])
        except ValueError:
            raise ModelError(f"{where}: parameter {PREFIX}band is not a number: {params[PREFIX + 'band']!r}") from None
        return cls(Manifest.from_json(params[PREFIX + "manifest"], Path(where)), params[PREFIX + "precision"], band,
                   params[PREFIX + "file"], params[PREFIX + "file_sha256"], params.get(PREFIX + "recheck_model", ""))

    def differences(self, local: Manifest) -> list[str]:
        """How this served model differs from a local model directory's manifest (empty: the same model): the
        contract, the weights, and the file it runs where the local manifest lists that file."""
        theirs, ours = self.manifest, local
        diffs = [f"contract {k}: server {v!r}, local {ours.contract.to_dict()[k]!r}"
                 for k, v in theirs.contract.to_dict().items() if ours.contract.to_dict()[k] != v]
        if theirs.provenance.sha256 != ours.provenance.sha256:
            diffs.append(f"weights sha256: server {theirs.provenance.sha256[:12]}, local {ours.provenance.sha256[:12]}")
        if self.model_file in ours.files and ours.files[self.model_file] != self.file_sha256:
            diffs.append(f"{self.model_file} sha256: server {self.file_sha256[:12]}, "
                         f"local {ours.files[self.model_file][:12]}")
        return diffs
