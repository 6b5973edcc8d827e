"""The study's comparisons with the seed as the unit: per-seed paired differences, a test-study second
stage, Holm within each family, for macro F1 and macro AUROC (``statistics`` says how).

Inputs are files the study keeps: ``results.csv`` (every run's metrics) and each run's
``test_bootstrap.json`` (written from its predictions while they exist), so ``seed_level.md`` and the
summary's comparisons can be rebuilt from a checkout.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from operators.contract.files import write_atomic

from .arms import ARM_BY_NAME, MAIN_CONTRASTS, Contrast, StudyPreset, contrasts
from .statistics import METRICS, holm_levels, load_test_bootstrap, paper_value, sign_flip_p, two_stage, verdict

FAMILIES = ("main", "other")


@dataclass
class SeedComparison:
    contrast: Contrast
    metric: str
    family: str
    seeds: list[int]
    diffs: list[float]  # per seed, in points (x 100)
    test_var: float | None  # the test-study variance of the seed-mean contrast (points^2); None: not kept
    mean: float
    lo: float  # Holm-corrected interval (points)
    hi: float
    p: float  # two-stage t
    p_sign: float  # exact sign flip over the seeds
    level: float
    paper_delta: float | None  # points

    @property
    def resolved(self) -> bool:
        """The corrected interval excludes 0 and the exact sign-flip test agrees at the same level: a claim
        that rests on the t-distribution alone (3 seeds: the sign flip can never go below 0.25) is not made."""
        excludes = not math.isnan(self.lo) and (self.lo > 0 or self.hi < 0)
        return excludes and self.p_sign <= self.level

    @property
    def verdict(self) -> str:
        if not self.resolved and not math.isnan(self.lo) and (self.lo > 0 or self.hi < 0):
            return (
                f"not resolved (interval excludes 0; the sign flip over {len(self.seeds)} seeds: p {self.p_sign:.3f})"
            )
        ci = (self.mean / 100, self.lo / 100, self.hi / 100)
        return verdict(ci, None if self.paper_delta is None else self.paper_delta / 100)


def per_seed_values(out: Path) -> dict[tuple[str, int, str], float]:
    values = {}
    with open(out / "results.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if r["metric"] in METRICS:
                values[(r["arm"], int(r["seed"]), r["metric"])] = float(r["value"])
    return values


def _test_var(contrast: Contrast, seeds: list[int], boots: dict, metric: str) -> float | None:
    recs = [boots.get((arm, s)) for arm, _ in contrast.terms for s in seeds]
    if not seeds or any(r is None for r in recs) or len({(r["study_ids"], r["resamples"]) for r in recs}) != 1:
        return None
    total = sum(
        coef * np.mean([np.asarray(boots[(arm, s)][metric]) for s in seeds], axis=0) for arm, coef in contrast.terms
    )
    return float(np.var(total * 100, ddof=1))


def compare(preset: StudyPreset, out: Path, boots: dict | None = None) -> list[SeedComparison]:
    """Every comparison of the study, for both metrics, Holm-corrected within (metric, family).
    ``boots``: (arm, seed) -> the run's test-study resamples (``load_test_bootstrap``); default: read them."""
    from .report import run_dir

    values = per_seed_values(out)
    if boots is None:
        runs = {(a, s) for a, s, _ in values}
        boots = {(a, s): load_test_bootstrap(run_dir(out, a, s), preset.bootstrap) for a, s in runs}
    result: list[SeedComparison] = []
    for metric in METRICS:
        for family in FAMILIES:
            fam = [c for c in contrasts(preset.arms) if (c.name in MAIN_CONTRASTS) == (family == "main")]
            rows = []
            for c in fam:
                seeds = sorted(
                    set.intersection(*({s for a, s, m in values if a == arm and m == metric} for arm, _ in c.terms))
                )
                diffs = [sum(coef * values[(arm, s, metric)] for arm, coef in c.terms) * 100 for s in seeds]
                tv = _test_var(c, seeds, boots, metric)
                rows.append((c, seeds, diffs, tv, two_stage(diffs, tv)[3]))
            levels = holm_levels([r[4] for r in rows])
            for (c, seeds, diffs, tv, p), level in zip(rows, levels):
                mean, lo, hi, _ = two_stage(diffs, tv, level)
                paper = None
                if c.paper and metric == "macro_f1":
                    pa, pb = (paper_value(ARM_BY_NAME[a].paper) for a in c.paper)
                    paper = None if pa is None or pb is None else (pa - pb) * 100
                result.append(
                    SeedComparison(
                        c, metric, family, seeds, diffs, tv, mean, lo, hi, p, sign_flip_p(diffs), level, paper
                    )
                )
    return result


def delta_vs(values: dict, arm: str, base: str, boots: dict | None = None) -> tuple | None:
    """An arm's macro F1 difference to ``base`` (points) with its uncorrected two-stage 95 % interval;
    ``values``: ``per_seed_values`` of the study."""
    c = Contrast(f"{arm} vs {base}", ((arm, 1), (base, -1)), "")
    seeds = sorted(
        {s for a, s, m in values if a == arm and m == "macro_f1"}
        & {s for a, s, m in values if a == base and m == "macro_f1"}
    )
    if not seeds:
        return None
    diffs = [(values[(arm, s, "macro_f1")] - values[(base, s, "macro_f1")]) * 100 for s in seeds]
    return two_stage(diffs, _test_var(c, seeds, boots or {}, "macro_f1"))[:3]


_METRIC_NAME = {"macro_f1": "test macro F1 under Merlin's 0.5 rule", "macro_auroc": "test macro AUROC"}


def seed_level_md(preset: StudyPreset, out: Path, comps: list[SeedComparison] | None = None) -> str:
    comps = compare(preset, out) if comps is None else comps
    lines = [
        f"# Seed-level comparisons of `{preset.name}`",
        "",
        "Per-seed paired differences (points); their mean with a t-interval over the seeds, widened by the "
        "test studies' sampling variance (second stage) where the runs' `test_bootstrap.json` are kept; the "
        "interval at Holm's level within its family (main contrasts; the others). The sign-flip p is exact over "
        "the seeds' 2^n sign assignments; a comparison is resolved only when its interval excludes 0 and the "
        "sign-flip p is within the same level (never with fewer than 5 seeds at a 5 % family).",
    ]
    for metric in METRICS:
        for family in FAMILIES:
            rows = [c for c in comps if c.metric == metric and c.family == family]
            if not rows:
                continue
            lines += [
                "",
                f"## {_METRIC_NAME[metric]}: {'main contrasts' if family == 'main' else 'other contrasts'}",
                "",
                "| comparison | seeds | per-seed differences | test-study sd | mean [Holm-corrected interval] | "
                "level | p | sign-flip p | resolved |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for c in rows:
                sd = "-" if c.test_var is None else f"{math.sqrt(c.test_var):.2f}"
                lines.append(
                    f"| {c.contrast.name} | {len(c.seeds)} | {', '.join(f'{d:+.2f}' for d in c.diffs)} | {sd} | "
                    f"{c.mean:+.2f} [{c.lo:+.2f}, {c.hi:+.2f}] | {(1 - c.level) * 100:.2f} % | {c.p:.3f} | "
                    f"{c.p_sign:.3f} | {'yes' if c.resolved else 'no'} |"
                )
    return "\n".join(lines) + "\n"


def write_seed_level(preset: StudyPreset, out: Path, comps: list[SeedComparison] | None = None) -> Path:
    path = out / "seed_level.md"
    write_atomic(path, seed_level_md(preset, out, comps))
    return path
