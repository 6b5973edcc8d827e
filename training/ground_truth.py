"""What the phantoms really contain, beside what their reports say.

The synthetic corpus writes ``ground_truth.jsonl``: per study its demographics and every finding the
phantom holds (whether or not the report mentions it). Report labels cover about a third of the
study-finding cells (the rest are -1, "not mentioned"); the truth covers all of them. This module reads it
and computes, per finding and over *all* studies:

- **ground-truth metrics** of a score and a decision: AUROC, F1 and calls per true finding (every call over
  every study divided by the findings truly present: 1.0 is as many calls as there are findings, 2.0 twice
  as many);
- a **no-image baseline**: one logistic regression per finding on age, sex and the true state of the other
  29 findings, fitted on the training split's patients. It knows everything about a patient except the
  image; a finding the model does not beat by a clear margin is one it reads from "this is an abnormal
  patient", not from the lesion.

A corpus without ``ground_truth.jsonl`` (a real release) has no truth; callers then report labels only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from operators.contract.files import jsonl_records
from operators.contract.findings import load_catalogue

GROUND_TRUTH_FILE = "ground_truth.jsonl"
BASELINE_MARGIN = 0.05  # a finding whose model AUROC does not beat the no-image baseline by this is named


class GroundTruthError(ValueError):
    """The corpus's ground truth cannot be used; the message names the file and the problem."""


def has_ground_truth(data: str | Path) -> bool:
    return Path(data).is_dir() and (Path(data) / GROUND_TRUTH_FILE).is_file()


def load_ground_truth(data: str | Path) -> dict[str, dict]:
    """Records of ``DATA/ground_truth.jsonl`` by study id."""
    path = Path(data) / GROUND_TRUTH_FILE
    if not path.is_file():
        raise GroundTruthError(f"{path}: no ground truth (only the synthetic corpus writes one)")
    ids = set(load_catalogue().ids)
    out: dict[str, dict] = {}
    for n, rec in jsonl_records(path, ("study id", "findings", "age"), GroundTruthError):
        sid = rec["study id"]
        try:
            unknown = set(rec["findings"]) - ids
            float(rec["age"])
        except (ValueError, TypeError) as exc:
            raise GroundTruthError(f"{path}: line {n} is not a ground-truth record ({exc})") from None
        if unknown:
            raise GroundTruthError(f"{path}: line {n} names findings outside the catalogue: {sorted(unknown)}")
        if sid in out:
            raise GroundTruthError(f"{path}: line {n} repeats study {sid}")
        out[sid] = rec
    return out


def _records(truth: dict[str, dict], study_ids, path_hint: str = GROUND_TRUTH_FILE) -> list[dict]:
    missing = [s for s in study_ids if s not in truth]
    if missing:
        raise GroundTruthError(f"{path_hint}: no record for {len(missing)} studies (e.g. {missing[0]})")
    return [truth[s] for s in study_ids]


def truth_matrix(truth: dict[str, dict], study_ids, finding_ids=None) -> np.ndarray:
    """(N, n_findings) int8: 1 where the phantom holds the finding, 0 where it does not, in the order of
    ``finding_ids`` (the catalogue's by default; a package's own, say)."""
    ids = load_catalogue().ids if finding_ids is None else list(finding_ids)
    recs = _records(truth, study_ids)
    return np.array([[int(f in r["findings"]) for f in ids] for r in recs], dtype=np.int8).reshape(len(recs), len(ids))


def demographics(truth: dict[str, dict], study_ids) -> np.ndarray:
    """(N, 2) float: age in decades and sex (1 female, 0 otherwise)."""
    recs = _records(truth, study_ids)
    return np.array([[float(r["age"]) / 10.0, float(str(r["sex"]).upper().startswith("F"))] for r in recs]).reshape(
        len(recs), 2
    )


