"""Per-finding decision thresholds chosen on the validation split, and which findings are assessed."""

from __future__ import annotations

import numpy as np

AUROC_FLOOR = 0.65  # a finding the model cannot tell apart on validation is never reported present
MAX_CALL_RATIO = 1.5  # a threshold may call at most this many validation studies positive per true positive


def choose_thresholds(
    probabilities: np.ndarray,
    labels: np.ndarray,
    auroc_floor: float = AUROC_FLOOR,
    max_call_ratio: float = MAX_CALL_RATIO,
) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """Per finding, on labelled (not -1) validation studies: whether the model can assess it at all
    (validation AUROC >= ``auroc_floor``) and, if so, the probability threshold maximising F1 among
    those that call at most ``max_call_ratio`` x the positives present. The cap keeps a weak score from
    drifting to "everything positive", which is F1-optimal for a near-chance score. Calls are counted
    over every validation study, the unlabelled (-1: the report does not mention the finding) included:
    a deployed model scores every study, and most unmentioned findings are absent, so a cap counted on
    labelled studies alone let a model call 2-3 findings per true one on the demo studies.

    Returns (thresholds, notes, assessed)."""
    from .evaluate import finding_auroc

    thr, notes, assessed = [], [], []
    for j in range(probabilities.shape[1]):
        keep = labels[:, j] != -1
        y, p = labels[keep, j], probabilities[keep, j]
        if y.sum() == 0 or y.sum() == y.size:
            thr.append(0.5)
            assessed.append(False)
            notes.append(
                {
                    "threshold": 0.5,
                    "assessed": False,
                    "n": int(y.size),
                    "reason": "not assessed: the validation split has a single class, so the model's "
                    "ability to tell this finding apart is unmeasured",
                }
            )
            continue
        auc = float(finding_auroc(y, p))
        if auc < auroc_floor:
            thr.append(0.5)
            assessed.append(False)
            notes.append(
                {
                    "threshold": 0.5,
                    "assessed": False,
                    "validation_auroc": auc,
                    "n": int(y.size),
                    "positives": int(y.sum()),
                    "reason": f"not assessed: validation AUROC {auc:.3f} below the floor {auroc_floor}",
                }
            )
            continue
        cand = np.unique(p)
        cuts = np.concatenate([[cand[0] - 1e-6], (cand[:-1] + cand[1:]) / 2])
        limit = max_call_ratio * int(y.sum())
        p_all = np.sort(probabilities[:, j])  # every validation study, for counting calls
        best_f1, best_t = -1.0, float(cand[-1])
        for t in cuts:
            if p_all.size - np.searchsorted(p_all, t) > limit:  # calls over all validation studies
                continue
            pred = p >= t
            tp = int((pred & (y == 1)).sum())
            f1 = 2 * tp / max(1, int(pred.sum()) + int(y.sum()))
            if f1 > best_f1:
                best_f1, best_t = f1, float(t)
        best_t = float(np.clip(best_t, 1e-6, 1 - 1e-6))
        thr.append(best_t)
        assessed.append(True)
        notes.append(
            {
                "threshold": best_t,
                "assessed": True,
                "validation_auroc": auc,
                "validation_f1": best_f1,
                "validation_calls": int((p >= best_t).sum()),
                "validation_calls_all_studies": int((probabilities[:, j] >= best_t).sum()),
                "n": int(y.size),
                "positives": int(y.sum()),
            }
        )
    return np.asarray(thr), notes, np.asarray(assessed, dtype=bool)
