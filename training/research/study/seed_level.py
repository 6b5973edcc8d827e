"""Seed-level intervals from ``results.csv`` alone, for a study whose per-study predictions are gone.

Each comparison's per-seed paired differences of macro F1 (seed ``s`` of one arm against seed ``s`` of
the other) give a t-interval; Holm's step-down levels correct the family, as in ``summary.md``. With
three seeds such intervals are wide: that is the point, since the early-training study's bootstrap over
test studies with the seeds held fixed left this variance out.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from operators.contract.files import write_atomic

from .arms import StudyPreset, contrasts
from .statistics import holm_levels, seed_level_interval


def _t_p(diffs: list[float]) -> float:
    from scipy import stats

    if len(diffs) < 2 or all(d == diffs[0] for d in diffs):
        return math.nan
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def seed_level_md(preset: StudyPreset, out: Path) -> str:
    per: dict[tuple[str, int], float] = {}
    with open(out / "results.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if r["metric"] == "macro_f1":
                per[(r["arm"], int(r["seed"]))] = float(r["value"])
    family = []
    for c in contrasts(preset.arms):
        seeds = sorted(set.intersection(*({s for a, s in per if a == arm} for arm, _ in c.terms)))
        diffs = [sum(coef * per[(arm, s)] for arm, coef in c.terms) * 100 for s in seeds]
        family.append((c, seeds, diffs))
    levels = holm_levels([_t_p(d) for _, _, d in family])
    lines = [
        f"# Seed-level comparisons of `{preset.name}` (from results.csv)",
        "",
        "Per-seed paired differences of test macro F1 (points), their mean and t-interval at Holm's level "
        "for the family; resolved only when the interval excludes 0.",
        "",
        "| comparison | per-seed differences | mean [Holm-corrected t-interval] | level | p | resolved |",
        "|---|---|---|---|---|---|",
    ]
    for (c, _seeds, diffs), level in zip(family, levels):
        mean, lo, hi = seed_level_interval(diffs, level)
        p = _t_p(diffs)
        resolved = not math.isnan(lo) and (lo > 0 or hi < 0)
        lines.append(
            f"| {c.name} | {', '.join(f'{d:+.2f}' for d in diffs)} | {mean:+.2f} [{lo:+.2f}, {hi:+.2f}] | "
            f"{(1 - level) * 100:.2f} % | {p:.3f} | {'yes' if resolved else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def write_seed_level(preset: StudyPreset, out: Path) -> Path:
    path = out / "seed_level.md"
    write_atomic(path, seed_level_md(preset, out))
    return path
