"""Certainties a radiologist can read: per-finding calibration of a package's scores.

A package's score for a finding is a softmax over prompt similarities; its scale is the model's, not a
probability of disease: a finding called absent could state "87.7 %" beside a threshold of 0.996. Each
finding gets a Platt scaling, ``P(present | score) = sigmoid(a * logit(score) + b)``, fitted (logistic
regression, scikit-learn) on the labelled validation studies of the corpus the package was developed
on. The slope is kept >= 0, so the certainty rises with the score and a finding called absent never
states more certainty than its threshold's (its operating point). A finding with a single class in the
validation split, or whose fitted slope is negative (a score that cannot tell it apart), gets the slope
0: its certainty is the validation prevalence, whatever the image.

``ct-zeroshot-train calibrate`` fits it for an existing package (the official Merlin weights after
conversion, say, on a site's own labelled studies); ``export --thresholds validation`` fits it with the
thresholds. ``--evaluate`` scores another corpus (held-out) and reports how well the raw score and the
calibrated certainty match the labels and the phantoms' ground truth: Brier score and expected
calibration error (10 equal-width bins), each beside the other.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from operators import __version__
from operators.contract.package import write_package_copy

METHOD = "platt"
BINS = 10


class CalibrationError(ValueError):
    """A calibration that cannot be fitted or written."""


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    return np.log(p / (1 - p))


def fit_platt(probabilities: np.ndarray, labels: np.ndarray, where: str) -> list[dict]:
    """Per finding, on its labelled (not -1) studies: ``{"method": "platt", "a", "b", "n", "positives"}``."""
    from sklearn.linear_model import LogisticRegression

    out = []
    for j in range(probabilities.shape[1]):
        keep = labels[:, j] != -1
        y, x = labels[keep, j].astype(int), _logit(probabilities[keep, j])
        n, pos = int(y.size), int(y.sum())
        rec: dict = {"method": METHOD, "n": n, "positives": pos, "fitted_on": where}
        a = None
        if 0 < pos < n:
            lr = LogisticRegression(C=1e4, max_iter=1000).fit(x[:, None], y)  # nearly unregularised
            a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        if a is None or a < 0:  # one class, or a score that falls with presence: the prevalence, flat
            prevalence = (pos + 0.5) / (n + 1.0)
            a, b = 0.0, float(np.log(prevalence / (1 - prevalence)))
            rec["note"] = "flat: " + ("a single class" if not 0 < pos < n else "the fitted slope was negative")
        rec.update(a=a, b=b)
        out.append(rec)
    return out


def calibrated(probabilities: np.ndarray, records: list[dict]) -> np.ndarray:
    a = np.asarray([r["a"] for r in records])
    b = np.asarray([r["b"] for r in records])
    return 1.0 / (1.0 + np.exp(-(a * _logit(probabilities) + b)))


def reliability(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Brier score and expected calibration error (``BINS`` equal-width bins) of ``pred`` against 0/1
    ``truth``, over every cell where ``truth`` is not -1."""
    keep = truth != -1
    p, y = pred[keep].astype(np.float64), truth[keep].astype(np.float64)
    bins = np.minimum((p * BINS).astype(int), BINS - 1)
    ece = 0.0
    for k in range(BINS):
        inside = bins == k
        if inside.any():
            ece += abs(p[inside].mean() - y[inside].mean()) * inside.sum()
    return {"cells": int(y.size), "brier": float(np.mean((p - y) ** 2)), "ece": float(ece / max(1, y.size))}


def calibrate_package(
    package: str | Path,
    data: str | Path,
    out: str | Path,
    split: str = "validation",
    evaluate: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    log=print,
) -> dict:
    """Fit each finding's calibration on ``split`` of ``data`` and write a copy of ``package`` with it to
    ``out``; with ``evaluate``, also score that corpus and compare raw and calibrated. Returns the record."""
    from .heldout import score_corpus

    package, data, out = Path(package), Path(data), Path(out)
    if out.exists():
        raise CalibrationError(f"{out}: already exists; name a new folder for the calibrated package")
    ids, labels, probs, _, _, pkg = score_corpus(package, data, device=device, progress=progress, split=split)
    if not ids:
        raise CalibrationError(f"{data}: no study in its {split!r} split")
    records = fit_platt(probs, labels, f"{split} split of {data.name} ({len(ids)} studies)")
    fitted = calibrated(probs, records)
    result: dict = {
        "method": "Platt scaling per finding: sigmoid(a * logit(score) + b), logistic regression on the "
        "labelled studies, slope >= 0",
        "corpus": str(data),
        "split": split,
        "studies": len(ids),
        "fitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "by": f"ct-zeroshot {__version__}",
        "fit_set": {"raw": reliability(probs, labels), "calibrated": reliability(fitted, labels)},
    }
    flat = [pkg.catalogue.ids[j] for j, r in enumerate(records) if r["a"] == 0.0]
    if flat:
        result["flat"] = flat
    if evaluate is not None:
        result["evaluation"] = evaluate_calibration(package, Path(evaluate), records, device, progress)
    manifest = json.loads((package / "manifest.json").read_text())
    for entry, rec in zip(manifest["findings"], records):
        entry["calibration"] = rec
    manifest.setdefault("provenance", {})["calibration"] = result
    write_package_copy(package, out, manifest)
    fs = result["fit_set"]
    log(
        f"calibrated on {len(ids)} {split} studies: Brier {fs['raw']['brier']:.4f} -> {fs['calibrated']['brier']:.4f}, "
        f"ECE {fs['raw']['ece']:.4f} -> {fs['calibrated']['ece']:.4f} (labelled cells)"
    )
    for name, rows in (result.get("evaluation") or {}).items():
        if isinstance(rows, dict) and "raw" in rows:
            log(
                f"{name}: Brier {rows['raw']['brier']:.4f} -> {rows['calibrated']['brier']:.4f}, "
                f"ECE {rows['raw']['ece']:.4f} -> {rows['calibrated']['ece']:.4f} ({rows['raw']['cells']} cells)"
            )
    log(f"calibrated package: {out}")
    return result


def evaluate_calibration(package: Path, data: Path, records: list[dict], device: str, progress: bool) -> dict:
    """Raw score and calibrated certainty against ``data``'s report labels and, where the corpus has
    them, the phantoms' ground truth."""
    from .ground_truth import has_ground_truth, load_ground_truth, truth_matrix
    from .heldout import score_corpus

    ids, labels, probs, _, _, pkg = score_corpus(package, data, device=device, progress=progress)
    cal = calibrated(probs, records)
    out: dict = {"corpus": str(data), "studies": len(ids)}
    out["report_labels"] = {"raw": reliability(probs, labels), "calibrated": reliability(cal, labels)}
    if has_ground_truth(data):
        truth = load_ground_truth(data)
        fids = pkg.catalogue.ids
        t = truth_matrix(truth, ids, fids)
        out["ground_truth"] = {"raw": reliability(probs, t), "calibrated": reliability(cal, t)}
    return out
