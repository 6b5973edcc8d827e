"""The training loop: ``ct-zeroshot-train train --data DIR --out RUN [--preset NAME] [key=value ...]``.

Features are flags, not forks: mixed precision (bf16 autocast on CUDA), gradient checkpointing,
``torchrun`` DDP (NCCL on GPUs, gloo on CPUs) with the exact distributed InfoNCE, exact resume
from ``RUN/checkpoints/last.pt`` (model, optimiser, schedule, RNG state; batches are a function of
the step), deterministic seeds, and checkpoint selection on validation zero-shot macro F1.

Outputs in RUN: ``config.yaml`` (resolved), ``text_model/`` (offline tokenizer + encoder init when
no text model is given), ``checkpoints/{init,last,best}.pt``, ``log.csv``, ``epochs.csv`` (unique
volumes seen per epoch), ``val.csv``, ``train_summary.json`` (written last).
"""

from __future__ import annotations

import csv
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .cache import VolumeCache
from .config import TrainConfig
from .data import Study, load_studies
from .evaluate import embed_images, prompt_embeddings, zero_shot_metrics, zero_shot_scores
from .files import write_json
from .loss import clip_loss
from .models.clip import DualEncoder
from .models.image import ImageEncoder
from .models.text import TextEncoder, build_small_text_model, train_wordpiece
from .sampling import BatchPlanner


class CachedVolumes:
    """Sequence view of preprocessed volumes for a list of studies."""

    def __init__(self, cache: VolumeCache, studies: list[Study]):
        self.cache, self.studies = cache, studies

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.cache.get(self.studies[i])


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ct-zeroshot" / "volumes"


def distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def text_model_dir(cfg: TrainConfig, run: Path) -> Path:
    """The given Hugging Face folder, or the run's own offline text model."""
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
    image = ImageEncoder(cfg.image.arch, cfg.image.embed_dim)
    text = TextEncoder(text_model_dir(cfg, run), cfg.image.embed_dim, cfg.text.max_length, cfg.text.pooling)
    return DualEncoder(image, text, cfg.joint.init_logit_scale, cfg.joint.embed_norm)


def read_run_config(run: Path) -> TrainConfig:
    if not (run / "config.yaml").exists():
        raise ValueError(f"{run}: not a training run (no config.yaml)")
    return TrainConfig.load(str(run / "config.yaml"))


def _autocast(cfg: TrainConfig, device: torch.device):
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    if p == "fp32":
        return nullcontext(), None
    dtype = torch.bfloat16 if p == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if p == "fp16" else None
    return torch.autocast(device_type=device.type, dtype=dtype), scaler


