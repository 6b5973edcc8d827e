"""``ct-zeroshot-train evaluate``: evaluate a run's checkpoint on a split and write RUN/metrics.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from operators.contract.files import write_json

from .cache import split_volumes
from .evaluate import evaluate_model, format_tables
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
) -> tuple[Path, str]:
    run = Path(run)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    name = "metrics.json" if checkpoint == "best" else f"metrics_{checkpoint}.json"
    path = run / name
    write_json(path, metrics)
    np.savez_compressed(
        run / name.replace(".json", "_predictions.npz"),
        margins=margins,
        labels=labels,
        study_ids=np.array([s.study_id for s in studies]),
    )
    return path, format_tables(metrics)
