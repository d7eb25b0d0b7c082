"""python -m benchmarks.evaluate: the accuracy table of the original notebook, for a labelled folder of images.

Accuracy, precision, recall (sensitivity), specificity, AUC and the confusion matrix, at image level and at
patient level (a patient's probability is the mean of its images'; the patient id comes from the BreakHis file
name), for every backend:precision asked for, side by side. Where the model's manifest lists the patients it was
never trained on, their images are reported separately from the training images.

``--stain``: the same again under another lab's stain (benchmarks/stain_shift.py): every image re-stained (Ruifrok and
Johnston's deconvolution: haematoxylin x0.6, eosin x0.7, eosin x1.5, haematoxylin x1.3, +-20 % random per stain with
a fixed seed) and colour-normalised to the model's stain reference (Reinhard's LAB statistics): accuracy and AUC, how
many labels changed from the original image's, and how many images the quality check flagged (any flag, and the
stain-drift flag), per group; every image's probability and flags are in the JSON.

examples:
  python -m benchmarks.evaluate --images ../shared/data/breakhis-100x
  python -m benchmarks.evaluate --images DIR --labels labels.csv --run cpu:fp32 --run cpu:fp16 --json out.json
  python -m benchmarks.evaluate --images ../shared/data/breakhis-100x --stain --json benchmarks/results/stain-cpu.json
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

BREAKHIS_NAME = re.compile(r"^(SOB_(?P<label>[BM])_[A-Z]+-\d+-[0-9A-Z]+)-(?P<mag>\d+)-\d+\.\w+$")


@dataclass
class Metrics:
    n: int
    accuracy: float
    precision: float
    recall: float  # sensitivity: malignant called malignant
    specificity: float  # benign called benign
    auc: float
    tp: int
    fp: int
    tn: int
    fn: int


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties
    count half), i.e. the Mann-Whitney U statistic over n_pos * n_neg. NaN where one class is absent."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Metrics:
    pred = scores > threshold
    tp, fp = int((pred & (labels == 1)).sum()), int((pred & (labels == 0)).sum())
    tn, fn = int((~pred & (labels == 0)).sum()), int((~pred & (labels == 1)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return Metrics(len(labels), ratio(tp + tn, len(labels)), ratio(tp, tp + fp), ratio(tp, tp + fn),
                   ratio(tn, tn + fp), auc(labels, scores), tp, fp, tn, fn)


def read_labels(images: list[Path], labels_csv: Path | None) -> dict[Path, tuple[int, str]]:
    """image -> (1 malignant / 0 benign, patient id), from a CSV (filename, label, optional patient) or else
    from BreakHis names. Images with no label are left out (and said so by the caller)."""
    out: dict[Path, tuple[int, str]] = {}
    rows: dict[str, dict[str, str]] = {}
    if labels_csv is not None:
        with open(labels_csv, newline="") as f:
            rows = {r["filename"]: r for r in csv.DictReader(f)}
    for p in images:
        m = BREAKHIS_NAME.match(p.name)
        patient = m.group(1) if m else (rows.get(p.name, {}).get("patient") or p.stem)
        if p.name in rows:
            label = rows[p.name]["label"].strip().lower()
            if label not in ("benign", "malignant"):
                raise ValueError(f"{labels_csv}: {p.name}: label {label!r} is neither benign nor malignant")
            out[p] = (int(label == "malignant"), patient)
        elif m:
            out[p] = (int(m.group("label") == "M"), patient)
    return out


def evaluate(probs: dict[Path, float], labels: dict[Path, tuple[int, str]], threshold: float,
             held_out: set[str]) -> dict[str, dict[str, Metrics]]:
    """{group: {"image": Metrics, "patient": Metrics}} for "all", and "held-out" / "training" where known."""
    groups = {"all": list(probs)}
    if held_out:
        groups["held-out"] = [p for p in probs if labels[p][1] in held_out]
        groups["training"] = [p for p in probs if labels[p][1] not in held_out]
    out: dict[str, dict[str, Metrics]] = {}
    for g, paths in groups.items():
        if not paths:
            continue
        y = np.array([labels[p][0] for p in paths])
        s = np.array([probs[p] for p in paths])
        patients = sorted({labels[p][1] for p in paths})
        py = np.array([labels[next(p for p in paths if labels[p][1] == pt)][0] for pt in patients])
        ps = np.array([np.mean([probs[p] for p in paths if labels[p][1] == pt]) for pt in patients])
        out[g] = {"image": metrics(y, s, threshold), "patient": metrics(py, ps, threshold)}
    return out


def table(report: dict) -> str:
    lines = [(f"model: {report['model']['name']} ({'trained' if report['model']['trained'] else 'UNTRAINED'}), "
              f"{report['images']} labelled images, threshold {report['threshold']}")]
    head = f"{'run':28s} {'group':9s} {'level':7s} {'n':>4s} {'acc':>6s} {'prec':>6s} {'recall':>6s} {'spec':>6s} " \
           f"{'AUC':>6s}  TP  FP  TN  FN"
    lines.append(head)
    for run, res in report["runs"].items():
        if "error" in res:
            lines.append(f"{run:28s} error: {res['error']}")
            continue
        for group, levels in res["groups"].items():
            for level, m in levels.items():
                lines.append(f"{run:28s} {group:9s} {level:7s} {m['n']:4d} {m['accuracy']:6.3f} {m['precision']:6.3f} "
                             f"{m['recall']:6.3f} {m['specificity']:6.3f} {m['auc']:6.3f} {m['tp']:3d} {m['fp']:3d} "
                             f"{m['tn']:3d} {m['fn']:3d}")
        if res["failed"]:
            lines.append(f"{'':28s} {len(res['failed'])} images gave no verdict: {'; '.join(res['failed'])[:300]}")
    return "\n".join(lines)


def stain_runs(clf, paths: list[Path], labels: dict[Path, tuple[int, str]], base: dict[Path, float],
               held_out: set[str]) -> dict[str, dict]:
    """Every image under each re-staining and under colour normalisation (benchmarks/stain_shift.py), classified
    by ``clf``: metrics per group, labels changed from ``base``'s (the originals'), images flagged (by any quality
    flag, and by stain drift), and every image's probability and flags."""
    from benchmarks.stain_shift import RESTAININGS, reinhard
    from runtime.io.decode import read_image
    from runtime.io.inputs import ImageInput

    made = {k: (what, fn) for k, (what, fn) in RESTAININGS.items()}
    if clf.stain_reference is not None:
        made["reinhard"] = ("colour normalised to the model's stain reference (Reinhard, LAB)",
                            lambda b, i: reinhard(b, clf.stain_reference))
    groups = {"all": list(paths)}
    if held_out:
        groups["held-out"] = [p for p in paths if labels[p][1] in held_out]
        groups["training"] = [p for p in paths if labels[p][1] not in held_out]
    out: dict[str, dict] = {}
    threshold = clf.contract.threshold
    for name, (what, fn) in {"none": ("the images as they are", None), **made}.items():
        items = (ImageInput(f"{p.name}:{name}", array=fn(read_image(p).bgr, i) if fn else read_image(p).bgr)
                 for i, p in enumerate(paths))
        res = {p: r for p, r in zip(paths, clf.classify_iter(items))}
        ok = {p: r for p, r in res.items() if r.error is None and r.probability is not None}
        probs = {p: float(r.probability) for p, r in ok.items()}
        flags = {p: sorted({f for fr in r.fields for f in fr.flags}) for p, r in res.items()}
        entry: dict = {"what": what, "groups": {}, "images": {p.name: {"probability": probs.get(p), "flags": flags[p],
                                                                       "error": res[p].error} for p in paths}}
        for g, members in groups.items():
            have = [p for p in members if p in probs]
            y, sc = np.array([labels[p][0] for p in have]), np.array([probs[p] for p in have])
            changed = [p.name for p in have if p in base and (probs[p] > threshold) != (base[p] > threshold)]
            entry["groups"][g] = {"image": asdict(metrics(y, sc, threshold)), "changed": changed,
                                  "flagged": sum(bool(flags[p]) for p in members),
                                  "flagged_stain": sum("stain_drift" in flags[p] for p in members),
                                  "changed_flagged_stain": sum("stain_drift" in flags[p] for p in paths
                                                               if p.name in changed)}
        out[name] = entry
    return out


