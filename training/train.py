"""The training loop: ``ct-zeroshot-train train --data DIR --out RUN [--preset NAME] [key=value ...]``.

Features are flags, not forks: mixed precision (bf16 autocast on CUDA), gradient checkpointing,
``torchrun`` DDP (NCCL on GPUs, gloo on CPUs) with the exact distributed InfoNCE, exact resume
from ``RUN/checkpoints/last.pt`` (model, optimiser, schedule, RNG state; batches are a function of
the step), deterministic seeds, and checkpoint selection on validation zero-shot macro F1.

Outputs in RUN (the folder's layout and readers are in ``runs.py``): ``config.yaml`` (resolved),
``text_model/``, ``checkpoints/{init,last,best}.pt``, ``log.csv``, ``epochs.csv`` (unique volumes
seen per epoch), ``val.csv``, ``tensorboard/`` (the same series as event files), ``train_summary.json``
(written last).

``train()`` is three parts: ``_set_up`` (folder, data, cache, model, optimiser, resume),
``_step`` (one optimisation step on this rank's slice of the global batch) and ``_after_step``
(logs, epoch accounting, validation, checkpoints).
"""

from __future__ import annotations

import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from operators.contract.files import write_json
from operators.contract.textnorm import normalize_text

from .cache import CachedVolumes, build_cache, volume_cache
from .config import TrainConfig
from .data import DataError, DataReport, load_studies
from .evaluate import embed_images, prompt_embeddings, zero_shot_metrics, zero_shot_scores
from .logs import append_csv, truncate_csv
from .loss import clip_loss, sentence_loss, text_keys
from .models.clip import DualEncoder
from .models.factory import ensure_text_model, make_model, text_feature_cache, trunk_features
from .optim import make_optimizer
from .run_folder import Checkpoint, checkpoint_path, write_run_config
from .sampling import BatchPlanner

MERLIN_INIT = "merlin:"  # image.init=merlin:FILE.pt: both towers and the logit scale from Merlin's checkpoint


