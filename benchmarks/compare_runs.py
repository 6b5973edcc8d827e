"""Per finding, the test AUROC of evaluated runs side by side, against the report labels and the phantoms'
ground truth, with each corpus's no-image baseline: e.g. the CPU recipe on corpus versions 3 and 4.

    python -m benchmarks.compare_runs --run v3=runs/recipe/run=runs/recipe/corpus \\
        --run v4=runs/recipe-v4/run=runs/recipe-v4/corpus --out results/recipe-v4/compare

Each run needs its ``metrics.json`` (``ct-zeroshot-train evaluate``); its ground truth comes from there or,
for a run evaluated before ``metrics.json`` carried it, from its kept predictions and the corpus
(``RUN/ground_truth.json``). Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from operators.contract.files import write_atomic, write_json
from operators.contract.findings import load_catalogue
from training.research.study.statistics import run_truth


def _f(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def compare(runs: list[tuple[str, Path, Path]]) -> dict:
    out: dict = {"runs": {}, "per_finding": {}}
    for name, run, data in runs:
        m = json.loads((run / "metrics.json").read_text())
        truth = run_truth(run, data)
        if truth is None:
            raise SystemExit(f"compare_runs: {run}: no ground truth (no predictions kept, or {data} has no truth)")
        gt, base = truth["ground_truth"], truth["no_image_baseline"]
        out["runs"][name] = {
            "run": str(run),
            "data": str(data),
            "label_macro_auroc": m["zero_shot"]["macro_auroc"],
            "truth_macro_auroc": gt["macro_auroc"],
            "no_image_macro_auroc": base["macro_baseline_auroc"],
            "not_beating_baseline": base["not_beating_baseline"],
        }
        for fid in load_catalogue().ids:
            out["per_finding"].setdefault(fid, {})[name] = {
                "label_auroc": m["zero_shot"]["per_finding"][fid]["auroc"],
                "truth_auroc": gt["per_finding"][fid]["auroc"],
                "no_image_auroc": base["per_finding"][fid]["baseline_auroc"],
            }
    return out


def markdown(result: dict, command: str) -> str:
    names = list(result["runs"])
    head = " | ".join(f"{n}: labels | {n}: truth | {n}: no-image" for n in names)
    lines = [
        f"Command: `{command}`",
        "",
        "| | " + " | ".join(f"{n}" for n in names) + " |",
        "|---|" + "---|" * len(names),
        "| test macro AUROC, report labels | "
        + " | ".join(_f(r["label_macro_auroc"]) for r in result["runs"].values())
        + " |",
        "| test macro AUROC, ground truth | "
        + " | ".join(_f(r["truth_macro_auroc"]) for r in result["runs"].values())
        + " |",
        "| no-image baseline, ground truth | "
        + " | ".join(_f(r["no_image_macro_auroc"]) for r in result["runs"].values())
        + " |",
        "| findings not beating the baseline by 0.05 | "
        + " | ".join(", ".join(r["not_beating_baseline"]) or "none" for r in result["runs"].values())
        + " |",
        "",
        f"| finding | {head} |",
        "|---|" + "---|" * (3 * len(names)),
    ]
    for fid, per in result["per_finding"].items():
        cells = []
        for n in names:
            v = per[n]
            cells += [_f(v["label_auroc"]), _f(v["truth_auroc"]), _f(v["no_image_auroc"])]
        lines.append(f"| {fid} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_runs", description=__doc__)
    p.add_argument("--run", action="append", required=True, help="NAME=RUN=CORPUS (repeat)")
    p.add_argument("--out", required=True, help="writes OUT.md and OUT.json")
    args = p.parse_args(argv)
    runs = []
    for spec in args.run:
        parts = spec.split("=")
        if len(parts) != 3:
            p.error(f"--run {spec!r}: expected NAME=RUN=CORPUS")
        runs.append((parts[0], Path(parts[1]), Path(parts[2])))
    result = compare(runs)
    command = "python -m benchmarks.compare_runs " + " ".join(f"--run {s}" for s in args.run) + f" --out {args.out}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(f"{args.out}.json", result)
    write_atomic(f"{args.out}.md", markdown(result, command))
    print(f"{args.out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
