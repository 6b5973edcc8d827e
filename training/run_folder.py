"""The run folder: one reader and one writer for what a training run leaves behind.

A run folder holds ``config.yaml`` (the resolved config), ``text_model/`` (the offline tokenizer and
text-encoder init when no text model is given) and ``checkpoints/{init,last,best}.pt``. Everything
that reads a run (evaluation, export, the probe, the study runner) goes through this module rather
than through the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from operators.contract.files import atomic_path

from .config import TrainConfig
from .models.clip import DualEncoder
from .models.factory import make_model

CHECKPOINTS = ("best", "last", "init")


def config_path(run: Path) -> Path:
    return run / "config.yaml"


def read_run_config(run: str | Path) -> TrainConfig:
    run = Path(run)
    if not config_path(run).exists():
        raise ValueError(f"{run}: not a training run (no config.yaml)")
    return TrainConfig.load(str(config_path(run)))


def write_run_config(run: Path, cfg: TrainConfig) -> None:
    """Save the resolved config; refuse a folder whose checkpointed run has another config."""
    saved = config_path(run)
    if saved.exists() and checkpoint_path(run, "last").exists():
        prev = TrainConfig.load(str(saved))
        if prev.digest() != cfg.digest():
            raise ValueError(f"{run}: holds a run with a different config; use a new --out to start afresh")
    cfg.save(saved)


def checkpoint_path(run: Path, name: str) -> Path:
    return run / "checkpoints" / f"{name}.pt"


@dataclass
class Checkpoint:
    """One checkpoint file. ``init`` and ``best`` hold the model only; ``last`` holds what resume needs
    (optimiser, schedule, RNG, best-so-far, the config digest)."""

    model: dict[str, Any]
    step: int
    val: float | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    best: dict[str, Any] = field(default_factory=dict)
    config_digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "step": self.step}
        if self.optimizer is None:
            if self.step > 0 or self.val is not None:
                out["val"] = self.val
            return out
        out.update(
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            rng=self.rng,
            best=self.best,
            config_digest=self.config_digest,
        )
        return out

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(self.to_dict(), tmp)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        if not path.exists():
            raise ValueError(f"{path}: checkpoint does not exist")
        d = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(d, dict) or "model" not in d or "step" not in d:
            raise ValueError(f"{path}: not a ct-zeroshot checkpoint (no model state or step)")
        return cls(
            model=d["model"],
            step=int(d["step"]),
            val=d.get("val"),
            optimizer=d.get("optimizer"),
            scheduler=d.get("scheduler"),
            rng=d.get("rng"),
            best=d.get("best", {}),
            config_digest=d.get("config_digest"),
        )


def load_run(run: str | Path, checkpoint: str = "best", device=None) -> tuple[DualEncoder, TrainConfig]:
    """(model, config) of a finished or partial run; ``checkpoint`` is best, last or init."""
    run = Path(run)
    cfg = read_run_config(run)
    state = Checkpoint.load(checkpoint_path(run, checkpoint))
    model = make_model(cfg, run)
    model.load_state_dict(state.model)
    return model.to(device or "cpu").eval(), cfg