def distributed(timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun, with ``timeout_s`` for
    every collective (a rank that waits longer for the others ends the job with an error naming it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        from datetime import timedelta

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
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


def _autocast(cfg: TrainConfig, device: torch.device):
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    if p == "fp32":
        return nullcontext(), None
    dtype = torch.bfloat16 if p == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if p == "fp16" else None
    return torch.autocast(device_type=device.type, dtype=dtype), scaler


def gather_shards(shard: torch.Tensor, world: int) -> torch.Tensor:
    """The rows of every rank's shard ``items[rank::world]`` back in item order (on every rank)."""
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, shard.cpu())
    out = torch.empty(sum(len(p) for p in parts), *shard.shape[1:], dtype=shard.dtype)
    for rank, p in enumerate(parts):
        out[rank::world] = p
    return out


def validate(r: _Run) -> dict | None:
    """Zero-shot metrics on the validation studies. Every rank embeds its share ``val[rank::world]`` (none
    waits an hour while rank 0 validates alone); rank 0 scores them all and gets the metrics, the others
    ``None``."""
    img = embed_images(r.model, r.val_volumes, r.device, r.cfg.train.batch_size)
    if r.world > 1:
        img = gather_shards(img, r.world)
        if not r.main:
            return None
    prompt_emb, rows = prompt_embeddings(r.model, r.device)
    margins, _ = zero_shot_scores(img, prompt_emb, rows, r.model.scale().item())
    return zero_shot_metrics(margins, r.val_labels)


@dataclass
class _Run:
    """Everything a training process holds between steps."""

    cfg: TrainConfig
    run: Path
    rank: int
    world: int
    device: torch.device
    planner: BatchPlanner
    model: DualEncoder
    ddp: Any
    opt: torch.optim.Optimizer
    sched: Any
    autocast: Any
    scaler: Any
    volumes: CachedVolumes
    val_volumes: CachedVolumes  # this rank's share of the validation studies (all of them in one process)
    val_labels: np.ndarray | None  # every validation study's labels (rank 0 scores them all)
    batches: Any = None  # the DataLoader of step volumes (train.num_workers > 0)
    tb: Any = None  # rank 0's tracking: TensorBoard (RUN/tensorboard/), MLflow when configured
    start: int = 0
    trunk: torch.Tensor | None = None  # frozen image stages' output per training volume (image.frozen_stages)
    best: dict = field(default_factory=lambda: {"step": -1})  # the step and value of train.select
    seen: set[int] = field(default_factory=set)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _set_up(data: str | Path, run: Path, cfg: TrainConfig, cache_dir, progress: bool, strict: bool = False) -> _Run:
    rank, world, device = distributed(cfg.train.dist_timeout_s)
    main = rank == 0
    if world > 1 and cfg.train.sync_batchnorm and device.type != "cuda":
        raise ValueError("train.sync_batchnorm needs CUDA devices (PyTorch's SyncBatchNorm); set it false for CPUs")
    if main:
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_run_config(run, cfg)
    seed_everything(cfg.train.seed, cfg.train.deterministic)

    report = DataReport()
    studies = load_studies(data, strict=strict, report=report)
    train_st = [s for s in studies if s.split == "train"]
    val_st = [s for s in studies if s.split == "validation"]
    if cfg.train.eval_studies:
        val_st = val_st[: cfg.train.eval_studies]

    cache = volume_cache(cfg.spec, cache_dir)
    failures: dict[str, str] = {}
    build_cache(cache, (train_st + val_st)[rank::world], progress and main, failures)  # each rank its shard
    if world > 1:  # every rank leaves out the same studies
        shards: list = [None] * world
        torch.distributed.all_gather_object(shards, failures)
        failures = {k: v for shard in shards for k, v in shard.items()}
    if failures:
        if strict:
            sid, reason = sorted(failures.items())[0]
            raise DataError(f"{data}: study {sid}: {reason} ({len(failures)} unreadable image(s); --strict)")
        for sid, reason in sorted(failures.items()):
            report.add(f"{data} study {sid}", sid, reason)
        train_st = [s for s in train_st if s.study_id not in failures]
        val_st = [s for s in val_st if s.study_id not in failures]
    if main:
        write_json(run / "data_report.json", report.to_dict())
        if report.skipped:
            print(f"data: {report.summary()}; every row in {run / 'data_report.json'}", flush=True)
    if len(train_st) < cfg.train.batch_size * world:
        raise ValueError(f"{data}: {len(train_st)} training studies, fewer than one global batch")
    val_labels = np.stack([s.labels for s in val_st]) if val_st and all(s.labels is not None for s in val_st) else None
    planner = BatchPlanner(train_st, cfg, world)
    if main:
        ensure_text_model(cfg, run, train_st)
    if world > 1:
        torch.distributed.barrier()
    model = make_model(cfg, run).to(device)
    if model.encode_text.locked:
        _warm_text_features(model, planner, text_feature_cache(cfg, run, cache_dir), main, world, progress)
    model.set_gradient_checkpointing(cfg.train.grad_checkpointing)
    if world > 1 and cfg.train.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt, sched = make_optimizer(model, cfg)
    autocast, scaler = _autocast(cfg, device)
    ddp = model
    if world > 1:
        # Parameters no step uses (a Hugging Face tower's pooler under first-token or mean pooling) would
        # leave DDP waiting for their gradients at the second step.
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, model.unused_parameter_names()
        )
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    r = _Run(
        cfg,
        run,
        rank,
        world,
        device,
        planner,
        model,
        ddp,
        opt,
        sched,
        autocast,
        scaler,
        CachedVolumes(cache, train_st),
        CachedVolumes(cache, val_st[rank::world]),
        val_labels,
    )

    last = checkpoint_path(run, "last")
    if last.exists():
        state = Checkpoint.load(last)
        model.load_state_dict(state.model)
        opt.load_state_dict(state.optimizer)
        sched.load_state_dict(state.scheduler)
        set_rng_state(state.rng, rank, world, device, last)
        r.start, r.best = state.step, state.best
        if main:
            truncate_csv(run / "log.csv", r.start)  # rows of the steps run before the checkpoint
            truncate_csv(run / "val.csv", r.start + 1)  # a row at the checkpoint's step was written before it
            truncate_csv(run / "epochs.csv", r.start, key="last_step")  # rows of epochs ended before start
    else:
        if cfg.image.init.startswith(MERLIN_INIT):  # fine-tuning: both towers from Merlin's checkpoint
            from .convert_merlin import load_merlin_init

            dropped = load_merlin_init(model, cfg.image.init[len(MERLIN_INIT) :])
            if main and dropped:
                print(f"image.init: Merlin's checkpoint loaded; {dropped} classifier tensors left out (unused here)")
        elif cfg.image.init:  # a fresh run starts from the pretext's image tower (every rank loads it)
            from .research.pretrain import load_image_init

            load_image_init(model.encode_image, cfg.image.init, cfg.image.arch)
        if main:
            Checkpoint(model=model.state_dict(), step=0).save(checkpoint_path(run, "init"))
    if cfg.image.frozen_stages and r.start < cfg.train.steps:  # a finished run trains no more
        r.trunk = trunk_features(
            model.encode_image, r.volumes, device, cfg.train.batch_size, progress and main, torch.float16
        )
    if cfg.train.num_workers and r.trunk is None:
        r.batches = step_loader(r, r.start, cfg.train.steps)
    if main:
        from .tracking import Tracking

        r.tb = Tracking(run, cfg, r.start)
    epoch_start = planner.epoch(r.start) * planner.steps_per_epoch
    for s in range(epoch_start, r.start):  # unique volumes of the current epoch so far (resume)
        r.seen.update(it.index for it in planner.global_items(s))
    return r


