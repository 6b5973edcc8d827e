"""``results.csv`` and ``summary.md`` from the finished runs of a study."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from operators.contract.files import write_atomic

from .arms import ARM_BY_NAME, SCALING_ARMS, SUBSET_FRACTION, Arm, Contrast, StudyPreset, contrasts
from .plots import plots
from .statistics import (
    bootstrap_p,
    hierarchical_bootstrap,
    holm_levels,
    interval,
    paper_value,
    predictions,
    run_metrics,
    verdict,
)

_SELECTED = {"macro_f1": "macro F1", "macro_auroc": "macro AUROC"}  # train.select, as the summary says it


@dataclass
class Comparison:
    contrast: Contrast
    seeds: int  # seeds common to every arm of the contrast
    point: float
    p: float
    level: float  # Holm's level for this comparison
    lo: float
    hi: float
    paper_delta: float | None

    @property
    def ci(self) -> tuple[float, float, float]:
        return self.point, self.lo, self.hi


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / arm / f"seed{seed}"


def finished_run(rd: Path, digest: str) -> dict | None:
    marker = rd / "study_run.json"
    if not marker.exists():
        return None
    info = json.loads(marker.read_text())
    return info if info.get("config_digest") == digest else None


def aggregate(preset: StudyPreset, out: Path, seeds: int, record: dict | None = None, progress: bool = True) -> None:
    """results.csv, summary.md and the plots from every finished run of the study."""
    from operators.contract.findings import load_catalogue

    arms = [ARM_BY_NAME[a] for a in preset.arms]
    finished: dict[str, list[int]] = {}
    rows = []
    for arm in arms:
        for seed in range(seeds):
            rd = run_dir(out, arm.name, seed)
            if not finished_run(rd, preset.train_config(arm, seed).digest()):
                continue
            finished.setdefault(arm.name, []).append(seed)
            rows += [(arm.name, seed, k, v) for k, v in run_metrics(rd)]
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["arm", "seed", "metric", "value"])
    w.writerows((a, s, k, f"{v:.6g}") for a, s, k, v in rows)
    write_atomic(out / "results.csv", buf.getvalue())

    table: dict[tuple[str, str], list[float]] = {}
    for a, _s, k, v in rows:
        table.setdefault((a, k), []).append(v)

    def stat(arm: str, key: str) -> tuple[float, float, int]:
        v = table.get((arm, key), [])
        if not v:
            return math.nan, math.nan, 0
        return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v)

    preds, labels_ref = {}, None
    for arm, ss in finished.items():
        preds[arm] = {}
        for s in ss:
            p, lab, ids = predictions(run_dir(out, arm, s))
            if labels_ref is None:
                labels_ref, ids_ref = lab, ids
            elif not np.array_equal(ids, ids_ref):
                raise ValueError(f"{run_dir(out, arm, s)}: evaluated on different studies than the other runs")
            preds[arm][s] = p

    def boot(c: Contrast) -> tuple[int, float, np.ndarray] | None:
        common = sorted(set.intersection(*(set(preds.get(a, {})) for a, _ in c.terms)))
        if not common:
            return None
        terms = [(float(coef), [preds[a][s] for s in common]) for a, coef in c.terms]
        point, boots = hierarchical_bootstrap(terms, labels_ref, preset.bootstrap, seed=0)
        return len(common), point, boots

    def unadjusted(c: Contrast) -> tuple[float, float, float] | None:
        b = boot(c)
        return None if b is None else (b[1], *interval(b[2], 0.05))

    deltas = {
        arm.name: unadjusted(Contrast(arm.name, ((arm.name, 1), ("random", -1)), ""))
        for arm in arms
        if arm.name != "random"
    }
    family = [(c, boot(c)) for c in contrasts(preset.arms)]
    family = [(c, b) for c, b in family if b is not None]
    levels = holm_levels([bootstrap_p(b[2]) for _, b in family])
    comparisons = []
    for (c, (n_seeds, point, boots)), level in zip(family, levels):
        paper_delta = None
        if c.paper:
            pa, pb = (paper_value(ARM_BY_NAME[a].paper) for a in c.paper)
            paper_delta = None if pa is None or pb is None else pa - pb
        lo, hi = interval(boots, level) if boots.size else (math.nan, math.nan)
        comparisons.append(Comparison(c, n_seeds, point, bootstrap_p(boots), level, lo, hi, paper_delta))

    catalogue = load_catalogue()
    tables = StudyTables(
        preset=preset,
        out=out,
        seeds=seeds,
        record=record or {},
        arms=arms,
        finished=finished,
        stat=stat,
        deltas=deltas,
        comparisons=comparisons,
        catalogue=catalogue,
        labels=labels_ref,
    )
    write_atomic(out / "summary.md", summary_md(tables))
    from .seed_level import write_seed_level

    write_seed_level(preset, out)
    plots(preset, out, arms, stat, catalogue)
    if progress:
        print(f"results: {out / 'results.csv'}\nsummary: {out / 'summary.md'}", flush=True)


def _pm(mean: float, std: float, scale: float = 100) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean * scale:.2f}" + ("" if math.isnan(std) else f" +- {std * scale:.2f}")


def _ci(c) -> str:
    if c is None:
        return "-"
    point, lo, hi = c
    if math.isnan(lo):
        return f"{point * 100:+.2f}"
    return f"{point * 100:+.2f} [{lo * 100:+.2f}, {hi * 100:+.2f}]"


def _shown(path) -> str:
    """A path as a reader would type it: relative to the working directory when below it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass
