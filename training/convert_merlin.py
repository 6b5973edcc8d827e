"""``ct-zeroshot-train convert-merlin``: the official Merlin checkpoint -> a model package.

The checkpoint (``i3_resnet_clinical_longformer_best_clip_*.pt``) is a flat state dict of 1,208 tensors:
``encode_image.i3_resnet.*`` (I3D ResNet-152 with a 512-d contrastive head and Merlin's 1,692-way
phecode classifier), ``encode_text.text_encoder.*`` (Clinical-Longformer), ``encode_text.linear_layer.*``
(768 -> 512) and ``logit_scale`` (log space). It is loaded *strictly* into the Merlin-compatible
architecture (``models/image.py``'s ``i3_resnet152`` and a Longformer built from ``--text-model``), so a
checkpoint of another layout is refused with the keys that differ.

The text tower needs a local folder with Clinical-Longformer's ``config.json`` and tokenizer files
(``--text-model``; nothing is downloaded here); its weights, if present, are overridden by the
checkpoint. The package gets Merlin's preprocessing (``PreprocessSpec.merlin()``), the 30 findings'
prompts normalised as Merlin does, and Merlin's decision rule. By default the package ships prompt
embeddings only (``LONGFORMER_NOTE`` says why, in the manifest); ``text="auto"`` tries the ONNX export
traced at one attention window and keeps it only if parity holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from operators.contract.manifest import Manifest
from operators.contract.preprocessing import PreprocessSpec

from .export import export_package
from .models.clip import DualEncoder
from .models.image import ImageEncoder
from .models.text import TextEncoder
from .synth.inputs import synthetic_inputs

MERLIN_EMBED_DIM = 512
MERLIN_PHECODES = 1692
MERLIN_TEXT_MAX_LENGTH = 1024
MERLIN_PREFIXES = ("encode_image.i3_resnet.", "encode_text.text_encoder.", "encode_text.linear_layer.")
# Buffers some transformers versions save and others do not; their values are fixed, not learned.
_OPTIONAL_BUFFERS = (
    "encode_text.text_encoder.embeddings.position_ids",
    "encode_text.text_encoder.embeddings.token_type_ids",
)


class ConversionError(ValueError):
    """A checkpoint or text-model folder that cannot become a Merlin package; the message says why."""


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat state dict of a Merlin checkpoint (also accepts ``{"state_dict": ...}`` / DDP ``module.``)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: checkpoint file does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: expected a state dict of tensors")
    sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}
    if not any(k.startswith("encode_image.i3_resnet.") for k in sd) or "logit_scale" not in sd:
        raise ConversionError(f"{path}: not a Merlin checkpoint (no encode_image.i3_resnet.* keys or logit_scale)")
    return sd


def build_merlin_model(text_model: str | Path) -> DualEncoder:
    """Merlin's architecture with random weights (the image tower seeded; the text tower from config)."""
    text_model = Path(text_model)
    if not (text_model / "config.json").is_file():
        raise ConversionError(
            f"{text_model}: --text-model must be a local folder with Clinical-Longformer's "
            "config.json and tokenizer files (no hub downloads here)"
        )
    torch.manual_seed(0)
    image = ImageEncoder("i3_resnet152", MERLIN_EMBED_DIM, n_classes=MERLIN_PHECODES)
    try:
        text = TextEncoder(text_model, MERLIN_EMBED_DIM, MERLIN_TEXT_MAX_LENGTH, pooling="first")
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{text_model}: cannot build the text tower ({exc})") from exc
    return DualEncoder(image, text, init_logit_scale=1.0, embed_norm="none")


def load_merlin_state(model: DualEncoder, sd: dict[str, torch.Tensor], origin: str = "checkpoint") -> None:
    """Strict load; differences (other than fixed position-id buffers) are an error listing the keys."""
    own = model.state_dict()
    sd = dict(sd)
    for k in _OPTIONAL_BUFFERS:
        if k in sd and k not in own:
            sd.pop(k)
        elif k in own and k not in sd:
            sd[k] = own[k]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or shapes:

        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {few(unexpected)}")
        if shapes:
            parts.append(
                f"{len(shapes)} with other shapes: "
                + few([f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in shapes])
            )
        raise ConversionError(f"{origin}: does not match Merlin's architecture: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def load_merlin_init(model: DualEncoder, path: str | Path) -> int:
    """Fine-tuning from the official checkpoint (``image.init=merlin:FILE.pt``): the image tower, the text
    tower, its projection and the logit scale, loaded strictly into a run's model (the ``merlin`` preset:
    ``i3_resnet152``, 512-d, a Clinical-Longformer folder as ``text.model``). Merlin's phecode classifier is
    left out when the run's tower has none (contrastive training never uses it); returns how many of its
    tensors were left out. Any other difference is an error listing the keys."""
    prefix = "encode_image.i3_resnet.classifier."
    sd = read_checkpoint(path)
    has_classifier = any(k.startswith(prefix) for k in model.state_dict())
    left_out = [] if has_classifier else [k for k in sd if k.startswith(prefix)]
    for k in left_out:
        sd.pop(k)
    load_merlin_state(model, sd, f"image.init=merlin:{path}")
    return len(left_out)


LONGFORMER_NOTE = (
    "Clinical-Longformer is not exported to ONNX by default: traced at one attention window a "
    "scaled-down Longformer missed parity (2.6e-4 > 1e-4) and the full-size trace exceeded 24 GB of "
    "memory on a CPU machine; the package carries the 30 findings' prompt embeddings, and custom "
    "prompts need the torch model (training side). Try --text auto on a larger machine."
)


def convert_merlin(
    checkpoint: str | Path,
    out: str | Path,
    text_model: str | Path,
    text: str = "none",
    parity_inputs: int = 2,
    version: str = "1.0.0",
    log: Callable[[str], None] = print,
) -> Manifest:
    log(f"reading {checkpoint}")
    sd = read_checkpoint(checkpoint)
    model = build_merlin_model(text_model)
    load_merlin_state(model, sd, str(checkpoint))
    model.eval()
    log(f"loaded {len(sd)} tensors strictly; logit scale {math.exp(float(sd['logit_scale'])):.3f}")
    spec = PreprocessSpec.merlin()
    volumes = synthetic_inputs(spec, n=parity_inputs)
    provenance = {
        "source": "official Merlin checkpoint",
        "checkpoint": Path(checkpoint).name,
        "text_model": str(text_model),
        "tensors": len(sd),
        "note": "weights as published by Merlin (Blankemeier et al.); preprocessing and prompts "
        "per Merlin's code; parity inputs are synthetic phantoms",
    }
    return export_package(
        model,
        out,
        spec=spec,
        parity_volumes=volumes,
        name="merlin",
        version=version,
        provenance=provenance,
        text=text,
        log=log,
        text_absent_reason=LONGFORMER_NOTE,
        intended_use="Research use only; not for diagnostic use. Merlin's published weights (Blankemeier et al.), "
        "trained on abdominal CT of one institution; validate locally before any use.",
    )
