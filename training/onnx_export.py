"""The encoders as ONNX files, and their parity with the torch model (``export.py`` writes the package).

PARITY_TOLERANCE bounds the max abs difference of embeddings; ``ExportError`` is raised when an
export cannot behave like the torch model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from operators.contract.scoring import finding_scores, open_session, tokenize

from .models.clip import DualEncoder

PARITY_TOLERANCE = 1e-4
OPSET = 17


class ExportError(ValueError):
    """The export could not produce a package that behaves like the torch model."""


LOCALISATION_OUTPUT = "localisation"


def has_localisation(model: DualEncoder) -> bool:
    """Whether the image tower's embedding is the spatial mean of per-location joint-space features: global
    average pooling, then 1x1x1 heads and a per-dimension affine norm, which commute with the mean (Merlin's
    ``avg`` pooling). ``flatten`` and ``both`` weigh each location by its own kernel: no such map."""
    return model.encode_image.i3_resnet.position_head is None and isinstance(
        model.encode_image.i3_resnet.avgpool, nn.AdaptiveAvgPool3d
    )


def _per_location_norm(norm: nn.Module, dense: torch.Tensor) -> torch.Tensor:
    """The embedding norm at every location: in eval mode BatchNorm1d is a per-dimension affine map (written
    out, as the ONNX exporter cannot trace BatchNorm1d over a reshaped dynamic map), or the identity."""
    if isinstance(norm, nn.Identity):
        return dense
    if not isinstance(norm, nn.BatchNorm1d) or norm.training or not norm.track_running_stats:
        raise ExportError(f"no localisation map for an embedding norm {type(norm).__name__} in training mode")
    shape = (1, -1, 1, 1, 1)
    out = (dense - norm.running_mean.view(shape)) / torch.sqrt(norm.running_var.view(shape) + norm.eps)
    if norm.affine:
        out = out * norm.weight.view(shape) + norm.bias.view(shape)
    return out


def localisation_features(model: DualEncoder, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding (B, D), localisation (B, D, x, y, z)) from one pass of the image tower.

    ``localisation`` holds the joint-space features of each location of the trunk's last feature map, in the
    input's axis order, divided by the norm of their mean: its spatial mean is the L2-normalised embedding,
    so ``localisation . q`` for a prompt direction ``q`` is a map whose mean is the embedding's similarity
    to ``q`` (the CLIP dense-feature idea, exact for average pooling: each location's share of the score)."""
    enc = model.encode_image
    trunk = enc.i3_resnet
    f = trunk.trunk(enc._input(image), 5)  # the stem and layer1..4: the last feature map, before pooling
    dense = trunk.contrastive_head(f).float()  # (B, D, Z, X, Y): the head is 1x1x1, the same at every location
    normed = _per_location_norm(model.image_norm, dense)
    unnormalised = normed.mean(dim=(2, 3, 4))
    norm = unnormalised.norm(dim=1).clamp_min(1e-12)
    embedding = unnormalised / norm[:, None]
    return embedding, (normed / norm[:, None, None, None, None]).permute(0, 1, 3, 4, 2)


class _ImageTower(nn.Module):
    def __init__(self, model: DualEncoder, localisation: bool = False):
        super().__init__()
        self.model = model
        self.localisation = localisation

    def forward(self, image: torch.Tensor):
        if self.localisation:
            return localisation_features(self.model, image)
        return self.model.image_embeddings(image)


class _TextTower(nn.Module):
    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.text_embeddings(input_ids, attention_mask)


def export_image_onnx(module: nn.Module, path: Path, example: torch.Tensor, localisation: bool = False) -> None:
    """``image`` (B,1,X,Y,Z) -> ``embedding`` (B,D), and with ``localisation`` also ``localisation``
    (B,D,x,y,z); batch and spatial axes dynamic (also the benchmarks')."""
    outputs = ["embedding", LOCALISATION_OUTPUT] if localisation else ["embedding"]
    axes = {"image": {0: "batch", 2: "x", 3: "y", 4: "z"}, "embedding": {0: "batch"}}
    if localisation:
        axes[LOCALISATION_OUTPUT] = {0: "batch", 2: "mx", 3: "my", 4: "mz"}
    with torch.no_grad():
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=["image"],
            output_names=outputs,
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes=axes,
        )


def export_image_encoder(model: DualEncoder, path: Path, example: torch.Tensor) -> str | None:
    """The image tower as ONNX; returns the localisation output's name, or None for a tower without one."""
    maps = has_localisation(model)
    export_image_onnx(_ImageTower(model, maps), path, example, maps)
    return LOCALISATION_OUTPUT if maps else None


def export_text_encoder(
    model: DualEncoder, path: Path, example: dict[str, torch.Tensor], dynamic_sequence: bool = True
) -> None:
    axes = {0: "batch", 1: "sequence"} if dynamic_sequence else {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            _TextTower(model).eval(),
            (example["input_ids"], example["attention_mask"]),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "embedding": {0: "batch"}},
        )


