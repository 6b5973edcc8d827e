"""The dual encoder: image and text towers into one L2-normalised joint space, learnable log logit scale."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EMBED_NORMS
from .image import ImageEncoder
from .text import TextEncoder


class DualEncoder(nn.Module):
    """State-dict names follow Merlin: ``encode_image.i3_resnet.*``, ``encode_text.text_encoder.*``,
    ``encode_text.linear_layer.*``, ``logit_scale`` (log space; the scale is ``exp(logit_scale)``)."""

    def __init__(
        self,
        image: ImageEncoder,
        text: TextEncoder,
        init_logit_scale: float = math.log(1 / 0.07),
        embed_norm: str = "none",
        init_logit_bias: float | None = None,
    ):
        super().__init__()
        self.encode_image = image
        self.encode_text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        # the sigmoid loss's learnable bias (joint.loss=sigmoid, as SigLIP); absent otherwise, so the
        # state dict of every other model (and of Merlin's checkpoint) keeps its keys
        if init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        if embed_norm not in EMBED_NORMS:
            raise ValueError(f"embed_norm must be one of {', '.join(EMBED_NORMS)}, got {embed_norm!r}")
        # "batch": centre and scale each tower's projection with BatchNorm (no affine) before the L2
        # norm: towers trained from scratch start with a large common component that cancels
        # InfoNCE's gradient. "batch_affine": the same plus a learnable per-dimension scale and
        # offset, so the image embeddings can carry a finding's prior. "text": centre only the text
        # tower. What each measured: experiments/cpu-tiny-baseline.
        dim = image.i3_resnet.contrastive_head.out_channels
        affine = embed_norm == "batch_affine"
        self.image_norm = (
            nn.BatchNorm1d(dim, affine=affine) if embed_norm in ("batch", "batch_affine") else nn.Identity()
        )
        self.text_norm = nn.BatchNorm1d(dim, affine=affine) if embed_norm != "none" else nn.Identity()

    def image_embeddings(self, images: torch.Tensor, from_trunk: bool = False) -> torch.Tensor:
        return F.normalize(self.image_norm(self.encode_image(images, from_trunk=from_trunk).float()), dim=-1)

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_norm(self.encode_text(input_ids, attention_mask).float()), dim=-1)

    def texts_to_embeddings(self, texts: list[str], device=None) -> torch.Tensor:
        """Raw texts -> L2-normalised joint-space embeddings (sentence means, cached features: ``TextEncoder``)."""
        return F.normalize(self.text_norm(self.encode_text.embed(texts, device).float()), dim=-1)

    def sentence_embeddings(self, units: list[str], device=None) -> torch.Tensor:
        """L2-normalised joint-space embeddings of single sentences (``TextEncoder.sentence_units``)."""
        x = self.encode_text.embed_units(units, device).float()
        norm = self.text_norm
        if self.training and len(units) < 2 and isinstance(norm, nn.BatchNorm1d):
            # a batch whose texts all state one sentence (a section batch of "Normal."): no batch
            # statistics to take, so the running ones (and no update of them)
            x = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        else:
            x = norm(x)
        return F.normalize(x, dim=-1)

    def encode_texts(self, texts: list[str], device=None, batch_size: int = 64) -> torch.Tensor:
        out = [self.texts_to_embeddings(texts[i : i + batch_size], device) for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.empty(0)

    # Modules the contrastive forward never runs: a Hugging Face tower's pooler (first-token or mean pooling
    # read the last hidden state), Merlin's finding classifier, MONAI's unused fully connected layer.
    UNUSED = ("encode_text.text_encoder.pooler.", "encode_image.i3_resnet.classifier.", "encode_image.i3_resnet.fc.")
    # Longformer's projections for global attention: Merlin runs it without a global attention mask
    UNUSED_PARTS = (".attention.self.query_global.", ".attention.self.key_global.", ".attention.self.value_global.")

    def unused_parameter_names(self) -> list[str]:
        """Parameters no training step gives a gradient (DDP is told to ignore them)."""
        return [
            n
            for n, _ in self.named_parameters()
            if n.startswith(self.UNUSED) or (n.startswith("encode_text.") and any(u in n for u in self.UNUSED_PARTS))
        ]

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def clamp_logit_scale(self) -> None:
        """Keep the parameter in [0, log 100] after each optimiser step (as open_clip does): a clamp
        inside the forward pass would zero its gradient for good once it passed the bound."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(100.0))

    def forward(
        self,
        images,
        input_ids=None,
        attention_mask=None,
        texts: list[str] | None = None,
        from_trunk: bool = False,
        units: list[str] | None = None,
    ):
        """(image embeddings, text embeddings, scale); text from token ids or, with ``texts``, raw texts,
        or, with ``units``, one embedding per sentence (with both, the sentences' embeddings are a fourth
        output); ``from_trunk``: ``images`` are the frozen image stages' output (``ImageEncoder.trunk``)."""
        if units is not None and texts is not None:  # both: the sentences' embeddings come fourth
            img = self.image_embeddings(images, from_trunk)
            txt = self.texts_to_embeddings(texts, images.device)
            return img, txt, self.scale(), self.sentence_embeddings(units, images.device)
        if units is not None:
            txt = self.sentence_embeddings(units, images.device)
        elif texts is not None:
            txt = self.texts_to_embeddings(texts, images.device)
        else:
            txt = self.text_embeddings(input_ids, attention_mask)
        return self.image_embeddings(images, from_trunk), txt, self.scale()

    def set_gradient_checkpointing(self, on: bool) -> None:
        self.encode_image.i3_resnet.gradient_checkpointing = on
        enc = self.encode_text.text_encoder
        if on and hasattr(enc, "gradient_checkpointing_enable"):
            enc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif not on and getattr(enc, "is_gradient_checkpointing", False):
            enc.gradient_checkpointing_disable()