class StudyTables:
    """What ``summary.md`` is written from: the preset, the finished runs and their statistics."""

    preset: StudyPreset
    out: Path
    seeds: int
    record: dict
    arms: list[Arm]
    finished: dict[str, list[int]]
    stat: Callable[[str, str], tuple[float, float, int]]  # (arm, metric) -> mean, std, n over seeds
    deltas: dict[str, tuple[float, float, float] | None]  # arm -> its difference to random [CI]
    comparisons: list[Comparison]  # the family, Holm-corrected
    catalogue: Any
    labels: np.ndarray | None


def summary_md(t: StudyTables) -> str:
    preset, out, seeds, record, arms = t.preset, t.out, t.seeds, t.record, t.arms
    finished, stat, deltas, comparisons, catalogue, labels = (
        t.finished,
        t.stat,
        t.deltas,
        t.comparisons,
        t.catalogue,
        t.labels,
    )
    tc = preset.train_config(ARM_BY_NAME["random"], 0).train
    n_runs = sum(len(v) for v in finished.values())
    seconds = sum(s["seconds"] for s in record.get("sessions", []))
    lines = [
        f"# Sampler study `{preset.name}`",
        "",
        preset.description.strip(),
        "",
        f"- Command: `ct-zeroshot-train study --preset {preset.name} --data {_shown(record.get('data', '?'))} "
        f"--out {_shown(out)} --seeds {seeds}`",
        f"- Runs finished: {n_runs} of {len(arms) * seeds} ({len(arms)} arms x {seeds} seeds); "
        f"wall time of the study command(s): {seconds / 60:.1f} min",
        f"- Every arm: training preset `{preset.train_preset}` with {list(preset.overrides)}; "
        f"{tc.steps} steps of batch {tc.batch_size}, the same LR schedule and alternation schedule; "
        + (
            "only `sampler.*` differs"
            if not any(a.overrides for a in arms)
            else "arms differ in `sampler.*` and in the overrides of their own: "
            + "; ".join(f"`{a.name}` {list(a.overrides)}" for a in arms if a.overrides)
        )
        + f". Checkpoint chosen on validation zero-shot {_SELECTED[tc.select]}.",
        f"- Subset: {preset.subset_fraction:.4f} of the training split (the paper's: 4,362 / 15,331 = "
        f"{SUBSET_FRACTION:.4f}), "
        f"fixed by `sampler.subset_seed`; 20 % within 40 % within 100 %.",
        f"- Evaluated on the `{preset.split}` split ({0 if labels is None else labels.shape[0]} studies); "
        f"CIs: hierarchical paired bootstrap ({preset.bootstrap} resamples: training seeds, then test "
        "studies, with replacement, the same draws for every arm), so they hold seed variance; the "
        "comparisons' intervals are corrected for the family by Holm's step-down levels, and a comparison "
        "is resolved only when its corrected interval excludes 0. Macro F1 in %.",
        "",
    ]
    lines += [
        "## Arms",
        "",
        "| arm | pool | unique volumes / full epoch | "
        "section items with a finding: rule (balanceable sections) / labels | "
        "macro F1 (mean +- std) | macro AUROC | delta vs random [95% CI, uncorrected] | paper macro F1 | "
        "train min / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        m, s, n = stat(arm.name, "macro_f1")
        auc = stat(arm.name, "macro_auroc")
        pool = stat(arm.name, "pool_size")[0]
        uniq = stat(arm.name, "unique_volumes_per_epoch")[0]
        share = stat(arm.name, "finding_share/balanceable_by_rule")[0], stat(arm.name, "finding_share/by_labels")[0]
        minutes = stat(arm.name, "train_seconds")[0] / 60
        lines.append(
            f"| {arm.label} (`{arm.name}`, n={n}) | {'-' if math.isnan(pool) else int(pool)} | "
            f"{'-' if math.isnan(uniq) else f'{uniq:.0f}'} | "
            + ("-" if math.isnan(share[0]) else f"{share[0] * 100:.1f} % / {share[1] * 100:.1f} %")
            + f" | {_pm(m, s)} | {_pm(*auc[:2])} | "
            f"{'baseline' if arm.name == 'random' else _ci(deltas.get(arm.name))} | {arm.paper} | "
            f"{'-' if math.isnan(minutes) else f'{minutes:.1f}'} |"
        )
    lines += [
        "",
        "## The paper's comparisons",
        "",
        "| comparison | seeds | ours: delta [Holm-corrected CI] | level | p | paper: delta | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        pd = "-" if c.paper_delta is None else f"{c.paper_delta * 100:+.2f}"
        lines.append(
            f"| {c.contrast.name} | {c.seeds} | {_ci(c.ci)} | {(1 - c.level) * 100:.2f} % | {c.p:.3f} | {pd} | "
            f"{verdict(c.ci, c.paper_delta)} |"
        )
    lines += [
        "",
        "Paper deltas from its table (arXiv 2604.13561); the 25:75 and 50:50 arms were published only as "
        "'between 71.65 and 72.02', whose midpoint is used. A difference of differences (the last rows, "
        "where present) answers: "
        + "; ".join(f"*{c.contrast.name}*: {c.contrast.question}" for c in comparisons if len(c.contrast.terms) > 2),
        "",
    ]

    present = [a for a in SCALING_ARMS if a in finished]
    if present:
        lines += [
            "## Data sensitivity per finding (F1 %, mean over seeds)",
            "",
            "| finding | " + " | ".join(present) + " | 100 % - 20 % |",
            "|---|" + "---|" * (len(present) + 1),
        ]
        per = []
        for f in catalogue:
            vals = [stat(a, f"f1/{f.id}")[0] for a in present]
            gain = vals[-1] - vals[0] if len(vals) > 1 else math.nan
            per.append((f.id, vals, gain))
        per.sort(key=lambda r: -np.nan_to_num(r[2], nan=-9))
        for fid, vals, gain in per:
            lines.append(
                f"| {fid} | "
                + " | ".join("-" if math.isnan(v) else f"{v * 100:.1f}" for v in vals)
                + f" | {'-' if math.isnan(gain) else f'{gain * 100:+.1f}'} |"
            )
        lines.append("")
    levels = [f"{int(round(x * 100))}%" for x in preset.occlusion]
    lines += [
        "## Retrieval and occlusion (mean over seeds)",
        "",
        "| arm | i->r R@5 | r->i R@5 | " + " | ".join(f"F1 @ {lv} occluded" for lv in levels) + " |",
        "|---|---|---|" + "---|" * len(levels),
    ]
    for arm in arms:
        ir = stat(arm.name, "retrieval/image_to_report/R@5")[0]
        ri = stat(arm.name, "retrieval/report_to_image/R@5")[0]
        occ = [stat(arm.name, f"occlusion/{lv}/macro_f1")[0] for lv in levels]
        lines.append(
            f"| `{arm.name}` | {ir * 100:.1f} | {ri * 100:.1f} | "
            + " | ".join("-" if math.isnan(o) else f"{o * 100:.2f}" for o in occ)
            + " |"
        )
    lines += [
        "",
        "Plots: `arms.png` (macro F1 per arm, mean +- std, paper values), `scaling.png` (20/40/100 % of the "
        "subset), `per_finding.png` (F1 per finding and arm), `sensitivity.png` (F1 gain per finding from "
        "20 % to 100 %), `occlusion.png` (macro F1 and R@5 under occlusion).",
        "",
    ]
    return "\n".join(lines)
