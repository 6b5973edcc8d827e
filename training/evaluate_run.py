"""``ct-zeroshot-train evaluate``: evaluate a run's checkpoint on a split and write RUN/metrics.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from operators.contract.files import write_json
from operators.contract.scoring import merlin_present

from .cache import split_volumes
from .data import DataError, load_studies, read_label_csv
from .evaluate import evaluate_model, format_tables
from .ground_truth import format_truth_tables, has_ground_truth, load_ground_truth, truth_report
from .run_folder import load_run, read_run_config


def evaluate_run(
    run: str | Path,
    data: str | Path,
    split: str = "test",
    checkpoint: str = "best",
    cache_dir=None,
    progress: bool = True,
    occlusion_levels=None,
    seed: int = 0,
    device: str = "auto",
    findings: str | Path | None = None,
    labels: str | Path | None = None,
) -> tuple[Path, str]:
    """Metrics of a run's checkpoint on one split, written to RUN/metrics*.json. With ``findings`` (a site's
    findings file) and ``labels`` (its label CSV), the file's findings are evaluated instead of the
    catalogue, with the same metrics, decided at each finding's threshold as the deployed package would."""
    from .devices import torch_device

    run = Path(run)
    device = torch_device(device)
    cfg = read_run_config(run)
    custom = _custom_findings(findings, labels)
    if custom is None:
        studies, volumes = split_volumes(cfg, data, split, cache_dir=cache_dir, progress=progress, labelled=True)
        label_matrix = np.stack([s.labels for s in studies])
    else:
        ff, by_study = custom
        in_split = [s for s in load_studies(data) if s.split == split]
        chosen = [s for s in in_split if s.study_id in by_study]
        if not chosen:
            raise DataError(f"{labels}: none of its {len(by_study)} studies is in split {split!r} of {data}")
        studies, volumes = split_volumes(cfg, data, split, cache_dir=cache_dir, progress=progress, studies=chosen)
        label_matrix = np.stack([by_study[s.study_id] for s in studies])
    model, cfg = load_run(run, checkpoint, device)
    kw = {} if occlusion_levels is None else {"occlusion_levels": occlusion_levels}
    if custom is not None:
        kw["findings"] = [c.finding for c in ff.findings]
        kw["thresholds"] = [c.threshold for c in ff.findings]
    metrics = evaluate_model(
        model,
        volumes,
        [s.findings_text for s in studies],  # the text tower applies text.keep_sentences itself
        label_matrix,
        device,
        seed=seed,
        batch_size=cfg.train.batch_size,
        progress=progress,
        **kw,
    )
    margins = metrics.pop("_margins")
    metrics.pop("_probabilities")
    metrics["meta"] = {
        "run": str(run),
        "checkpoint": checkpoint,
        "split": split,
        "studies": len(studies),
        "data": str(data),
        "config_digest": cfg.digest(),
    }
    name = "metrics.json" if checkpoint == "best" else f"metrics_{checkpoint}.json"
    if custom is not None:
        metrics["meta"]["findings"] = {
            "file": str(findings),
            "digest": ff.digest,
            "labels": str(labels),
            "decision": "each finding's threshold (probability)",
            "thresholds": {c.finding.id: c.threshold for c in ff.findings},
            "split_studies_without_labels": len(in_split) - len(studies),
            "label_rows_not_in_split": len(by_study) - len(studies),
        }
        name = name.replace(".json", f"_{ff.path.stem}.json")
    text = format_tables(metrics)
    if custom is None and has_ground_truth(data):  # synthetic corpus: every study-finding cell against the truth
        truth = load_ground_truth(data)
        metrics.update(truth_report(truth, [s.study_id for s in studies], margins, merlin_present(margins)))
        metrics["ground_truth"]["decision"] = "merlin: probability 0.5"
        text += "\n\n" + format_truth_tables(metrics)
    path = run / name
    write_json(path, metrics)
    np.savez_compressed(
        run / name.replace(".json", "_predictions.npz"),
        margins=margins,
        labels=label_matrix,
        study_ids=np.array([s.study_id for s in studies]),
    )
    return path, text


def _custom_findings(findings, labels):
    """(findings file, labels by study) for a site's own findings, or None for the catalogue."""
    if findings is None and labels is None:
        return None
    if findings is None or labels is None:
        raise DataError("a site's own findings are evaluated with both --findings FILE and --labels CSV")
    from operators.contract.custom_findings import read_findings_file

    ff = read_findings_file(findings)
    return ff, read_label_csv(labels, list(ff.ids))
