"""Sampler studies: ``ct-zeroshot-train study --preset NAME --data DIR --out DIR [--seeds K] [--resume]``.

Runs the seed paper's arms with K seeds each, every arm with the same steps, LR schedule and
alternation schedule (only ``sampler.*`` differs between arms), evaluates every run on the test
split (zero-shot F1/AUROC, retrieval, occlusion) and writes, in DIR:

- ``results.csv``: one row per (arm, seed, metric, value);
- ``summary.md``: per-arm mean +- std over seeds, each comparison's seed-level interval (per-seed paired
  differences, widened by the shared test studies' sampling variance, Holm-corrected) for macro F1 and
  macro AUROC, the paper's number beside ours, the verdict per comparison, per-finding data sensitivity;
- ``seed_level.md``: every comparison's per-seed differences, for both metrics;
- ``arms.png``, ``scaling.png``, ``per_finding.png``, ``occlusion.png``;
- ``runs/<arm>/seed<k>/``: each run (an ordinary training run, resumable on its own).

A study is resumable: ``--resume`` skips runs that finished (``study_run.json`` is written last,
after the test metrics and predictions) and resumes a run that was cut off from its last
checkpoint, which the training loop does exactly. Runs are independent processes
(``jobs`` at a time, ``threads`` torch threads each); a run's result does not depend on the order.

The package: ``arms`` (the paper's arms, study presets), ``runner`` (the grid of runs),
``statistics`` (per-run metrics, seed-level intervals with a test-study stage, Holm, verdicts), ``seed_level``
(the comparisons), ``report`` (results.csv,
summary.md), ``plots``. The command line is in ``training.cli``.
"""

from .arms import ARM_BY_NAME, ARMS, SCALING_ARMS, SUBSET_FRACTION, Arm, StudyPreset
from .report import aggregate, finished_run, run_dir
from .runner import run_study
from .statistics import holm_levels, run_metrics, sign_flip_p, two_stage, verdict

__all__ = [
    "ARMS",
    "ARM_BY_NAME",
    "SCALING_ARMS",
    "SUBSET_FRACTION",
    "Arm",
    "StudyPreset",
    "aggregate",
    "finished_run",
    "holm_levels",
    "run_dir",
    "run_metrics",
    "run_study",
    "sign_flip_p",
    "two_stage",
    "verdict",
]
