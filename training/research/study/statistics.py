"""Per-run metrics, the hierarchical paired bootstrap, Holm's correction, and the verdict of a comparison.

A comparison is a contrast: a weighted sum of arms' macro F1 (``a - b``, or a difference of differences
such as how much of the 20 % -> 100 % gap a method closes). Its interval comes from a two-level
bootstrap: each resample draws the seeds with replacement (the same seed indices for every arm, since
seed ``s`` gives every arm the same initial weights) and then the test studies with replacement (the
same studies for every arm and seed), so the interval holds the variance between training runs as well
as between test studies. Across the family of comparisons Holm's step-down correction sets each
interval's level; a comparison is *resolved* only when its corrected interval excludes zero.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from operators.contract.scoring import merlin_present


def _flatten(prefix: str, obj, rows: list) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, rows)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        rows.append((prefix, float(obj)))


def run_metrics(rd: Path) -> list[tuple[str, float]]:
    """(metric, value) pairs of one finished run."""
    m = json.loads((rd / "metrics.json").read_text())
    rows: list = [("macro_f1", m["zero_shot"]["macro_f1"]), ("macro_auroc", m["zero_shot"]["macro_auroc"])]
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


def predictions(rd: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.load(rd / "metrics_predictions.npz")
    return merlin_present(z["margins"]).astype(np.int8), z["labels"], z["study_ids"]


def hierarchical_bootstrap(
    terms: list[tuple[float, list[np.ndarray]]], labels: np.ndarray, n_boot: int, seed: int = 0
) -> tuple[float, np.ndarray]:
    """Point value and bootstrap samples of sum_k coef_k * mean over seeds of macro F1(arm_k).

    ``terms``: (coefficient, per-seed prediction matrices) per arm, the seed lists aligned (index i is
    the same training seed in every arm). Seeds and test studies are resampled (see the module text)."""
    from ...evaluate import macro_f1_from

    n_seeds = min(len(p) for _, p in terms)
    n = labels.shape[0]

    def value(seeds: np.ndarray, idx: np.ndarray) -> float:
        lab = labels[idx]
        return float(sum(c * np.mean([macro_f1_from(p[s][idx], lab) for s in seeds]) for c, p in terms))

    point = value(np.arange(n_seeds), np.arange(n))
    rng = np.random.default_rng(seed)
    boots = np.array([value(rng.integers(0, n_seeds, n_seeds), rng.integers(0, n, n)) for _ in range(n_boot)])
    return point, boots


def bootstrap_p(boots: np.ndarray) -> float:
    """Two-sided bootstrap p-value of 'the contrast is zero' (the percentile interval's duality)."""
    if boots.size == 0:
        return math.nan
    return float(min(1.0, 2 * min(np.mean(boots <= 0), np.mean(boots >= 0))))


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


def interval(boots: np.ndarray, level: float) -> tuple[float, float]:
    if boots.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(boots, [50 * level, 100 - 50 * level])
    return float(lo), float(hi)


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