def stain_table(stain: dict[str, dict]) -> str:
    lines = [(f"{'stain':10s} {'group':9s} {'n':>4s} {'acc':>6s} {'AUC':>6s} {'changed':>8s} {'flagged':>8s} "
              f"{'stain':>6s} {'changed+stain':>14s}")]
    for name, entry in stain.items():
        for g, r in entry["groups"].items():
            m = r["image"]
            lines.append(f"{name:10s} {g:9s} {m['n']:4d} {m['accuracy']:6.3f} {m['auc']:6.3f} {len(r['changed']):8d} "
                         f"{r['flagged']:8d} {r['flagged_stain']:6d} {r['changed_flagged_stain']:14d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="folder of labelled images")
    ap.add_argument("--labels", type=Path, default=None,
                    help="CSV with columns filename,label (benign/malignant)[,patient]; default: BreakHis file names")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: as runtime.classify)")
    ap.add_argument("--run", action="append", default=None, metavar="BACKEND:PRECISION",
                    help="a backend and precision to evaluate, repeatable (default: cpu:fp32)")
    ap.add_argument("--stain", action="store_true",
                    help="also under re-staining and colour normalisation (benchmarks/stain_shift.py), with the "
                         "quality check's flags")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here as JSON")
    args = ap.parse_args(argv)
    from runtime.errors import BreakhisError
    from runtime.errors import report as report_error
    from runtime.io.inputs import image_files
    from runtime.pipeline.classifier import Classifier

    runs = args.run or ["cpu:fp32"]
    for r in runs:
        if r.count(":") != 1:
            ap.error(f"--run {r}: expected BACKEND:PRECISION, e.g. cpu:fp32")
    images = image_files(args.images)
    try:
        labels = read_labels(images, args.labels)
    except (OSError, KeyError, ValueError) as e:
        ap.error(f"--labels: {e}")
    unlabelled = [p.name for p in images if p not in labels]
    if not labels:
        ap.error(f"{args.images}: no labelled images (BreakHis names or --labels)")
    if unlabelled:
        print(f"note: {len(unlabelled)} images have no label and are left out: {', '.join(unlabelled[:5])}",
              file=sys.stderr)
    paths = [p for p in images if p in labels]
    report: dict = {"images": len(paths), "runs": {}}
    for run in runs:
        backend, precision = run.split(":")
        try:
            with Classifier(args.model, backend=backend, precision=precision) as clf:
                results = clf.classify(paths)
                report["model"] = clf.manifest.model_info()
                report["threshold"] = threshold = clf.contract.threshold
                held_out = set(clf.manifest.provenance.held_out_patients)
                name = f"{clf.backend.name}"
                if args.stain:
                    base = {p: float(r.probability) for p, r in zip(paths, results) if r.probability is not None}
                    stain = stain_runs(clf, paths, labels, base, held_out)
        except BreakhisError as e:
            report["runs"][run] = {"error": str(e)}
            report_error(e)
            continue
        probs = {p: r.probability for p, r in zip(paths, results) if r.error is None and r.probability is not None}
        groups = evaluate(probs, labels, threshold, held_out)
        report["runs"][name] = {"groups": {g: {lv: asdict(m) for lv, m in v.items()} for g, v in groups.items()},
                                "failed": [r.error for r in results if r.error]}
        if args.stain:
            report["runs"][name]["stain"] = stain
            report["held_out"] = {"patients": sorted(held_out),
                                  "images": [p.name for p in paths if labels[p][1] in held_out]}
    if "model" not in report:
        return 2
    print(table(report))
    if "held_out" in report:
        print(f"\nheld-out patients' images ({len(report['held_out']['images'])}): "
              f"{', '.join(report['held_out']['images'])}")
    for name, res in report["runs"].items():
        if "stain" in res:
            print(f"\n{name} under another lab's stain (labels changed from the original's; images flagged by any "
                  "quality flag, by stain drift, and changed ones by stain drift):")
            print(stain_table(res["stain"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any("error" in r or r["failed"] for r in report["runs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
