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

from .arms import ARM_BY_NAME, SCALING_ARMS, SUBSET_FRACTION, Arm, StudyPreset
from .plots import plots
from .seed_level import SeedComparison, compare, delta_vs, per_seed_values, write_seed_level
from .statistics import load_test_bootstrap, run_metrics

_SELECTED = {"macro_f1": "macro F1", "macro_auroc": "macro AUROC"}  # train.select, as the summary says it


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
    data = Path(record["data"]) if record and record.get("data") else None
    finished: dict[str, list[int]] = {}
    rows = []
    for arm in arms:
        for seed in range(seeds):
            rd = run_dir(out, arm.name, seed)
            if not finished_run(rd, preset.train_config(arm, seed).digest()):
                continue
            finished.setdefault(arm.name, []).append(seed)
            rows += [(arm.name, seed, k, v) for k, v in run_metrics(rd, data)]
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

    boots = {
        (arm, seed): load_test_bootstrap(run_dir(out, arm, seed), preset.bootstrap)
        for arm, seeds_done in finished.items()
        for seed in seeds_done
    }
    studies = {r["studies"] for r in boots.values() if r is not None}
    if len(studies) > 1:
        raise ValueError(f"{out}: the runs were evaluated on different numbers of test studies ({sorted(studies)})")
    values = per_seed_values(out)  # read once for every arm's delta
    deltas = {arm.name: delta_vs(values, arm.name, "random", boots) for arm in arms if arm.name != "random"}
    comparisons = compare(preset, out, boots)

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
        test_studies=next(iter(studies), None),
    )
    write_atomic(out / "summary.md", summary_md(tables))
    write_seed_level(preset, out, comparisons)
    plots(preset, out, arms, stat, catalogue)
    if progress:
        print(f"results: {out / 'results.csv'}\nsummary: {out / 'summary.md'}", flush=True)


def _pm(mean: float, std: float, scale: float = 100) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean * scale:.2f}" + ("" if math.isnan(std) else f" +- {std * scale:.2f}")


def _ci(c, scale: float = 1.0) -> str:
    """``(point, lo, hi)`` in points (times ``scale``) as text; the point alone where there is no interval."""
    if c is None:
        return "-"
    point, lo, hi = (v * scale for v in c)
    if math.isnan(lo):
        return f"{point:+.2f}"
    return f"{point:+.2f} [{lo:+.2f}, {hi:+.2f}]"


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
    deltas: dict[str, tuple[float, float, float] | None]  # arm -> its F1 difference to random, points [95 % CI]
    comparisons: list[SeedComparison]  # both metrics, both families, Holm-corrected
    catalogue: Any
    test_studies: int | None


