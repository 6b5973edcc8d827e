"""Per-run metrics, seed-level statistics with a test-study second stage, Holm's correction, verdicts.

A comparison is a contrast: a weighted sum of arms' test metric (``a - b``, or a difference of differences
such as how much of the 20 % -> 100 % gap a method closes), for macro F1 (Merlin's 0.5 rule) and macro
AUROC alike. The seed is the unit of replication: seed ``s`` gives every arm the same initial weights, so
each seed yields one paired difference, and the interval is a t-interval over those differences (stage
one). The test studies are shared by every run, so their sampling variance is common to all seeds and the
seeds' spread cannot show it: resampling the test studies (the same draws for every run) gives the
variance of the seed-mean contrast, which is added (stage two). An exact sign-flip p over the seeds is
shown beside. Holm's step-down correction sets each interval's level within its family (the main
contrasts, then the others); a comparison is *resolved* only when its corrected interval excludes zero.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from operators.contract.files import write_json
from operators.contract.scoring import merlin_present


def _flatten(prefix: str, obj, rows: list) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, rows)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        rows.append((prefix, float(obj)))


TRUTH_FILE = "ground_truth.json"  # a run's test metrics against the phantoms (when metrics.json has none)


def run_truth(rd: Path, data: Path | None) -> dict | None:
    """The run's ground-truth section: from ``metrics.json`` (evaluations since it was added), else from
    ``RUN/ground_truth.json``, else computed from the kept predictions and the corpus's truth and written
    there; None when neither the predictions nor the corpus are at hand."""
    m = json.loads((rd / "metrics.json").read_text())
    if "ground_truth" in m:
        return {k: m[k] for k in ("ground_truth", "no_image_baseline")}
    path = rd / TRUTH_FILE
    if path.exists():
        return json.loads(path.read_text())
    from ...ground_truth import has_ground_truth, load_ground_truth, truth_report

    if data is None or not has_ground_truth(data) or not (rd / "metrics_predictions.npz").exists():
        return None
    z = np.load(rd / "metrics_predictions.npz")
    rep = truth_report(
        load_ground_truth(data), [str(i) for i in z["study_ids"]], z["margins"], merlin_present(z["margins"])
    )
    rep["ground_truth"]["decision"] = "merlin: probability 0.5"
    write_json(path, rep, indent=None)
    return rep


def run_metrics(rd: Path, data: Path | None = None) -> list[tuple[str, float]]:
    """(metric, value) pairs of one finished run (``data``: the corpus, for its ground truth)."""
    m = json.loads((rd / "metrics.json").read_text())
    rows: list = [("macro_f1", m["zero_shot"]["macro_f1"]), ("macro_auroc", m["zero_shot"]["macro_auroc"])]
    truth = run_truth(rd, data)
    if truth is not None:
        gt = truth["ground_truth"]
        rows += [(f"truth/{k}", gt[k]) for k in ("macro_auroc", "macro_f1", "calls_per_true_finding")]
        rows.append(("truth/no_image_baseline_macro_auroc", truth["no_image_baseline"]["macro_baseline_auroc"]))
    for fid, v in m["zero_shot"]["per_finding"].items():
        for key in ("f1", "auroc"):
            if v[key] is not None:
                rows.append((f"{key}/{fid}", v[key]))
    _flatten("retrieval", {k: v for k, v in m["retrieval"].items() if k != "n"}, rows)
    _flatten("occlusion", m["occlusion"], rows)
    info = json.loads((rd / "study_run.json").read_text())
    with open(rd / "epochs.csv", newline="") as fh:
        epochs = list(csv.DictReader(fh))
    # full epochs only: the last row of a run that ends mid-epoch counts fewer steps
    span = [int(r["last_step"]) - (int(p["last_step"]) if p else -1) for p, r in zip([None] + epochs, epochs)]
    full = [int(r["unique_volumes"]) for r, n in zip(epochs, span) if n == max(span)]
    rows += [
        ("unique_volumes_per_epoch", float(np.mean(full))),
        ("pool_size", float(info["pool_size"])),
        ("best_step", float(info["best_step"])),
        ("train_seconds", info["train_seconds"]),
        ("eval_seconds", info["eval_seconds"]),
    ]
    share = info.get("finding_share") or {}
    rows += [(f"finding_share/{k}", float(v)) for k, v in share.items() if isinstance(v, (int, float))]
    return rows


TEST_BOOTSTRAP_FILE = "test_bootstrap.json"
METRICS = ("macro_f1", "macro_auroc")  # the study's two metrics: F1 under Merlin's 0.5 rule, and AUROC


def _auroc_columns(margins: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per finding, AUROC of the margins over studies labelled 1 / 0 (Mann-Whitney from average ranks);
    NaN where one class is missing."""
    from scipy.stats import rankdata

    out = np.full(labels.shape[1], np.nan)
    for j in range(labels.shape[1]):
        keep = labels[:, j] != -1
        y, s = labels[keep, j], margins[keep, j]
        n1 = int(y.sum())
        n0 = y.size - n1
        if n1 and n0:
            r = rankdata(s)
            out[j] = (r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return out


def test_bootstrap(rd: Path, n_boot: int, seed: int = 0) -> dict:
    """The second stage's raw material for one run: its test macro F1 (Merlin's rule) and macro AUROC on
    ``n_boot`` resamples of the test studies. The resamples are drawn from ``seed`` and the number of test
    studies alone, so every run of a study sees the same draws and a contrast's resampled value is the same
    weighted sum of its runs' vectors. Written to ``RUN/test_bootstrap.json`` (kept with the study, unlike
    the predictions it is computed from) and read back when present."""
    from ...evaluate import macro_f1_from

    path = rd / TEST_BOOTSTRAP_FILE
    z = np.load(rd / "metrics_predictions.npz")
    margins, labels, ids = z["margins"], z["labels"], z["study_ids"]
    digest = hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]
    decided = merlin_present(margins).astype(np.int8)
    rng = np.random.default_rng(seed)
    f1, auc = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, len(ids), len(ids))
        f1.append(round(macro_f1_from(decided[idx], labels[idx]), 5))
        auc.append(round(float(np.nanmean(_auroc_columns(margins[idx], labels[idx]))), 5))
    rec = {
        "resamples": n_boot,
        "seed": seed,
        "studies": len(ids),
        "study_ids": digest,
        "macro_f1": f1,
        "macro_auroc": auc,
    }
    write_json(path, rec, indent=None)  # compact: kept with the study
    return rec


