"""Text encoders through Hugging Face ``transformers``, and a small offline encoder for CPU work.

``TextEncoder`` wraps any ``AutoModel`` (BERT-class by default; Longformer as in Merlin) with
first-token pooling and a linear projection to the joint space, under Merlin's names
(``text_encoder``, ``linear_layer``). Offline, ``build_small_text_model`` trains a WordPiece
tokenizer on the training reports with ``tokenizers`` and builds a small BERT from a config, so
nothing is downloaded. Text is normalised with Merlin's rule before tokenising.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from operators.textnorm import normalize_text


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Train a lowercase WordPiece tokenizer on normalised texts; save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, min_frequency=1)
    tok.train_from_iterator((normalize_text(t) for t in texts), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_small_text_model(tokenizer, hidden: int, layers: int, heads: int, max_len: int, out_dir: str | Path):
    """A small BERT built from a config (random init), saved beside its tokenizer."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=hidden * 4, max_position_embeddings=max_len, pad_token_id=tokenizer.pad_token_id)
    model = BertModel(cfg, add_pooling_layer=False)
    model.save_pretrained(out_dir)
    return model


class TextEncoder(nn.Module):
    """Token ids + attention mask -> (B, D) joint-space embedding (not normalised)."""

    def __init__(self, model_dir: str | Path, embed_dim: int, max_length: int):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir)
        if not path.exists():
            raise ValueError(f"text model {model_dir}: folder does not exist (hub downloads are not used here)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.text_encoder = AutoModel.from_pretrained(str(path))
        self.linear_layer = nn.Linear(self.text_encoder.config.hidden_size, embed_dim)
        self.max_length = max_length

    def tokenize(self, texts: list[str], device=None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([normalize_text(t) for t in texts], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        return self.linear_layer(out.last_hidden_state[:, 0])

    def encode(self, texts: list[str], device=None) -> torch.Tensor:
        return self(**self.tokenize(texts, device))
