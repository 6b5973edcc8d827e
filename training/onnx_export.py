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


class _ImageTower(nn.Module):
    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.image_embeddings(image)


class _TextTower(nn.Module):
    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.text_embeddings(input_ids, attention_mask)


def export_image_onnx(module: nn.Module, path: Path, example: torch.Tensor) -> None:
    """``image`` (B,1,X,Y,Z) -> ``embedding`` (B,D), batch and spatial axes dynamic (also the benchmarks')."""
    with torch.no_grad():
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=["image"],
            output_names=["embedding"],
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes={"image": {0: "batch", 2: "x", 3: "y", 4: "z"}, "embedding": {0: "batch"}},
        )


def export_image_encoder(model: DualEncoder, path: Path, example: torch.Tensor) -> None:
    export_image_onnx(_ImageTower(model), path, example)


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
    model: DualEncoder, onnx_path: Path, volumes: np.ndarray, prompt_emb: np.ndarray, rows, batch_size: int = 4
) -> dict:
    """ORT vs torch image embeddings (two spatial sizes) and the zero-shot decisions they lead to."""
    session = open_session(onnx_path, ["CPUExecutionProvider"])
    scale = model.scale().item()
    worst, sizes = 0.0, []
    decisions_equal = True
    for vols in (volumes, _resized(volumes)):
        ref, got = [], []
        for i in range(0, len(vols), batch_size):
            x = vols[i : i + batch_size]
            ref.append(model.image_embeddings(torch.from_numpy(x)).numpy())
            got.append(session.run(["embedding"], {"image": x})[0])
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
