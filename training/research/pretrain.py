"""Self-supervised image pretext: ``ct-zeroshot-train pretrain-image --data DIR --out DIR [--preset NAME]``.

Seed paper 002's first low-data method: adapt the image tower on the training volumes alone (no
reports, no labels) before the contrastive run. Two augmented views of each volume (MONAI's 3D
random crop, flip, intensity scale and shift, Gaussian noise, coarse dropout) go through the image
tower of the run's architecture; symmetric InfoNCE between the views (``loss.clip_loss`` at a
fixed temperature) pulls the views of one volume together and pushes other volumes away.

Outputs in DIR: ``config.yaml`` (the resolved config; ``pretrain.*`` holds this command's
settings), ``checkpoints/last.pt`` (resume), ``log.csv``, and ``image_init.pt`` (written last: the
tower's state dict with its architecture), which ``train`` loads with ``image.init=DIR/image_init.pt``.
Every step's batch and augmentations are a function of (seed, step), so a resumed pretext ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from operators.contract.files import atomic_path, write_json

from ..cache import CachedVolumes, build_cache, volume_cache
from ..config import TrainConfig
from ..data import load_studies
from ..loss import clip_loss
from ..models.image import ImageEncoder
from ..optim import warmup_cosine

INIT_FILE = "image_init.pt"


def _augment(cfg: TrainConfig):
    from monai.transforms import (
        Compose,
        RandCoarseDropout,
        RandFlip,
        RandGaussianNoise,
        RandScaleIntensity,
        RandShiftIntensity,
        RandSpatialCrop,
        SpatialPad,
    )

    p = cfg.pretrain
    size = [max(8, int(round(s * p.crop))) for s in cfg.spec.spatial_size]
    return Compose(
        [
            RandSpatialCrop(roi_size=size, random_size=False),
            SpatialPad(spatial_size=size),
            RandFlip(prob=0.5, spatial_axis=0),
            RandScaleIntensity(factors=0.15, prob=0.8),
            RandShiftIntensity(offsets=0.05, prob=0.8),
            RandGaussianNoise(prob=0.5, std=0.02),
            RandCoarseDropout(holes=4, spatial_size=[max(2, s // 6) for s in size], prob=0.5),
        ]
    )


def _views(volumes: CachedVolumes, idx: np.ndarray, transform, seed: int, step: int) -> tuple[torch.Tensor, ...]:
    """Two augmented views of each chosen volume, seeded by (seed, step, item, view)."""
    views: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for k, i in enumerate(idx):
        x = torch.from_numpy(np.ascontiguousarray(volumes[int(i)]))
        for v in (0, 1):
            transform.set_random_state(seed=int(np.random.SeedSequence([seed, step, k, v]).generate_state(1)[0]))
            views[v].append(torch.as_tensor(transform(x)).float())
    return torch.stack(views[0]), torch.stack(views[1])


def pretrain_image(
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    stop_after: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) the image pretext; returns its summary (``image_init.pt`` once finished)."""
    from tqdm import tqdm

    from ..run_folder import Checkpoint, write_run_config

    out = Path(out)
    p = cfg.pretrain
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_run_config(out, cfg)
    studies = [s for s in load_studies(data) if s.split == "train"]
    if len(studies) < p.batch_size:
        raise ValueError(f"{data}: {len(studies)} training volumes, fewer than one pretext batch ({p.batch_size})")
    cache = volume_cache(cfg.spec, cache_dir)
    build_cache(cache, studies, progress)
    volumes = CachedVolumes(cache, studies)

    torch.manual_seed(cfg.train.seed)
    model = ImageEncoder(cfg.image.arch, cfg.image.embed_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, p.steps, p.warmup_steps))
    last = out / "checkpoints" / "last.pt"
    start = 0
    if last.exists():
        state = Checkpoint.load(last)
        model.load_state_dict(state.model)
        opt.load_state_dict(state.optimizer)
        sched.load_state_dict(state.scheduler)
        start = state.step
    transform = _augment(cfg)
    scale = torch.tensor(1.0 / p.temperature)
    end = p.steps if stop_after is None else min(p.steps, stop_after)
    bar = tqdm(total=p.steps, initial=start, desc="pretrain-image", unit="step", disable=not progress)
    t0 = time.time()
    log_rows = []
    for step in range(start, end):
        model.train()
        idx = np.random.default_rng([cfg.train.seed, step]).choice(len(volumes), p.batch_size, replace=False)
        a, b = _views(volumes, idx, transform, cfg.train.seed, step)
        za = torch.nn.functional.normalize(model(a), dim=-1)
        zb = torch.nn.functional.normalize(model(b), dim=-1)
        loss = clip_loss(za, zb, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        log_rows.append(f"{step},{loss.item():.5f},{sched.get_last_lr()[0]:.3e},{time.time() - t0:.1f}\n")
        if (step + 1) % p.checkpoint_every == 0 or step + 1 == end:
            _flush_log(out / "log.csv", log_rows)
            log_rows = []
            Checkpoint(
                model=model.state_dict(),
                step=step + 1,
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                rng={},
                config_digest=cfg.digest(),
            ).save(last)
    bar.close()
    finished = end == p.steps
    summary = {
        "finished": finished,
        "steps_done": end,
        "steps": p.steps,
        "volumes": len(volumes),
        "seconds_this_process": round(time.time() - t0, 1),
        "config_digest": cfg.digest(),
    }
    if finished:
        init = {
            "arch": cfg.image.arch,
            "embed_dim": cfg.image.embed_dim,
            "state_dict": model.state_dict(),
            "pretext": "two-view InfoNCE",
            "steps": p.steps,
            "config_digest": cfg.digest(),
        }
        with atomic_path(out / INIT_FILE) as tmp:
            torch.save(init, tmp)
        write_json(out / "pretrain_summary.json", summary)
    return summary


def _flush_log(path: Path, rows: list[str]) -> None:
    new = not path.exists()
    with open(path, "a") as fh:
        if new:
            fh.write("step,loss,lr,seconds\n")
        fh.writelines(rows)


def load_image_init(model: ImageEncoder, path: str | Path, arch: str) -> None:
    """Load a pretext's ``image_init.pt`` into ``model`` strictly; refuse another architecture naming keys."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image.init {path}: file does not exist (run ct-zeroshot-train pretrain-image first)")
    init = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(init, dict) or "state_dict" not in init:
        raise ValueError(f"image.init {path}: not an image init written by pretrain-image")
    sd = init["state_dict"]
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if init.get("arch") != arch:
            parts.append(f"it was made for {init.get('arch')!r}, this run uses {arch!r}")
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape differs for {shapes[:5]}")
        raise ValueError(f"image.init {path}: does not fit the image tower: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