def _warm_text_features(
    model: DualEncoder, planner: BatchPlanner, path: Path, main: bool, world: int, progress: bool
) -> None:
    """A locked text tower: every training text's sentences through it once, kept on disk for other runs."""
    from .models.text import split_sentences

    enc = model.encode_text
    enc.load_features(path)
    texts = [planner.text_of(it) for it in planner.all_items()]
    units = [u for t in texts for u in split_sentences(t)] if enc.sentences else texts
    computed = enc.cache_features(units, progress=progress and main)
    if computed and main:
        enc.save_features(path)
    if world > 1:
        torch.distributed.barrier()


def _sentence_term(r: _Run, img, sent, scale, units, pairs) -> torch.Tensor:
    """``loss.sentence_loss`` of the step's images against its distinct sentences, as ``joint`` sets it."""
    joint = r.cfg.joint
    feats = None
    if joint.neighbours:  # the locked tower's cached output of each sentence (cached by the forward)
        feats = torch.stack([r.model.encode_text._features[u] for u in units])
    sigmoid = joint.loss == "sigmoid"
    return sentence_loss(
        img,
        sent,
        text_keys(units),
        torch.tensor(pairs),
        scale,
        r.model.logit_bias.float() if sigmoid else None,
        "sigmoid" if sigmoid else "softmax",
        features=feats,
        neighbours=joint.neighbours,
    )


