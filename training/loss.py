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


def _gather_ragged(x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, list[int]]:
    """All ranks' ``x`` (rows of differing counts) concatenated in rank order, and each rank's count."""
    counts_t = _gather_nograd(torch.tensor([x.shape[0]], device=x.device))
    counts = [int(c) for c in counts_t.tolist()]
    pad = max(counts) - x.shape[0]
    padded = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
    parts = (_gather if grad else _gather_nograd)(padded).split(max(counts))
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), counts


def sentence_loss(
    image: torch.Tensor,
    sentences: torch.Tensor,
    sentence_keys: torch.Tensor,
    pairs: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    kind: str = "sigmoid",
    features: torch.Tensor | None = None,
    neighbours: float = 0.0,
) -> torch.Tensor:
    """Images against the distinct sentences of the batch (``joint.match=sentences``).

    ``image`` (n, D) and ``sentences`` (u, D) L2-normalised; ``sentence_keys`` (u,) int64 (``text_keys``
    of the normalised sentences, distinct within the process); ``pairs`` (P, 2) long: (image row,
    sentence row) for every sentence of every image's text. A sentence is a positive of exactly the
    images whose text states it, so a report's findings are each matched on their own instead of through
    the mean of the report's sentences, in which a finding of a many-finding report is diluted.

    ``kind``: ``sigmoid`` (SigLIP's pairwise loss: every (image, sentence) pair a binary decision,
    ``scale * cos + bias``; the mean over images of the sum over sentences), or ``softmax`` (the
    multi-positive InfoNCE both ways: an image's positives are its sentences, a sentence's positives
    the images that state it). Under torch.distributed the sentences of all ranks are gathered with
    gradients and duplicates dropped (the first copy kept), so the loss and, with DDP's averaging, the
    gradients equal one process on the global batch (tested with two processes).

    ``neighbours`` > 0 with ``features`` (u, H), the locked text tower's output for each sentence: a
    sentence not in an image's text but at least this cosine-similar to one of its sentences is left
    out of that image's pairs, neither positive nor negative. A report says "mild left hydronephrosis"
    where another says "moderate bilateral hydronephrosis"; without this each is a negative of the
    other's image.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    n, device = image.shape[0], image.device
    if distributed:
        world, rank = dist.get_world_size(), dist.get_rank()
        all_sent, counts = _gather_ragged(sentences, grad=True)
        all_keys, _ = _gather_ragged(sentence_keys.to(device), grad=False)
        offset = sum(counts[:rank])
    else:
        world, rank, all_sent, all_keys, offset = 1, 0, sentences, sentence_keys.to(device), 0
    columns, inverse = torch.unique(all_keys, return_inverse=True)
    # the first copy of each distinct key: its position among all gathered sentences
    positions = torch.arange(all_keys.shape[0], device=device)
    first = torch.full((columns.shape[0],), all_keys.shape[0], device=device, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    cols = all_sent[first]  # (C, D)
    pos = torch.zeros(n, columns.shape[0], dtype=torch.bool, device=device)
    pos[pairs[:, 0].to(device), inverse[offset + pairs[:, 1].to(device)]] = True
    keep = torch.ones_like(pos)
    if neighbours > 0:
        if features is None:
            raise ValueError("sentence_loss: neighbours needs the sentences' text-tower features")
        own = torch.zeros(n, sentences.shape[0], device=device)  # (n, u): which of my sentences each image states
        own[pairs[:, 0].to(device), pairs[:, 1].to(device)] = 1.0
        feats = F.normalize(features.detach().float().to(device), dim=-1)
        all_feats = _gather_ragged(feats, grad=False)[0] if distributed else feats
        near = (feats @ all_feats[first].T) >= neighbours  # (u, C): my sentences' neighbours
        keep = pos | ~((own @ near.float()) > 0)
    logits = scale * image @ cols.T
    if kind == "sigmoid":
        if bias is not None:
            logits = logits + bias
        sign = pos.to(logits.dtype) * 2 - 1
        return -(F.logsigmoid(sign * logits) * keep).sum(1).mean()
    if kind != "softmax":
        raise ValueError(f"sentence loss kind must be 'sigmoid' or 'softmax', got {kind!r}")
    ignore = float("-inf")
    image_to_text = _multi_positive_ce(logits.masked_fill(~keep, ignore), pos)
    # sentence -> images: each distinct sentence is a row once, on the rank that holds its first copy
    if distributed:
        all_image = _gather(image)
        # gloo has no bool all_gather
        all_pos = _gather_nograd(pos.to(torch.uint8)).bool()
        all_keep = _gather_nograd(keep.to(torch.uint8)).bool()
    else:
        all_image, all_pos, all_keep = image, pos, keep
    owner = (first >= offset) & (first < offset + sentences.shape[0])
    rows = (scale * cols[owner] @ all_image.T).masked_fill(~all_keep.T[owner], ignore)  # (owned, N)
    text_to_image = (
        torch.logsumexp(rows, dim=1) - torch.logsumexp(rows.masked_fill(~all_pos.T[owner], ignore), dim=1)
    ).sum() * (world / columns.shape[0])
    return 0.5 * (image_to_text + text_to_image)
