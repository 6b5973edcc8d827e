"""``ct-zeroshot-train heldout``: a released model's headline figures, from a corpus nothing was chosen on.

The development corpus's test split is read to report, and over a project's life many configurations are
compared on it; numbers from it carry that search. A release is therefore evaluated once more, on a fresh
corpus generated with its own seed (``docs/training.md`` names it), which no training, threshold, preset or
corpus decision has seen. This command runs the *package* as deployed (the ONNX image encoder, the
package's preprocessing, prompt embeddings and thresholds, on every study of that corpus) and writes a copy
of the package whose manifest holds the figures under ``model.evaluation``:

- against the report labels (labelled cells only, as in training);
- against the phantoms' ground truth (every study-finding cell): AUROC, F1 and calls per true finding;
- beside a no-image baseline per finding (``training.ground_truth``), fitted on the *development*
  corpus's training patients.

It refuses a package that already carries a held-out evaluation (a model is evaluated once), a held-out
corpus generated with the development corpus's seed, and a corpus without ground truth.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from operators import __version__
from operators.contract.files import write_json
from operators.contract.package import load_package, write_package_copy
from operators.contract.scoring import ZeroShotModel, decide_present, margin_probability

from .data import load_studies
from .ground_truth import (
    format_truth_tables,
    has_ground_truth,
    load_ground_truth,
    truth_report,
)

PROTOCOL = (
    "held out: a corpus generated with its own seed, never used for a training, threshold, preset or corpus "
    "decision; the package evaluated once on every study of it"
)


class HeldOutError(ValueError):
    """The held-out evaluation cannot run as asked; the message says why."""


def _corpus_record(data: Path) -> dict:
    path = data / "corpus.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HeldOutError(f"{path}: not a complete ct-zeroshot corpus ({exc})") from None
    if not isinstance(rec, dict) or "config" not in rec:
        raise HeldOutError(f"{path}: not a ct-zeroshot corpus record")
    return rec


def _label_metrics(probs: np.ndarray, decided: np.ndarray, labels: np.ndarray) -> dict:
    from .evaluate import macro_auroc, macro_f1_from

    return {
        "labelled_cells": int((labels != -1).sum()),
        "macro_auroc": macro_auroc(probs, labels),
        "macro_f1": macro_f1_from(decided.astype(int), labels),
        "macro_f1_merlin_rule": macro_f1_from((probs >= 0.5).astype(int), labels),
    }


def score_corpus(
    package: Path, data: Path, device: str = "cpu", batch: int = 8, progress: bool = True, split: str | None = None
):
    """(study ids, labels, probabilities, margins, decided, package) of the package on every study of
    ``data`` (of its ``split`` only, where given)."""
    from tqdm import tqdm

    from operators.contract.preprocessing import build_transform, preprocess

    from .data import load_volume

    pkg = load_package(package)
    model = ZeroShotModel(pkg, device=device)
    studies = [s for s in load_studies(data) if split is None or s.split == split]
    if not studies:
        return [], np.zeros((0, len(pkg.catalogue)), np.int8), *(np.zeros((0, len(pkg.catalogue))),) * 3, pkg
    transform = build_transform(pkg.spec)
    embs = []
    bar = tqdm(total=len(studies), desc=split or "scoring", unit="study", disable=not progress)
    for i in range(0, len(studies), batch):
        chunk = studies[i : i + batch]
        x = np.stack([preprocess(load_volume(s), pkg.spec, transform) for s in chunk])
        embs.append(model.embed_images(x))
        bar.update(len(chunk))
    bar.close()
    found = model.decide(np.concatenate(embs))
    probs = np.stack([f.probabilities for f in found])
    margins = np.stack([f.margins for f in found])
    decided = np.stack([f.present for f in found])
    labels = np.stack([s.labels for s in studies])
    return [s.study_id for s in studies], labels, probs, margins, decided, pkg


def evaluate_heldout(
    package: str | Path,
    data: str | Path,
    development: str | Path,
    out: str | Path,
    device: str = "cpu",
    progress: bool = True,
    log=print,
) -> dict:
    """Evaluate ``package`` once on the held-out corpus ``data``; write the package with the figures to
    ``out``; return the evaluation record."""
    package, data, development, out = Path(package), Path(data), Path(development), Path(out)
    if out.exists():
        raise HeldOutError(f"{out}: already exists; name a new folder for the evaluated package")
    manifest = json.loads((package / "manifest.json").read_text()) if (package / "manifest.json").is_file() else {}
    if manifest.get("model", {}).get("evaluation"):
        raise HeldOutError(
            f"{package}: already carries a held-out evaluation (model.evaluation); a released model is evaluated once"
        )
    held, dev = _corpus_record(data), _corpus_record(development)
    if data.resolve() == development.resolve() or held["config"].get("seed") == dev["config"].get("seed"):
        raise HeldOutError(
            f"{data}: generated with seed {held['config'].get('seed')}, the development corpus's seed; a held-out "
            "corpus has its own seed"
        )
    for corpus in (data, development):
        if not has_ground_truth(corpus):
            raise HeldOutError(f"{corpus}: has no ground_truth.jsonl; the held-out figures need the phantoms' truth")
    t0 = time.time()
    ids, labels, probs, margins, decided, pkg = score_corpus(package, data, device=device, progress=progress)
    truth, dev_truth = load_ground_truth(data), load_ground_truth(development)
    rep = truth_report(truth, ids, probs, decided, baseline_truth=dev_truth)
    gt, base = rep["ground_truth"], rep["no_image_baseline"]
    label_m = _label_metrics(probs, decided, labels)
    merlin = decide_present(margin_probability(margins, 1.0))
    per = {
        fid: {
            "present": v["present"],
            "calls": v["calls"],
            "true_calls": v["true_calls"],
            "gt_f1": v["f1"],
            "gt_auroc": v["auroc"],
            "baseline_auroc": base["per_finding"][fid]["baseline_auroc"],
            "assessed": bool(pkg.assessed[j]),
        }
        for j, (fid, v) in enumerate(gt["per_finding"].items())
    }
    conf = held["config"]
    evaluation = {
        "protocol": PROTOCOL,
        "corpus": {
            "generator": held.get("generator"),
            "corpus_version": held.get("corpus_version"),
            "seed": conf.get("seed"),
            "studies": held.get("studies"),
            "profile": conf.get("profile"),
            "command": f"ct-zeroshot-train synth {data} --studies {held.get('studies')} --seed {conf.get('seed')} "
            f"--corpus-version {held.get('corpus_version')}",
        },
        "development_corpus": {"seed": dev["config"].get("seed"), "studies": dev.get("studies")},
        "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "evaluated_by": f"ct-zeroshot {__version__}",
        "decision": "the package's per-finding thresholds (decision.threshold_method)",
        "report_labels": label_m,
        "ground_truth": {
            k: gt[k] for k in ("studies", "macro_auroc", "macro_f1", "calls_per_true_finding", "sensitivity")
        }
        | {
            "calls_per_true_finding_merlin_rule": float(
                merlin.sum() / max(1, int(sum(v["present"] for v in per.values())))
            )
        },
        "no_image_baseline": {
            "features": "age, sex and the true state of the other findings",
            "fitted_on": "the development corpus's training patients",
            "macro_auroc": base["macro_baseline_auroc"],
            "margin_required": base["margin_required"],
            "not_beating": base["not_beating_baseline"],
        },
        "per_finding": per,
        "seconds": round(time.time() - t0, 1),
    }
    manifest["model"]["evaluation"] = evaluation
    write_package_copy(package, out, manifest)
    log(format_truth_tables(rep))
    log(
        f"\nreport labels ({label_m['labelled_cells']} labelled cells): macro AUROC {label_m['macro_auroc']:.4f}  "
        f"macro F1 {label_m['macro_f1']:.4f} (package thresholds), {label_m['macro_f1_merlin_rule']:.4f} (0.5 rule)"
    )
    log(f"evaluated package: {out}")
    return evaluation


def write_evaluation_md(evaluation: dict, path: str | Path, command: str) -> Path:
    """The held-out evaluation as a Markdown table (the docs' table), with the command that made it."""
    e = evaluation
    gt, lab, base = e["ground_truth"], e["report_labels"], e["no_image_baseline"]

    def f(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    lines = [
        f"Held-out corpus: version {e['corpus']['corpus_version']}, seed {e['corpus']['seed']}, "
        f"{e['corpus']['studies']} studies (`{e['corpus']['command']}`); evaluated once with `{command}`.",
        "",
        "| against | macro AUROC | macro F1 | calls per true finding |",
        "|---|---|---|---|",
        f"| phantoms' ground truth (every cell) | {f(gt['macro_auroc'])} | {f(gt['macro_f1'])} | "
        f"{gt['calls_per_true_finding']:.2f} |",
        f"| report labels ({lab['labelled_cells']} labelled cells) | {f(lab['macro_auroc'])} | "
        f"{f(lab['macro_f1'])} | - |",
        f"| no-image baseline, ground truth | {f(base['macro_auroc'])} | - | - |",
        "",
        "| finding | present | calls | F1 (truth) | AUROC (truth) | no-image AUROC | margin |",
        "|---|---|---|---|---|---|---|",
    ]
    for fid, v in e["per_finding"].items():
        margin = None if v["gt_auroc"] is None or v["baseline_auroc"] is None else v["gt_auroc"] - v["baseline_auroc"]
        flag = " **below**" if fid in base["not_beating"] else ""
        lines.append(
            f"| {fid} | {v['present']} | {v['calls']} | {f(v['gt_f1'])} | {f(v['gt_auroc'])} | "
            f"{f(v['baseline_auroc'])} | {'-' if margin is None else format(margin, '+.3f')}{flag} |"
        )
    lines += [
        "",
        f"Not beating the no-image baseline by {base['margin_required']} AUROC: "
        + (", ".join(base["not_beating"]) or "none")
        + ".",
    ]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def save_evaluation(evaluation: dict, path: str | Path) -> None:
    write_json(Path(path), evaluation)