def _step(r: _Run, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on this rank's slice of the step's global batch: (loss, logit scale)."""
    r.model.train()
    items = r.planner.global_items(step)
    r.seen.update(it.index for it in items)
    local = r.planner.local_items(step, r.rank, items)
    if r.trunk is not None:
        images = r.trunk[[it.index for it in local]].to(r.device, torch.float32, non_blocking=True)
    elif r.batches is not None:
        loaded_step, images = next(r.batches)
        if loaded_step != step:
            raise RuntimeError(f"the data loader gave step {loaded_step}'s volumes at step {step}")
        images = images.to(r.device, non_blocking=True)
    else:
        images = torch.from_numpy(np.stack([r.volumes[it.index] for it in local])).to(r.device, non_blocking=True)
    texts = [r.planner.text_of(it) for it in local]
    joint = r.cfg.joint
    by_sentence = joint.match == "sentences"
    units = pairs = None
    if by_sentence or joint.sentence_weight:
        units, pairs = r.model.encode_text.sentence_units(texts)
    with r.autocast:
        out = r.ddp(images, texts=None if by_sentence else texts, units=units, from_trunk=r.trunk is not None)
    img, txt, scale = out[0].float(), out[1].float(), out[2].float()  # the loss in float32, outside autocast
    if by_sentence:
        loss = _sentence_term(r, img, txt, scale, units, pairs)
    else:
        keys = None
        if joint.multi_positive:
            by_labels = joint.positives == "labels"
            keys = text_keys(
                [r.planner.label_key_of(it) if by_labels else normalize_text(t) for it, t in zip(local, texts)]
            )
        loss = clip_loss(img, txt, scale, keys=keys)
        if units is not None:  # the sentence-level term beside the report-level one (joint.sentence_weight)
            loss = loss + joint.sentence_weight * _sentence_term(r, img, out[3].float(), scale, units, pairs)
    r.opt.zero_grad(set_to_none=True)
    if r.scaler is not None:
        r.scaler.scale(loss).backward()
        r.scaler.unscale_(r.opt)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(r.model.parameters(), r.cfg.optim.grad_clip)
    if r.scaler is not None:
        r.scaler.step(r.opt)
        r.scaler.update()
    else:
        r.opt.step()
    r.model.clamp_logit_scale()
    r.sched.step()
    return loss, scale


def _after_step(r: _Run, step: int, end: int, loss: torch.Tensor, scale: torch.Tensor, t0: float) -> None:
    """Logs, epoch accounting, validation and checkpoints after ``step``."""
    cfg, run, planner = r.cfg, r.run, r.planner
    if r.main and (step % cfg.train.log_every == 0 or step == end - 1):
        append_csv(
            run / "log.csv",
            {
                "step": step,
                "epoch": planner.epoch(step),
                "kind": planner.kind(step),
                "loss": f"{loss.item():.5f}",
                "lr": f"{r.sched.get_last_lr()[0]:.3e}",
                "logit_scale": f"{scale.item():.3f}",
                "seconds": f"{time.time() - t0:.1f}",
            },
        )
        # TensorBoard's axis is the steps done (as val.csv's), so a resume from step k keeps exactly what <= k
        r.tb.scalar("train/loss", loss.item(), step + 1)
        r.tb.scalar("train/lr", r.sched.get_last_lr()[0], step + 1)
        r.tb.scalar("train/temperature", 1.0 / scale.item(), step + 1)
    next_step = step + 1
    if r.main and (next_step % planner.steps_per_epoch == 0 or next_step == cfg.train.steps):
        append_csv(
            run / "epochs.csv",
            {"epoch": planner.epoch(step), "last_step": step, "unique_volumes": len(r.seen), "pool": len(planner.pool)},
        )
        r.seen = set()
    evaluate_now = next_step % cfg.train.eval_every == 0 or next_step == cfg.train.steps
    m = validate(r) if evaluate_now and r.val_labels is not None else None
    if m is not None:
        append_csv(
            run / "val.csv",
            {"step": next_step, "macro_f1": f"{m['macro_f1']:.5f}", "macro_auroc": f"{m['macro_auroc']:.5f}"},
        )
        for name in ("macro_f1", "macro_auroc"):
            r.tb.scalar(f"validation/{name}", m[name], next_step)
        key = cfg.train.select
        if m[key] > r.best.get(key, -1.0):
            r.best = {"step": next_step, key: m[key]}
            Checkpoint(model=r.model.state_dict(), step=next_step, val=m[key]).save(checkpoint_path(run, "best"))
    if evaluate_now or next_step == end:
        rng = rng_state(r.device)
        if r.world > 1:  # every rank's generators (dropout draws differ between ranks), for an exact resume
            ranks: list = [None] * r.world
            torch.distributed.all_gather_object(ranks, rng)
            rng = {"ranks": ranks}
    if r.main and (evaluate_now or next_step == end):
        Checkpoint(
            model=r.model.state_dict(),
            step=next_step,
            optimizer=r.opt.state_dict(),
            scheduler=r.sched.state_dict(),
            rng=rng,
            best=r.best,
            config_digest=cfg.digest(),
        ).save(checkpoint_path(run, "last"))


def rng_state(device: torch.device) -> dict:
    """The generators a resumed run must continue: the CPU's, and the GPU's where the run uses one."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rng: dict, rank: int, world: int, device: torch.device, path: Path) -> None:
    """Restore this rank's generators from a checkpoint's ``rng`` (``rng_state``, or one per rank)."""
    if "ranks" in rng or world > 1:
        saved = len(rng.get("ranks", [rng]))
        if saved != world:
            raise ValueError(f"{path}: written by {saved} process(es); resume it with {saved}, not {world}")
        rng = rng["ranks"][rank]
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:  # dropout on the GPU draws from CUDA's generator
        torch.cuda.set_rng_state(rng["cuda"], device)


class StepVolumes(torch.utils.data.Dataset):
    """This rank's volumes of each step from ``start``, as one (B, 1, X, Y, Z) tensor per step: batches are
    a function of the step, so loading them in worker processes ahead of the step changes no number."""

    def __init__(self, planner: BatchPlanner, volumes: CachedVolumes, rank: int, start: int, end: int):
        self.planner, self.volumes, self.rank, self.start, self.end = planner, volumes, rank, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        step = self.start + i
        local = self.planner.local_items(step, self.rank, self.planner.global_items(step))
        return step, torch.from_numpy(np.stack([self.volumes[it.index] for it in local]))


def step_loader(r: _Run, start: int, end: int):
    """An iterator over (step, volumes) from ``train.num_workers`` loader processes, in pinned memory on CUDA."""
    loader = torch.utils.data.DataLoader(
        StepVolumes(r.planner, r.volumes, r.rank, start, end),
        batch_size=None,
        shuffle=False,
        num_workers=r.cfg.train.num_workers,
        pin_memory=r.device.type == "cuda",
        prefetch_factor=2,
        persistent_workers=False,
        # its own generator: the workers' seeds drawn from the global one would shift dropout's draws in a
        # resumed run (the loader starts at the resume, not at step 0)
        generator=torch.Generator().manual_seed(r.cfg.train.seed),
    )
    return iter(loader)


def train(
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    cache_dir: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    strict: bool = False,
) -> dict:
    """Train (or resume) a run; returns the summary. ``stop_after`` ends early after that many steps.
    Bad rows and unreadable images are left out and listed in ``RUN/data_report.json``; with ``strict``
    the first is an error."""
    from tqdm import tqdm

    run = Path(out)
    r = _set_up(data, run, cfg, cache_dir, progress, strict)
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    bar = tqdm(total=cfg.train.steps, initial=r.start, desc="train", unit="step", disable=not (progress and r.main))
    t0 = time.time()
    failed = True
    try:
        for step in range(r.start, end):
            loss, scale = _step(r, step)
            _after_step(r, step, end, loss, scale, t0)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", kind=r.planner.kind(step)[:8])
        failed = False
    finally:
        bar.close()
        if r.tb is not None:  # what was written so far is on disk, even when a step raised
            r.tb.close(failed)
    finished = end == cfg.train.steps
    summary = {
        "finished": finished,
        "steps_done": end,
        "steps": cfg.train.steps,
        "best": r.best,
        "world_size": r.world,
        "device": str(r.device),
        "seconds_this_process": round(time.time() - t0, 1),
        "pool_size": len(r.planner.pool),
        "train_studies": len(r.volumes),
        "steps_per_epoch": r.planner.steps_per_epoch,
        "sampler_shortfall": dict(r.planner.shortfall),
        "config_digest": cfg.digest(),
    }
    if r.main and finished:
        best = checkpoint_path(run, "best")
        if not best.exists():  # no validation labels: the last weights are the selection
            Checkpoint(model=r.model.state_dict(), step=end, val=None).save(best)
        write_json(run / "train_summary.json", summary)
    if r.world > 1:
        torch.distributed.barrier()
    return summary
