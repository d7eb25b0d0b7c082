"""The stain reference an export records in its model directory (runtime/model/stain_reference.py): every field of
the reference images measured as the runtime's stain-drift check measures a field (runtime/pipeline/stain.py), each
measure's median and spread, and the images' mean LAB colour. By default the reference images are the export's gate
images of the model's training patients (those of the patients the manifest lists as held out are left out: the
model never saw their stains); ``--stain-reference DIR`` names a folder of one's own training images instead."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from export.model import CONTRACT
from runtime.errors import CheckFailed
from runtime.io.decode import ImageError, read_image
from runtime.io.inputs import image_files
from runtime.model.geometry import TilingError, plan_image
from runtime.model.manifest import Contract
from runtime.model.stain_reference import Spread, StainReference
from runtime.pipeline.quality import STEP
from runtime.pipeline.stain import field_profile

BREAKHIS_PATIENT = re.compile(r"^(SOB_[BM]_[A-Z]+-\d+-[0-9A-Z]+)-\d+-\d+\.\w+$")  # a BreakHis file name's patient


class StainReferenceError(CheckFailed):
    """No usable reference image: the model directory cannot record the stains it was trained on."""


def reference_images(folder: Path, held_out: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """The images of ``folder``, less those whose BreakHis file name names a held-out patient."""
    def patient(p: Path) -> str | None:
        m = BREAKHIS_PATIENT.match(p.name)
        return m.group(1) if m else None

    return [p for p in image_files(folder) if patient(p) not in set(held_out)]


def stain_reference(folder: Path | None, gate_images: Path | None, held_out: list[str],
                    log=print) -> StainReference | None:
    """The export's stain reference: ``folder``'s images (--stain-reference) or else every image of the gate's
    folder (--gate-count, a speed option of the gates, does not narrow it: the measures are cheap), less the
    held-out patients' in either case; None, said, where there are no real images (no stain check then)."""
    if folder is None and (gate_images is None or not gate_images.is_dir()):
        log("no stain reference recorded: no real images (--parity-images or --stain-reference DIR); the runtime's "
            "stain check is off for this model")
        return None
    where = folder if folder is not None else gate_images
    assert where is not None
    images = reference_images(where, held_out)
    left = f", less those of the held-out patients {', '.join(held_out)}" if held_out else ""
    ref = build_reference(images, CONTRACT, f"the images of {where}{left}")
    log(f"stain reference: {ref.fields} fields of {len(ref.images)} images ({ref.source})")
    return ref


def build_reference(images: list[Path], contract: Contract, source: str) -> StainReference:
    """Measure every field of ``images`` (unreadable or too-small ones are skipped and named in the notes);
    StainReferenceError where no field is left."""
    profiles: list[dict[str, float]] = []
    lab_means, lab_stds, used, skipped = [], [], [], {}
    for path in images:
        try:
            bgr = read_image(path).bgr
            plan = plan_image(bgr, contract)
        except (ImageError, TilingError) as e:
            skipped[path.name] = str(e)
            continue
        fh, fw = contract.field_size
        sparse = bgr[::STEP, ::STEP]
        for y, x in plan.field_origins:
            px = sparse[y // STEP:(y + fh) // STEP, x // STEP:(x + fw) // STEP]
            profiles.append(field_profile(px))
        lab = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2LAB).reshape(-1, 3).astype(np.float64)
        lab_means.append(lab.mean(0))
        lab_stds.append(lab.std(0))
        used.append(path.name)
    if not profiles:
        raise StainReferenceError(f"no stain reference: none of the {len(images)} reference images could be read and "
                                  f"tiled ({source}); name a folder of the model's training images with "
                                  "--stain-reference DIR")
    measures = {}
    for k in profiles[0]:
        v = np.array([p[k] for p in profiles])
        measures[k] = Spread(median=_r(np.median(v)), p05=_r(np.percentile(v, 5)), p95=_r(np.percentile(v, 95)),
                             low=_r(v.min()), high=_r(v.max()))
    m, s = np.mean(lab_means, axis=0), np.mean(lab_stds, axis=0)
    return StainReference(source=source, images=tuple(used), fields=len(profiles), measures=measures,
                          lab_mean=(_r(m[0]), _r(m[1]), _r(m[2])), lab_std=(_r(s[0]), _r(s[1]), _r(s[2])),
                          notes={"skipped": skipped} if skipped else {})


def _r(x: float) -> float:
    return round(float(x), 5)