def auroc_or_none(y: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if 0 < y.sum() < y.size else None


def ground_truth_metrics(scores: np.ndarray, decided: np.ndarray, truth: np.ndarray) -> dict:
    """Per finding over every study: AUROC of ``scores``, F1 and calls of the ``decided`` matrix against
    ``truth``. Macro figures average the findings with both classes present (AUROC, F1); calls per true
    finding is the total over findings (a finding absent from every phantom still counts its calls)."""
    ids = load_catalogue().ids
    decided = decided.astype(bool)
    per = {}
    for j, fid in enumerate(ids):
        y = truth[:, j].astype(int)
        d = decided[:, j]
        tp = int((d & (y == 1)).sum())
        both = 0 < y.sum() < y.size
        per[fid] = {
            "auroc": auroc_or_none(y, scores[:, j]),
            "f1": (2 * tp / max(1, int(d.sum()) + int(y.sum()))) if both else None,
            "present": int(y.sum()),
            "calls": int(d.sum()),
            "true_calls": tp,
        }
    aucs = [v["auroc"] for v in per.values() if v["auroc"] is not None]
    f1s = [v["f1"] for v in per.values() if v["f1"] is not None]
    present = int(truth.sum())
    return {
        "studies": int(truth.shape[0]),
        "macro_auroc": float(np.mean(aucs)) if aucs else math.nan,
        "macro_f1": float(np.mean(f1s)) if f1s else math.nan,
        "calls_per_true_finding": float(decided.sum() / present) if present else math.nan,
        "sensitivity": float((decided & (truth == 1)).sum() / present) if present else math.nan,
        "per_finding": per,
    }


def baseline_features(truth_m: np.ndarray, demo: np.ndarray, j: int) -> np.ndarray:
    """Finding j's no-image features: demographics and every other finding's true state."""
    return np.hstack([demo, np.delete(truth_m, j, axis=1)]).astype(np.float64)


def no_image_baseline(
    train_truth: np.ndarray, train_demo: np.ndarray, test_truth: np.ndarray, test_demo: np.ndarray
) -> np.ndarray:
    """(N_test, n_findings) decision values of one logistic regression per finding on the patient without the
    image (age, sex, the other findings' truth), fitted on the training patients; NaN for a finding with a
    single class among them."""
    from sklearn.linear_model import LogisticRegression

    out = np.full(test_truth.shape, np.nan)
    for j in range(train_truth.shape[1]):
        y = train_truth[:, j]
        if not 0 < y.sum() < y.size:
            continue
        lr = LogisticRegression(C=1.0, max_iter=2000)
        lr.fit(baseline_features(train_truth, train_demo, j), y)
        out[:, j] = lr.decision_function(baseline_features(test_truth, test_demo, j))
    return out


def baseline_table(model_gt: dict, baseline_scores: np.ndarray, truth: np.ndarray) -> dict:
    """Per finding: the model's ground-truth AUROC beside the no-image baseline's, their difference, and the
    findings the model does not beat by ``BASELINE_MARGIN``."""
    ids = load_catalogue().ids
    rows = {}
    for j, fid in enumerate(ids):
        base = None if np.isnan(baseline_scores[:, j]).any() else auroc_or_none(truth[:, j], baseline_scores[:, j])
        model = model_gt["per_finding"][fid]["auroc"]
        rows[fid] = {
            "model_auroc": model,
            "baseline_auroc": base,
            "margin": None if model is None or base is None else model - base,
        }
    bases = [v["baseline_auroc"] for v in rows.values() if v["baseline_auroc"] is not None]
    return {
        "per_finding": rows,
        "macro_baseline_auroc": float(np.mean(bases)) if bases else math.nan,
        "not_beating_baseline": [
            f for f, v in rows.items() if v["margin"] is not None and v["margin"] < BASELINE_MARGIN
        ],
        "margin_required": BASELINE_MARGIN,
    }


def split_ids(truth: dict[str, dict], split: str) -> list[str]:
    return [sid for sid, r in truth.items() if r.get("split") == split]


def truth_report(
    truth: dict[str, dict],
    study_ids,
    scores: np.ndarray,
    decided: np.ndarray,
    baseline_truth: dict[str, dict] | None = None,
) -> dict:
    """The ground-truth section of an evaluation: metrics of ``scores`` / ``decided`` over the studies
    ``study_ids`` against their phantoms, and the no-image baseline fitted on the training patients of
    ``baseline_truth`` (default: the same corpus's training split) beside it."""
    t = truth_matrix(truth, study_ids)
    gt = ground_truth_metrics(scores, decided, t)
    base_src = truth if baseline_truth is None else baseline_truth
    train = split_ids(base_src, "train")
    if not train:
        raise GroundTruthError(f"{GROUND_TRUTH_FILE}: no training patients to fit the no-image baseline on")
    base = no_image_baseline(
        truth_matrix(base_src, train), demographics(base_src, train), t, demographics(truth, study_ids)
    )
    return {"ground_truth": gt, "no_image_baseline": baseline_table(gt, base, t)}


def format_truth_tables(report: dict) -> str:
    """The ground-truth metrics and the no-image baseline as text, one row per finding."""
    gt, base = report["ground_truth"], report["no_image_baseline"]
    lines = [
        f"against the phantoms' ground truth ({gt['studies']} studies, every finding): macro AUROC "
        f"{gt['macro_auroc']:.4f}   macro F1 {gt['macro_f1']:.4f}   calls per true finding "
        f"{gt['calls_per_true_finding']:.2f}   sensitivity {gt['sensitivity']:.3f}",
        f"no-image baseline (age, sex, the other findings' truth): macro AUROC {base['macro_baseline_auroc']:.4f}",
        "",
        f"{'finding':32s} {'present':>7s} {'calls':>6s} {'GT F1':>6s} {'GT AUC':>6s} {'no-img':>6s} {'margin':>7s}",
    ]

    def f(v, w=6, d=3):
        return f"{'-':>{w}s}" if v is None else f"{v:>{w}.{d}f}"

    for fid, v in gt["per_finding"].items():
        b = base["per_finding"][fid]
        lines.append(
            f"{fid:32s} {v['present']:>7d} {v['calls']:>6d} {f(v['f1'])} {f(v['auroc'])} "
            f"{f(b['baseline_auroc'])} {'-' if b['margin'] is None else format(b['margin'], '+7.3f'):>7s}"
        )
    lines.append(
        f"\nnot beating the no-image baseline by {base['margin_required']}: "
        + (", ".join(base["not_beating_baseline"]) or "none")
    )
    return "\n".join(lines)
