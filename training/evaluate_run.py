"""``ct-zeroshot-train evaluate``: evaluate a run's checkpoint on a split and write RUN/metrics.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from operators.contract.files import write_json
from operators.contract.scoring import merlin_present

from .cache import split_volumes
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
) -> tuple[Path, str]:
    from .devices import torch_device

    run = Path(run)
    device = torch_device(device)
    cfg = read_run_config(run)
    studies, volumes = split_volumes(cfg, data, split, cache_dir=cache_dir, progress=progress, labelled=True)
    model, cfg = load_run(run, checkpoint, device)
    labels = np.stack([s.labels for s in studies])
    kw = {} if occlusion_levels is None else {"occlusion_levels": occlusion_levels}
    metrics = evaluate_model(
        model,
        volumes,
        [s.findings_text for s in studies],  # the text tower applies text.keep_sentences itself
        labels,
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
    text = format_tables(metrics)
    if has_ground_truth(data):  # the synthetic corpus: every study-finding cell against the phantom's truth
        truth = load_ground_truth(data)
        metrics.update(truth_report(truth, [s.study_id for s in studies], margins, merlin_present(margins)))
        metrics["ground_truth"]["decision"] = "merlin: probability 0.5"
        text += "\n\n" + format_truth_tables(metrics)
    name = "metrics.json" if checkpoint == "best" else f"metrics_{checkpoint}.json"
    path = run / name
    write_json(path, metrics)
    np.savez_compressed(
        run / name.replace(".json", "_predictions.npz"),
        margins=margins,
        labels=labels,
        study_ids=np.array([s.study_id for s in studies]),
    )
    return path, text
