"""A model directory on disk: the one reader and writer of manifest.json and export_report.json, the checked way to
a model file, and the engines folder. Nothing else opens those JSON files."""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from runtime.model.manifest import Contract, Manifest, ModelError, Variant, sha256_file
from runtime.model.stain_reference import STAIN_REFERENCE_NAME, StainReference

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "export_report.json"


class ModelDir:
    """``ModelDir.open(path)``: the manifest read and checked once; variants, verified files and the export report
    (gates passed, rejected, not made) through it."""

    def __init__(self, path: Path | str, manifest: Manifest) -> None:
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: Path | str) -> ModelDir:
        file = Path(path) / MANIFEST_NAME
        if not file.is_file():
            raise ModelError(f"{file}: manifest not found (name a model directory with --model; `bash setup.sh` "
                             "exports the models into models/)")
        return cls(path, Manifest.from_json(file.read_text(), file))

    @classmethod
    def create(cls, path: Path, manifest: Manifest, report: dict[str, Any]) -> ModelDir:
        """A new export's directory: its manifest and report written (the files themselves are already there)."""
        model = cls(path, manifest)
        model.save()
        model.write_report(report)
        return model

    @property
    def contract(self) -> Contract:
        return self.manifest.contract

    @property
    def engines(self) -> Path:
        """Where TensorRT engines built for this model live (runtime/backends/engines.py)."""
        return self.path / "engines"

    def __str__(self) -> str:
        return str(self.path)

    def save(self) -> Path:
        file = self.path / MANIFEST_NAME
        file.write_text(self.manifest.to_json())
        return file

    def report(self) -> dict[str, Any]:
        """The export report ({} where there is none); ModelError where it cannot be read."""
        file = self.path / REPORT_NAME
        if not file.is_file():
            return {}
        try:
            report = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"{file}: unreadable export report ({e})") from None
        if not isinstance(report, dict):
            raise ModelError(f"{file}: the export report is not a JSON object")
        return report

    def write_report(self, report: dict[str, Any]) -> None:
        (self.path / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

    def stain_reference(self) -> StainReference | None:
        """The stains the model was trained on (runtime/model/stain_reference.py), its bytes checked against the
        manifest (ModelError where they differ, or where the manifest lists the file and it is gone: damage, like any
        listed file); None where the export recorded none (a model directory from before): no stain check then, said
        by the caller (``stain_check_off``)."""
        if self.stain_check_off() is not None:
            return None
        if not (self.path / STAIN_REFERENCE_NAME).is_file():
            raise ModelError(f"{self.path / STAIN_REFERENCE_NAME}: listed in manifest.json but not there: copy the "
                             "whole model directory, or export it again")
        path, _ = self.file(STAIN_REFERENCE_NAME)
        data = path.read_bytes()  # parsed as hashed: the bytes read are the bytes checked
        if hashlib.sha256(data).hexdigest() != self.manifest.files[STAIN_REFERENCE_NAME]:
            raise ModelError(f"{path}: changed while it was read: export the model again")
        return StainReference.from_json(data, str(path))

    def stain_check_off(self) -> str | None:
        """Why this model directory has no stain check (None where it has one)."""
        if STAIN_REFERENCE_NAME not in self.manifest.files:
            return (f"stain check off: {self.path} records no stain reference (exported before 2026-12-07): export it "
                    "again to have each field's stain compared with its training images'")
        return None

    def add_stain_reference(self, reference: StainReference) -> None:
        """Write the stain reference and hash it into the manifest (an export; or an older model directory given
        one)."""
        file = self.path / STAIN_REFERENCE_NAME
        file.write_text(reference.to_json())
        self.manifest.files[STAIN_REFERENCE_NAME] = sha256_file(file)
        self.save()

    def variant(self, precision: str) -> Variant:
        """The listed variant of this precision, or ModelError saying why there is none (its gate result)."""
        if precision in self.manifest.variants:
            return self.manifest.variants[precision]
        why, step = "it was never made", _next_step(self.path, precision)
        try:
            report = self.report()
        except ModelError:  # the report only explains; a damaged one changes nothing here
            report = {}
        if precision in report.get("rejected", {}):
            why, step = f"it failed its fidelity gate at export: {report['rejected'][precision]}", INSTEAD
        elif precision in report.get("not_made", {}):  # the reason says what would make it
            why, step = f"it was not made at export: {report['not_made'][precision]}", INSTEAD
        raise ModelError(f"{self.path}: no {precision} variant ({why}); this model has "
                         f"{', '.join(sorted(self.manifest.variants)) or 'none'}. {step}")

    def band(self, precision: str) -> float:
        """A listed variant's re-check band (``recheck_band``); ModelError saying why where it is not listed."""
        self.variant(precision)
        return recheck_band(self.manifest, precision)[0]

    def layout_passed(self, precision: str, layout: str) -> bool:
        """Whether this precision passed its gate on a GPU in this memory layout (``export verify --layout``)."""
        try:
            return bool(self.report().get("layouts", {}).get(precision, {}).get(layout, {}).get("passed"))
        except (ModelError, AttributeError):  # unreadable or foreign: no layout is taken on its word
            return False

    def record_layout(self, precision: str, layout: str, passed: bool, gate: dict[str, Any]) -> None:
        """Record a layout's gate on a GPU: the runtime prefers it for this precision only where it passed."""
        report = self.report()
        report.setdefault("layouts", {}).setdefault(precision, {})[layout] = {"passed": passed, **gate}
        self.write_report(report)

    def file(self, name: str) -> tuple[Path, str]:
        """(path, sha256) of a model file whose bytes match the manifest; ModelError naming the file if not."""
        return verified_file(self.path, name, self.manifest.files)

    def accept(self, precision: str, variant: Variant, gate: dict[str, Any] | None = None) -> None:
        """List a variant that passed its gate (its file hashed into the manifest) and record the gate."""
        self.manifest.files[variant.file] = sha256_file(self.path / variant.file)
        self.manifest.variants[precision] = variant
        report = self.report()
        report.get("rejected", {}).pop(precision, None)
        if gate is not None:
            report.setdefault("gates", {})[precision] = gate
        self.save()
        self.write_report(report)

    def reject(self, precision: str, reason: str, gate: dict[str, Any] | None = None, remove: str | None = None,
               **record: Any) -> None:
        """Record why a variant was refused (its gate, anything else under ``record``) and unlist it; ``remove``:
        its own file, deleted and dropped from the manifest."""
        report = self.report()
        report.setdefault("rejected", {})[precision] = reason
        if gate is not None:
            report.setdefault("gates", {})[precision] = gate
        self.write_report(report | record)
        self.manifest.variants.pop(precision, None)
        if remove is not None:
            (self.path / remove).unlink(missing_ok=True)
            self.manifest.files.pop(remove, None)
        self.save()


def recheck_band(manifest: Manifest, precision: str) -> tuple[float, str | None]:
    """(band, note): a listed variant's re-check band, derived from the logit bound its gate recorded
    (``logit_bound``: runtime/model/precisions.py says how), never below its probability bound (INT8's derived
    ``bound``, else the table's). A gate from before logit bounds were recorded keeps its probability bound as the
    band, and the note says so (None otherwise). ModelError where the precision is not listed."""
    from runtime.model.precisions import PRECISIONS, band_from_logit

    if precision not in manifest.variants:
        raise ModelError(f"{manifest.name}: no {precision} variant; this model has "
                         f"{', '.join(sorted(manifest.variants)) or 'none'}")
    if precision == "fp32":
        return 0.0, None
    gate = manifest.variants[precision].gate
    floor = float(gate.get("bound") or PRECISIONS[precision].band)
    bound = gate.get("logit_bound")
    if bound is None:
        return floor, (f"{manifest.name}: its {precision} gate recorded no logit bound (an export from before they "
                       f"were): the re-check band is its probability bound {floor:g}; export the model again to "
                       "derive it from the logit")
    return max(floor, band_from_logit(float(bound), manifest.contract.threshold)), None


def verified_file(folder: Path, name: str, files: dict[str, str]) -> tuple[Path, str]:
    """(path, sha256) of a file whose bytes match ``files[name]``; ModelError naming the file if not. Hashing is
    cached per (path, size, mtime), so a process that opens a model again does not read it again."""
    path = Path(folder) / name
    want = files.get(name)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    if want is None:
        raise ModelError(f"{path}: not listed in manifest.json, so it cannot be verified (export the model again)")
    st = path.stat()
    got = _cached_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)
    if got != want:
        raise ModelError(f"{path}: sha256 {got[:16]}... does not match manifest.json ({want[:16]}...): the file was "
                         "replaced or damaged after the export; export the model again")
    return path, got


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


INSTEAD = "Use --precision auto (the fastest variant that passed here) or fp32"


def _next_step(path: Path, precision: str) -> str:
    """What to run to get a precision's variant (the precision table says what makes it), or what to use instead."""
    from runtime.model.precisions import PRECISIONS

    row, instead = PRECISIONS.get(precision), INSTEAD
    if row is None:
        return instead
    if row.made_by == "export int8":
        return (f"To make it: python -m export int8 -m {path} --calib-images FOLDER (real images of your lab; it is "
                f"kept only where it passes its gate and is the fastest tier). {instead}")
    if row.made_by == "--variants":
        cmd = "python -m export bf16 -m " + str(path) if precision == "bf16" else \
            "the export again with --variants " + precision
        where = {"gpu": " on a machine with an NVIDIA GPU", "cpu": " on a CPU with native BF16"}.get(row.auto, "")
        return f"To make it{where}: {cmd}. {instead}"
    return instead

