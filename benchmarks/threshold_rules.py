"""Threshold rules compared on the validation split, against the phantoms' ground truth.

    python -m benchmarks.threshold_rules --package operators/models/demo --data data/synth-12k-v3 \\
        --out results/thresholds/demo

A package's per-finding thresholds are chosen on the validation split's report labels
(``training.thresholds.choose_thresholds``: F1-best under a cap on calls per true positive, findings below a
validation AUROC floor not assessed). A synthetic corpus also knows the truth, so the thresholds could be
chosen against it instead, with or without the floor and with other caps. Which rule to ship is a decision,
so it is made on validation only: the validation studies are split in two halves at random (``--seed``),
each rule is fitted on one half and scored on the other (then the other way round), and the two scores are
averaged. Every rule is scored against the ground truth (macro F1 over the findings with both classes, a
finding not assessed counting 0; calls per truly present finding). The test split and any held-out corpus
are not read. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training.evaluate import macro_f1_from
from training.ground_truth import load_ground_truth, truth_matrix
from training.heldout import score_corpus
from training.thresholds import AUROC_FLOOR, MAX_CALL_RATIO, choose_thresholds

RULES = [  # (fitted against, AUROC floor, cap on calls per true positive)
    (target, floor, cap) for target in ("labels", "truth") for floor in (AUROC_FLOOR, 0.0) for cap in (1.5, 2.0, 3.0)
]


def compare_rules(probs: np.ndarray, labels: np.ndarray, truth: np.ndarray, seed: int) -> list[dict]:
    """Each rule fitted on one validation half and scored against the other half's truth, both ways."""
    order = np.random.default_rng(seed).permutation(len(probs))
    a, b = order[: len(order) // 2], order[len(order) // 2 :]
    rows = []
    for target, floor, cap in RULES:
        fit_to = labels if target == "labels" else truth
        scores = []
        for fit, held in ((a, b), (b, a)):
            thr, _, assessed = choose_thresholds(probs[fit], fit_to[fit], auroc_floor=floor, max_call_ratio=cap)
            called = (probs[held] >= thr) & assessed
            present = int(truth[held].sum())
            scores.append((macro_f1_from(called.astype(int), truth[held]), called.sum() / max(present, 1), assessed))
        rows.append(
            {
                "fitted_on": f"validation {target}",
                "auroc_floor": floor,
                "max_call_ratio": cap,
                "shipped_rule": target == "labels" and floor == AUROC_FLOOR and cap == MAX_CALL_RATIO,
                "truth_macro_f1": float(np.mean([s[0] for s in scores])),
                "calls_per_true_finding": float(np.mean([s[1] for s in scores])),
                "assessed": [int(s[2].sum()) for s in scores],
            }
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.threshold_rules", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--package", required=True, help="a model package")
    p.add_argument("--data", required=True, help="its development corpus (with ground_truth.jsonl)")
    p.add_argument("--out", required=True, help="OUT.json and OUT.md")
    p.add_argument("--seed", type=int, default=0, help="the random split of validation into halves (default 0)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    data = Path(args.data)
    ids, labels, probs, _, _, pkg = score_corpus(Path(args.package), data, split="validation", progress=not args.quiet)
    if not ids:
        raise SystemExit(f"threshold_rules: {data}: no validation study")
    truth = truth_matrix(load_ground_truth(data), ids, pkg.catalogue.ids)
    rows = compare_rules(probs, labels, truth, args.seed)
    cmd = f"python -m benchmarks.threshold_rules --package {args.package} --data {args.data} --out {args.out}"
    result = {
        "command": cmd,
        "package": {"name": pkg.name, "version": pkg.version, "uid": pkg.uid},
        "validation_studies": len(ids),
        "seed": args.seed,
        "rules": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Threshold rules on validation, {pkg.name} {pkg.version}",
        "",
        f"`{cmd}`: {len(ids)} validation studies in two random halves (seed {args.seed}); each rule fitted on "
        "one half, scored against the other half's ground truth, both ways, averaged.",
        "",
        "| fitted on | AUROC floor | calls cap | ground-truth macro F1 | calls per true finding | assessed |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        mark = " (shipped)" if r["shipped_rule"] else ""
        lines.append(
            f"| {r['fitted_on']}{mark} | {r['auroc_floor']:.2f} | {r['max_call_ratio']:.1f} "
            f"| {r['truth_macro_f1']:.4f} | {r['calls_per_true_finding']:.3f} | {' / '.join(map(str, r['assessed']))} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    best = max(rows, key=lambda r: r["truth_macro_f1"])
    print(
        f"best rule on validation: {best['fitted_on']}, floor {best['auroc_floor']}, cap {best['max_call_ratio']}: "
        f"ground-truth macro F1 {best['truth_macro_f1']:.4f}; {out.with_suffix('.md')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
