"""Per-run metrics, the paired bootstrap over test studies, and the verdict of a comparison."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from operators.zeroshot import merlin_present


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
        epochs = [int(r["unique_volumes"]) for r in csv.DictReader(fh)]
    rows += [
        ("unique_volumes_per_epoch", float(np.mean(epochs))),
        ("pool_size", float(info["pool_size"])),
        ("best_step", float(info["best_step"])),
        ("train_seconds", info["train_seconds"]),
        ("eval_seconds", info["eval_seconds"]),
    ]
    return rows


def predictions(rd: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.load(rd / "metrics_predictions.npz")
    return merlin_present(z["margins"]).astype(np.int8), z["labels"], z["study_ids"]


def paired_bootstrap(
    pred_a: list[np.ndarray], pred_b: list[np.ndarray], labels: np.ndarray, n_boot: int, seed: int = 0
) -> tuple[float, float, float]:
    """Mean over seeds of macro F1(a) - macro F1(b), and its 95 % percentile CI from resampling the
    test studies (the same resample for every seed and both arms)."""
    from ..evaluate import macro_f1_from

    def diff(idx):
        lab = labels[idx]
        return float(np.mean([macro_f1_from(a[idx], lab) - macro_f1_from(b[idx], lab) for a, b in zip(pred_a, pred_b)]))

    n = labels.shape[0]
    point = diff(np.arange(n))
    if n_boot == 0:
        return point, math.nan, math.nan
    rng = np.random.default_rng(seed)
    boots = np.array([diff(rng.integers(0, n, n)) for _ in range(n_boot)])
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return point, float(lo), float(hi)


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
        return "inside the noise (CI crosses 0)"
    if paper_delta is None:
        return "no published number"
    return "same direction as the paper" if (point > 0) == (paper_delta > 0) else "opposite to the paper"