def summary_md(t: StudyTables) -> str:
    preset, out, seeds, record, arms = t.preset, t.out, t.seeds, t.record, t.arms
    finished, stat, deltas, comparisons, catalogue = t.finished, t.stat, t.deltas, t.comparisons, t.catalogue
    tc = preset.train_config(ARM_BY_NAME["random"], 0).train
    n_runs = sum(len(v) for v in finished.values())
    counts = {a.name: len(finished.get(a.name, [])) for a in arms}
    base_cmd = (
        f"ct-zeroshot-train study --preset {preset.name} --data {_shown(record.get('data', '?'))} --out {_shown(out)}"
    )
    seconds = sum(s["seconds"] for s in record.get("sessions", []))
    # each run trains and evaluates on the preset's threads: the CPU time the study cost, wherever it ran
    run_seconds = 0.0
    for a in arms:
        for key in ("train_seconds", "eval_seconds"):
            mean, _, n = stat(a.name, key)
            run_seconds += mean * n if n else 0.0
    lines = [
        f"# Sampler study `{preset.name}`",
        "",
        preset.description.strip(),
        "",
        f"- Command: `{base_cmd} --seeds {min(counts.values(), default=seeds)}`"
        + (
            ""
            if len(set(counts.values())) <= 1
            else f", then `{base_cmd} --resume --seeds {max(counts.values())} --arms "
            + ",".join(a for a, n in counts.items() if n == max(counts.values()))
            + "`"
        ),
        f"- Runs finished: {n_runs} ("
        + (
            f"{len(arms)} arms x {seeds} seeds"
            if len(set(counts.values())) <= 1 and n_runs == len(arms) * seeds
            else ", ".join(f"`{a}` {n}" for a, n in counts.items()) + " seeds"
        )
        + f"); wall time of the study command(s) recorded in `study.json`: {seconds / 60:.1f} min; "
        f"training and test evaluation summed over the runs: {run_seconds / 60:.0f} min on "
        + (f"{preset.threads} thread{'s' if preset.threads > 1 else ''} each" if preset.threads else "torch's threads"),
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
        f"- Evaluated on the `{preset.split}` split ({t.test_studies or '?'} studies). The seed is the unit: "
        "each comparison's interval is a t-interval over its per-seed paired differences, widened by the test "
        f"studies' sampling variance ({preset.bootstrap} resamples of the shared test studies, the same draws "
        "for every run); Holm's step-down levels correct each family (the main contrasts; the others), and a "
        "comparison is resolved only when its corrected interval excludes 0 and the exact sign-flip test over "
        "the seeds agrees at that level. Macro F1 is Merlin's 0.5 rule, "
        "in %; per-seed detail and the AUROC comparisons of every contrast: `seed_level.md`.",
        "",
    ]
    lines += [
        "## Arms",
        "",
        "| arm | pool | unique volumes / full epoch | "
        "section items with a finding: rule (balanceable sections) / labels | "
        "macro F1 (mean +- std) | macro AUROC | F1 delta vs random [95% CI, uncorrected] | paper macro F1 | "
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
    if any(not math.isnan(stat(a.name, "truth/macro_auroc")[0]) for a in arms):
        base = stat("random", "truth/no_image_baseline_macro_auroc")[0]
        lines += [
            "",
            "## Against the phantoms' ground truth",
            "",
            "Every test study and finding (the report labels above cover only the cells a report mentions), "
            "decided by Merlin's 0.5 rule; mean +- std over seeds. The no-image baseline (age, sex and the other "
            "findings' truth, fitted on the training patients) reaches a macro AUROC of "
            + ("-" if math.isnan(base) else f"{base * 100:.2f}")
            + " on the same cells.",
            "",
            "| arm | macro AUROC (truth) | macro F1 (truth) | calls per true finding |",
            "|---|---|---|---|",
        ]
        for arm in arms:
            calls = stat(arm.name, "truth/calls_per_true_finding")
            lines.append(
                f"| `{arm.name}` | {_pm(*stat(arm.name, 'truth/macro_auroc')[:2])} | "
                f"{_pm(*stat(arm.name, 'truth/macro_f1')[:2])} | {_pm(*calls[:2], scale=1)} |"
            )
    lines += [
        "",
        "## The paper's comparisons",
        "",
        "| comparison | family | seeds | F1 delta [Holm-corrected CI] | p | sign-flip p | "
        "AUROC delta [Holm-corrected CI] | paper: F1 delta | verdict (F1) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    auroc = {(c.contrast.name, c.family): c for c in comparisons if c.metric == "macro_auroc"}
    for c in (c for c in comparisons if c.metric == "macro_f1"):
        a = auroc.get((c.contrast.name, c.family))
        pd = "-" if c.paper_delta is None else f"{c.paper_delta:+.2f}"
        lines.append(
            f"| {c.contrast.name} | {c.family} | {len(c.seeds)} | {_ci((c.mean, c.lo, c.hi))} | {c.p:.3f} | "
            f"{c.p_sign:.3f} | {'-' if a is None else _ci((a.mean, a.lo, a.hi))} | {pd} | "
            f"{c.verdict} |"
        )
    lines += [
        "",
        "Paper deltas from its table (arXiv 2604.13561); the 25:75 and 50:50 arms were published only as "
        "'between 71.65 and 72.02', whose midpoint is used. AUROC deltas in AUROC x 100. A difference "
        "of differences (rows where present) answers: "
        + "; ".join(
            f"*{c.contrast.name}*: {c.contrast.question}"
            for c in comparisons
            if len(c.contrast.terms) > 2 and c.metric == "macro_f1"
        ),
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
