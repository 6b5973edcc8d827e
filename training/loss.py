"""Symmetric InfoNCE (CLIP loss), exact under torch.distributed, with an optional multi-positive form.

Under DDP each rank all-gathers the image and text embeddings *with gradients*
(``torch.distributed.nn.functional.all_gather``) and computes the loss of its own rows against
all columns (the "local loss" form, as open_clip does). DDP's gradient averaging then makes
the update equal to that of one process on the global batch; ``tests/training/test_loss_ddp.py`` checks
this with two gloo processes.

**Multi-positive** (``text_keys``): items whose texts are identical after normalisation carry the
same key, and every column with the row's key is a positive: a row's loss is -log of the softmax
mass on all its positives (the MIL-NCE form), so identical texts are never negatives of each other.
A section batch holds many copies of "the pancreas is unremarkable"; plain InfoNCE asks the model
to tell those pairs apart and so punishes it for matching them correctly. With all keys distinct
this is plain InfoNCE exactly.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _gather(x: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def _gather_nograd(x: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


def text_keys(texts: list[str]) -> torch.Tensor:
    """A stable int64 key per text (equal texts, equal keys; the same in every process)."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True) for t in texts],
        dtype=torch.int64,
    )


def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log(sum of softmax over the row's positive columns)."""
    pos_logits = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(pos_logits, dim=1)).mean()


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; inputs L2-normalised (B, D).

    ``keys`` (B,) int64: equal keys are positives of each other (multi-positive form); None: the
    diagonal only (plain InfoNCE)."""
    n = image.shape[0]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
        all_image, all_text = _gather(image), _gather(text)
        labels = torch.arange(n, device=image.device) + rank * n
        logits_i = scale * image @ all_text.T
        logits_t = scale * text @ all_image.T
        all_keys = _gather_nograd(keys.to(image.device)) if keys is not None else None
    else:
        labels = torch.arange(n, device=image.device)
        logits_i = scale * image @ text.T
        logits_t = logits_i.T
        all_keys = keys.to(image.device) if keys is not None else None
    if keys is None or all_keys is None:
        return 0.5 * (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels))
    pos = keys.to(image.device)[:, None] == all_keys[None, :]  # (n, N); a symmetric relation, diagonal included
    return 0.5 * (_multi_positive_ce(logits_i, pos) + _multi_positive_ce(logits_t, pos))