def load_test_bootstrap(rd: Path, n_boot: int) -> dict | None:
    """``RUN/test_bootstrap.json`` when it holds ``n_boot`` resamples; else computed from the run's kept
    predictions; None when neither is there (the second stage is then left out and said so)."""
    path = rd / TEST_BOOTSTRAP_FILE
    if path.exists():
        rec = json.loads(path.read_text())
        if rec.get("resamples") == n_boot:
            return rec
    if (rd / "metrics_predictions.npz").exists() and n_boot > 0:
        return test_bootstrap(rd, n_boot)
    return None


def sign_flip_p(diffs) -> float:
    """Two-sided exact sign-flip (paired permutation) p-value of 'mean difference 0' over the seeds: the
    share of the 2^n sign assignments whose |mean| reaches the observed one. With n seeds it is never
    below 2 / 2^n (0.25 at 3 seeds: three seeds cannot resolve anything at 5 %)."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0 or d.size > 20:
        return math.nan
    signs = 1 - 2 * ((np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1)
    means = np.abs((signs * d).mean(1))
    return float(np.mean(means >= abs(d.mean()) - 1e-12))


def two_stage(diffs, test_var: float | None, level: float = 0.05) -> tuple[float, float, float, float]:
    """Mean, interval and p of a contrast from its per-seed paired differences (stage one: the seed is the
    unit, t with n-1 degrees of freedom) with the test studies' sampling variance of the seed mean added
    (stage two: ``test_var``, from resampling the shared test studies; None leaves it out). The seeds'
    spread already holds part of the test variance, so adding it counts that part twice: the interval errs
    wide, never narrow. Returns (mean, lo, hi, p)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return (float(d.mean()) if d.size else math.nan), math.nan, math.nan, math.nan
    se = math.sqrt(d.var(ddof=1) / d.size + (test_var or 0.0))
    if se == 0:
        return float(d.mean()), float(d.mean()), float(d.mean()), (1.0 if d.mean() == 0 else 0.0)
    tcrit = stats.t.ppf(1 - level / 2, d.size - 1)
    p = float(2 * stats.t.sf(abs(d.mean()) / se, d.size - 1))
    return float(d.mean()), float(d.mean() - tcrit * se), float(d.mean() + tcrit * se), p


def holm_levels(pvalues: list[float], alpha: float = 0.05) -> list[float]:
    """Holm's step-down levels: the i-th smallest p-value is tested at alpha / (m - i); from the first
    that fails, every later comparison keeps that level. A comparison is rejected when p <= its level."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: (math.isnan(pvalues[i]), pvalues[i]))
    levels = [alpha] * m
    stopped = None
    for rank, i in enumerate(order):
        level = alpha / (m - rank) if stopped is None else stopped
        levels[i] = level
        if stopped is None and not pvalues[i] <= level:
            stopped = level
    return levels


def seed_level_interval(diffs: list[float], level: float = 0.05) -> tuple[float, float, float]:
    """Mean and t-interval of per-seed paired differences: what a study without saved predictions
    (the early-training study keeps only per-seed metrics) can say about seed variance."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return float(d.mean()) if d.size else math.nan, math.nan, math.nan
    half = stats.t.ppf(1 - level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def paper_value(text: str) -> float | None:
    """The paper's number as a fraction; a published range gives its midpoint, unpublished None."""
    try:
        parts = [float(p) for p in text.split("-")]
    except ValueError:
        return None
    return sum(parts) / len(parts) / 100


def verdict(ours: tuple[float, float, float], paper_delta: float | None) -> str:
    point, lo, hi = ours
    if math.isnan(lo):
        return "no CI (bootstrap off)"
    if lo <= 0 <= hi:
        return "not resolved (corrected CI crosses 0)"
    if paper_delta is None:
        return "no published number"
    return "same direction as the paper" if (point > 0) == (paper_delta > 0) else "opposite to the paper"
