"""Symmetric InfoNCE (CLIP loss), exact under torch.distributed.

Under DDP each rank all-gathers the image and text embeddings *with gradients*
(``torch.distributed.nn.functional.all_gather``) and computes the loss of its own rows against
all columns (the "local loss" form, as open_clip does). DDP's gradient averaging then makes
the update equal to that of one process on the global batch; ``tests/test_loss_ddp.py`` checks
this with two gloo processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _gather(x: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; inputs L2-normalised (B, D)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank, n = dist.get_rank(), image.shape[0]
        all_image, all_text = _gather(image), _gather(text)
        labels = torch.arange(n, device=image.device) + rank * n
        logits_i = scale * image @ all_text.T
        logits_t = scale * text @ all_image.T
    else:
        labels = torch.arange(image.shape[0], device=image.device)
        logits_i = scale * image @ text.T
        logits_t = logits_i.T
    return 0.5 * (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels))