def _optimizer(model: DualEncoder, cfg: TrainConfig):
    groups = {"image": [], "text": [], "none": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name == "logit_scale":
            groups["none"].append(p)
        elif name.startswith("encode_text"):
            groups["text"].append(p)
        else:
            groups["image"].append(p)
    o = cfg.optim
    opt = torch.optim.AdamW([
        {"params": groups["image"], "lr": o.lr, "weight_decay": o.weight_decay},
        {"params": groups["text"], "lr": o.text_lr, "weight_decay": o.weight_decay},
        {"params": groups["none"], "lr": o.lr, "weight_decay": 0.0},
    ])
    total = cfg.train.steps

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 0
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        t = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _save(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _truncate_csv(path: Path, max_step: int, key: str = "step") -> None:
    """On resume, drop log rows written after the checkpoint we resume from."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    keep = [r for r in rows if int(r[key]) < max_step]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)


def validation_f1(model, volumes: CachedVolumes, labels: np.ndarray, device, batch_size: int) -> dict:
    prompt_emb, rows = prompt_embeddings(model, device)
    img = embed_images(model, volumes, device, batch_size)
    margins, _ = zero_shot_scores(img, prompt_emb, rows, model.scale().item())
    return zero_shot_metrics(margins, labels)


def train(data: str | Path, out: str | Path, cfg: TrainConfig, cache_dir: str | Path | None = None,
          stop_after: int | None = None, progress: bool = True) -> dict:
    """Train (or resume) a run; returns the summary. ``stop_after`` ends early after that many steps."""
    from tqdm import tqdm

    rank, world, device = distributed()
    run = Path(out)
    ckpt_dir = run / "checkpoints"
    main = rank == 0
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        saved = run / "config.yaml"
        if saved.exists() and (ckpt_dir / "last.pt").exists():
            prev = TrainConfig.load(str(saved))
            if prev.digest() != cfg.digest():
                raise ValueError(f"{run}: holds a run with a different config; use a new --out to start afresh")
        cfg.save(saved)
    seed_everything(cfg.train.seed, cfg.train.deterministic)

    studies = load_studies(data)
    train_st = [s for s in studies if s.split == "train"]
    val_st = [s for s in studies if s.split == "validation"]
    if len(train_st) < cfg.train.batch_size * world:
        raise ValueError(f"{data}: {len(train_st)} training studies, fewer than one global batch")
    if cfg.train.eval_studies:
        val_st = val_st[: cfg.train.eval_studies]
    val_labels = np.stack([s.labels for s in val_st]) if val_st and all(s.labels is not None for s in val_st) else None

    cache = VolumeCache(cache_dir or default_cache_dir(), cfg.spec)
    if main:
        cache.build(train_st + val_st, workers=min(os.cpu_count() or 1, 8), progress=progress)
    if world > 1:
        torch.distributed.barrier()
    planner = BatchPlanner(train_st, cfg, world)
    if main:
        ensure_text_model(cfg, run, train_st)
    if world > 1:
        torch.distributed.barrier()
    model = make_model(cfg, run).to(device)
    model.set_gradient_checkpointing(cfg.train.grad_checkpointing)
    opt, sched = _optimizer(model, cfg)
    autocast, scaler = _autocast(cfg, device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model

    start, best = 0, {"step": -1, "macro_f1": -1.0}
    last = ckpt_dir / "last.pt"
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        start, best = state["step"], state["best"]
        if main:
            for name in ("log.csv", "val.csv"):
                _truncate_csv(run / name, start)
            _truncate_csv(run / "epochs.csv", planner.epoch(start), key="epoch")
    elif main:
        _save(ckpt_dir / "init.pt", {"model": model.state_dict(), "step": 0})

    volumes = CachedVolumes(cache, train_st)
    val_volumes = CachedVolumes(cache, val_st)
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    seen: set[int] = set()
    epoch_start = planner.epoch(start) * planner.steps_per_epoch
    for s in range(epoch_start, start):  # unique volumes of the current epoch so far (resume)
        seen.update(it.index for it in planner.global_items(s))
    bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", disable=not (progress and main))
    t0 = time.time()
    step = start
    for step in range(start, end):
        model.train()
        items = planner.global_items(step)
        seen.update(it.index for it in items)
        local = items[rank * cfg.train.batch_size:(rank + 1) * cfg.train.batch_size]
        images = torch.from_numpy(np.stack([volumes[it.index] for it in local])).to(device, non_blocking=True)
        tokens = model.encode_text.tokenize([planner.text_of(it) for it in local], device)
        with autocast:
            img, txt, scale = ddp(images, tokens["input_ids"], tokens["attention_mask"])
            loss = clip_loss(img.float(), txt.float(), scale)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        kind = planner.kind(step)
        if main and (step % cfg.train.log_every == 0 or step == end - 1):
            _append_csv(run / "log.csv", {"step": step, "epoch": planner.epoch(step), "kind": kind,
                                          "loss": f"{loss.item():.5f}", "lr": f"{sched.get_last_lr()[0]:.3e}",
                                          "logit_scale": f"{scale.item():.3f}", "seconds": f"{time.time() - t0:.1f}"})
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", kind=kind[:8])
        next_step = step + 1
        if main and (next_step % planner.steps_per_epoch == 0 or next_step == cfg.train.steps):
            _append_csv(run / "epochs.csv", {"epoch": planner.epoch(step), "last_step": step,
                                             "unique_volumes": len(seen), "pool": len(planner.pool)})
            seen = set()
        evaluate_now = next_step % cfg.train.eval_every == 0 or next_step == cfg.train.steps
        if evaluate_now and main and val_labels is not None:
            m = validation_f1(model, val_volumes, val_labels, device, cfg.train.batch_size)
            _append_csv(run / "val.csv", {"step": next_step, "macro_f1": f"{m['macro_f1']:.5f}",
                                          "macro_auroc": f"{m['macro_auroc']:.5f}"})
            if m["macro_f1"] > best["macro_f1"]:
                best = {"step": next_step, "macro_f1": m["macro_f1"]}
                _save(ckpt_dir / "best.pt", {"model": model.state_dict(), "step": next_step, "val": m["macro_f1"]})
        if main and (evaluate_now or next_step == end):
            _save(last, {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "rng": {"torch": torch.get_rng_state()}, "step": next_step, "best": best,
                         "config_digest": cfg.digest()})
    bar.close()
    finished = end == cfg.train.steps
    summary = {"finished": finished, "steps_done": end, "steps": cfg.train.steps, "best": best,
               "world_size": world, "device": str(device), "seconds_this_process": round(time.time() - t0, 1),
               "pool_size": len(planner.pool), "train_studies": len(train_st), "steps_per_epoch": planner.steps_per_epoch,
               "sampler_shortfall": dict(planner.shortfall), "config_digest": cfg.digest()}
    if main and finished:
        if not (ckpt_dir / "best.pt").exists():  # no validation labels: the last weights are the selection
            _save(ckpt_dir / "best.pt", {"model": model.state_dict(), "step": end, "val": None})
        write_json(run / "train_summary.json", summary)
    if world > 1:
        torch.distributed.barrier()
    return summary


def load_run(run: str | Path, checkpoint: str = "best", device=None):
    """(model, config) of a finished or partial run; ``checkpoint`` is best, last or init."""
    run = Path(run)
    cfg = read_run_config(run)
    path = run / "checkpoints" / f"{checkpoint}.pt"
    if not path.exists():
        raise ValueError(f"{path}: checkpoint does not exist")
    model = make_model(cfg, run)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
    return model.to(device or "cpu").eval(), cfg
