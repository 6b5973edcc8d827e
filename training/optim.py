"""The optimiser and learning-rate schedule of the training loop (open_clip keeps these apart too)."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .models.clip import DualEncoder


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """The learning-rate factor at ``step``: linear warm-up over ``warmup`` steps, cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def make_optimizer(model: DualEncoder, cfg: TrainConfig):
    """AdamW over parameter groups (image, text head, no-decay, and the text tower at ``optim.tower_lr``
    when set) with a linear warm-up and cosine decay to 0 over ``train.steps``; frozen parameters
    are left out."""
    o = cfg.optim
    groups: dict[str, list[torch.nn.Parameter]] = {"image": [], "text": [], "none": [], "tower": [], "tower_nd": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if o.tower_lr > 0 and name.startswith("encode_text.text_encoder."):
            groups["tower" if p.ndim >= 2 else "tower_nd"].append(p)
        elif p.ndim < 2 or name == "logit_scale":
            groups["none"].append(p)
        elif name.startswith("encode_text"):
            groups["text"].append(p)
        else:
            groups["image"].append(p)
    param_groups = [
        {"params": groups["image"], "lr": o.lr, "weight_decay": o.weight_decay},
        {"params": groups["text"], "lr": o.text_lr, "weight_decay": o.weight_decay},
        {"params": groups["none"], "lr": o.lr, "weight_decay": 0.0},
    ]
    if o.tower_lr > 0:
        param_groups += [
            {"params": groups["tower"], "lr": o.tower_lr, "weight_decay": o.weight_decay},
            {"params": groups["tower_nd"], "lr": o.tower_lr, "weight_decay": 0.0},
        ]
    opt = torch.optim.AdamW(param_groups)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, cfg.train.steps, o.warmup_steps)
    )