def attention_window(model: DualEncoder) -> int:
    """The (largest) attention window of a Longformer-style tower; 1 for full-attention encoders."""
    window = getattr(model.encode_text.text_encoder.config, "attention_window", None)
    if window is None:
        return 1
    return int(max(window) if isinstance(window, (list, tuple)) else window)


def write_tokenizer(model: DualEncoder, path: Path, fixed_length: int | None = None) -> dict:
    """The training tokenizer as a ``tokenizers`` file with truncation and padding as the ONNX graph needs:
    padded to the longest text, or to exactly ``fixed_length`` tokens (a traced Longformer)."""
    hf = model.encode_text.tokenizer
    backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
    if backend is None:
        raise ExportError(
            "the text tower's tokenizer is not a fast (tokenizers-backed) tokenizer; "
            "it cannot be shipped to the deploy side"
        )
    tok = backend.__class__.from_str(backend.to_str())
    max_length = int(model.encode_text.max_length)
    if fixed_length:
        max_length = min(max_length, fixed_length)
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=int(hf.pad_token_id), pad_token=str(hf.pad_token), length=fixed_length)
    tok.save(str(path))
    return {"pad_token_id": int(hf.pad_token_id), "max_length": max_length, "sequence_length": fixed_length}


def deploy_tokenize(tokenizer_file: Path, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """What the deploy side does (``operators.contract.scoring.tokenize``), without loading the package."""
    from tokenizers import Tokenizer

    return tokenize(Tokenizer.from_file(str(tokenizer_file)), texts)


def _resized(volumes: np.ndarray) -> np.ndarray:
    """The same inputs cropped by a few voxels per axis: a second spatial size for the dynamic-axes check."""
    x, y, z = volumes.shape[2:]
    return np.ascontiguousarray(volumes[:, :, : x - max(2, x // 8), : y - max(2, y // 8), : z - max(2, z // 8)])


@torch.no_grad()
def image_parity(
    model: DualEncoder,
    onnx_path: Path,
    volumes: np.ndarray,
    prompt_emb: np.ndarray,
    rows,
    localisation: str | None = None,
    batch_size: int = 4,
) -> dict:
    """ORT vs torch image embeddings (two spatial sizes) and the zero-shot decisions they lead to; with
    ``localisation`` (the output's name) also that the map's spatial mean is the embedding."""
    session = open_session(onnx_path, ["CPUExecutionProvider"])
    scale = model.scale().item()
    worst, sizes = 0.0, []
    decisions_equal = True
    outputs = ["embedding", localisation] if localisation else ["embedding"]
    for vols in (volumes, _resized(volumes)):
        ref, got = [], []
        for i in range(0, len(vols), batch_size):
            x = vols[i : i + batch_size]
            emb = model.image_embeddings(torch.from_numpy(x)).numpy()
            ref.append(emb)
            res = session.run(outputs, {"image": x})
            got.append(res[0])
            if localisation:  # the map's mean is the embedding it explains, within the same tolerance
                worst = max(worst, float(np.abs(res[1].mean(axis=(2, 3, 4)) - emb).max()))
        ref, got = np.concatenate(ref), np.concatenate(got)
        worst = max(worst, float(np.abs(ref - got).max()))
        sizes.append(list(vols.shape[2:]))
        _, p_ref = finding_scores(ref, prompt_emb, rows, scale)
        _, p_got = finding_scores(got, prompt_emb, rows, scale)
        decisions_equal &= bool(np.array_equal(p_ref >= 0.5, p_got >= 0.5))
    return {
        "max_abs_diff": worst,
        "inputs": int(len(volumes)),
        "spatial_sizes": sizes,
        "decisions_identical": decisions_equal,
        "localisation": localisation,
        "tolerance": PARITY_TOLERANCE,
        "passed": worst <= PARITY_TOLERANCE and decisions_equal,
    }


@torch.no_grad()
def text_parity(model: DualEncoder, onnx_path: Path, tokenizer_file: Path, texts: Sequence[str]) -> dict:
    """Deploy tokenizer vs training tokenizer (same ids for the unpadded tokens of every text), then ORT
    vs torch embeddings."""
    ref_tok = model.encode_text.tokenize(list(texts))
    dep_tok = deploy_tokenize(tokenizer_file, texts)

    def unpadded(ids, mask):
        return [list(np.asarray(i)[np.asarray(m) == 1]) for i, m in zip(ids, mask)]

    tokens_equal = unpadded(ref_tok["input_ids"].numpy(), ref_tok["attention_mask"].numpy()) == unpadded(
        dep_tok["input_ids"], dep_tok["attention_mask"]
    )
    ref = model.text_embeddings(**ref_tok).numpy()
    session = open_session(onnx_path, ["CPUExecutionProvider"])
    got = np.concatenate(
        [
            session.run(["embedding"], {k: v[i : i + 32] for k, v in dep_tok.items()})[0]
            for i in range(0, len(texts), 32)
        ]
    )
    worst = float(np.abs(ref - got).max())
    return {
        "max_abs_diff": worst,
        "texts": len(texts),
        "tokens_identical": bool(tokens_equal),
        "tolerance": PARITY_TOLERANCE,
        "passed": bool(tokens_equal and worst <= PARITY_TOLERANCE),
    }
