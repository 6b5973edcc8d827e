"""Text encoders through Hugging Face ``transformers``, and a small offline encoder for CPU work.

``TextEncoder`` wraps any ``AutoModel`` (BERT-class by default; Longformer as in Merlin) with
first-token pooling (Merlin's; or masked mean pooling, which a from-scratch encoder learns much
faster with: its first-token output is nearly input-independent at initialisation, and a
contrastive run stalled at log(batch) for 200 steps on it) and a linear projection to the joint space,
under Merlin's names
(``text_encoder``, ``linear_layer``). Offline, ``train_wordpiece`` learns a WordPiece
vocabulary from the training reports (tokenised with ``tokenizers``) and builds a small BERT from a config, so
nothing is downloaded. Text is normalised with Merlin's rule before tokenising.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from operators.contract.textnorm import keep_sentences, normalize_text


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Learn a lowercase WordPiece vocabulary from normalised texts; save it as a HF fast tokenizer.

    The vocabulary is chosen deterministically: specials, every character seen (as a word start
    and as a ``##`` continuation, so no word is ever [UNK]), then whole words by descending
    frequency (ties alphabetical) up to ``vocab_size``. ``tokenizers``' own WordPiece trainer breaks
    frequency ties in hash order: two runs on the same reports gave different vocabularies and so
    different models, which a reproducible training run cannot have. Tokenisation itself is
    ``tokenizers``' WordPiece model.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(normalize_text(t))))
    chars = sorted({c for w in words for c in w})
    vocab_list = special + chars + ["##" + c for c in chars]
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab_list) >= vocab_size:
            break
        if len(w) > 1:
            vocab_list.append(w)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_small_text_model(tokenizer, hidden: int, layers: int, heads: int, max_len: int, out_dir: str | Path):
    """A small BERT built from a config (random init), saved beside its tokenizer."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        max_position_embeddings=max_len,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertModel(cfg)
    model.save_pretrained(out_dir)
    return model


def split_sentences(text: str) -> list[str]:
    """A report's sentences (and header lines); a text without sentence breaks is one sentence."""
    parts = [p.strip() for p in _SENTENCE_BREAK.split(text)]
    return [p for p in parts if any(c.isalnum() for c in p)] or [text]


_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")


class TextEncoder(nn.Module):
    """Token ids + attention mask -> (B, D) joint-space embedding (not normalised).

    Options for a pretrained tower on a small budget (``text.*`` in the config):
    ``train_layers``: -1 trains the whole tower; 0 locks it (LiT: only the head learns, and the
    pooled output of every distinct text is computed once and cached); k > 0 trains the top k layers.
    With ``sentences`` and k > 0 the frozen lower layers' token states of every distinct sentence are
    cached too, and each step runs the top k layers once per distinct sentence of its batch (a batch
    of 32 reports holds about 700 sentences, half of them repeats).
    ``sentences``: a text's embedding is the mean of the head's output over its sentences, so a
    report's many repeated sentences ("No ascites.") are encoded once each under a locked tower.
    A prompt is one sentence, so ``forward`` on its tokens (the ONNX graph) gives the same vector.
    ``head``: ``linear`` (Merlin's ``linear_layer``) or ``mlp`` (two layers with a GELU).
    ``keep_sentences``: ``findings`` encodes only the sentences of a text that state a finding
    (``operators.contract.textnorm.keep_sentences``; a denying prompt becomes "Normal."), for every text."""

    def __init__(
        self,
        model_dir: str | Path,
        embed_dim: int,
        max_length: int,
        pooling: str = "first",
        train_layers: int = -1,
        sentences: bool = False,
        head: str = "linear",
        keep_sentences: str = "all",
    ):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir)
        if not path.exists():
            raise ValueError(f"text model {model_dir}: folder does not exist (hub downloads are not used here)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")):
            self.text_encoder = AutoModel.from_pretrained(str(path))
        else:  # config and tokenizer only: the weights come from a checkpoint (e.g. Merlin's)
            from transformers import AutoConfig

            self.text_encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(path)))
        # The top layers run on cached lower states (``_top_pooled``) only where the layer's call is known;
        # other towers (Longformer pads to its attention window and takes other masks) run whole.
        self._layer_cache = self.text_encoder.config.model_type in ("bert", "roberta")
        hidden = self.text_encoder.config.hidden_size
        if head == "linear":
            self.linear_layer: nn.Module = nn.Linear(hidden, embed_dim)
        elif head == "mlp":
            self.linear_layer = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        else:
            raise ValueError(f"text head must be 'linear' or 'mlp', got {head!r}")
        self.max_length = max_length
        if pooling not in ("first", "mean"):
            raise ValueError(f"text pooling must be 'first' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.train_layers = train_layers
        self.sentences = sentences
        self.keep_sentences = keep_sentences  # applied to every raw text first, reports and prompts alike
        self._features: dict[str, torch.Tensor] = {}  # normalised text -> pooled output (locked tower)
        self._bottom: dict[str, torch.Tensor] = {}  # normalised sentence -> frozen layers' token states (top k trained)
        self._freeze()

    @property
    def locked(self) -> bool:
        return self.train_layers == 0

    def _freeze(self) -> None:
        if self.train_layers < 0:
            return
        for p in self.text_encoder.parameters():
            p.requires_grad_(False)
        if self.train_layers > 0:
            layers = self.text_encoder.encoder.layer
            if self.train_layers > len(layers):
                raise ValueError(f"text.train_layers={self.train_layers}: the tower has {len(layers)} layers")
            for layer in layers[len(layers) - self.train_layers :]:
                for p in layer.parameters():
                    p.requires_grad_(True)

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.locked:  # a locked tower never drops out: its cached outputs must be its outputs
            self.text_encoder.eval()
        return self

    def tokenize(self, texts: list[str], device=None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [normalize_text(t) for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "first":
            return hidden[:, 0]
        # masked mean: input-dependent from the first step, which a from-scratch encoder needs
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear_layer(self.pooled(input_ids, attention_mask))

    def cache_features(self, texts: Iterable[str], batch_size: int = 128, progress: bool = False) -> int:
        """Compute the locked tower's pooled output of every text not cached yet; returns how many."""
        from tqdm import tqdm

        todo = sorted({k for k in map(normalize_text, texts) if k not in self._features}, key=len)
        if not todo:
            return 0
        self.text_encoder.eval()
        device = next(self.text_encoder.parameters()).device
        with torch.no_grad():
            for i in tqdm(range(0, len(todo), batch_size), desc="text features", disable=not progress):
                chunk = todo[i : i + batch_size]
                out = self.pooled(**self.tokenize(chunk, device)).float().cpu()
                self._features.update(zip(chunk, out))
        return len(todo)

    def load_features(self, path: Path) -> None:
        if path.exists():
            self._features.update(torch.load(path, map_location="cpu", weights_only=True))

    def save_features(self, path: Path) -> None:
        from operators.contract.files import atomic_path

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(self._features, tmp)

    def _bottom_states(self, keys: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, T, H) token states after the frozen lower layers and the (U, T) mask of distinct sentences;
        computed once per sentence and kept (the frozen layers never change)."""
        todo = sorted({k for k in keys if k not in self._bottom}, key=len)
        frozen = len(self.text_encoder.encoder.layer) - self.train_layers
        if todo:
            was = self.text_encoder.training
            self.text_encoder.eval()
            with torch.no_grad():
                for i in range(0, len(todo), 128):
                    chunk = todo[i : i + 128]
                    enc = self.tokenize(chunk, device)
                    out = self.text_encoder(**enc, output_hidden_states=True).hidden_states[frozen]
                    for k, h, m in zip(chunk, out, enc["attention_mask"]):
                        self._bottom[k] = h[: int(m.sum())].float().cpu()
            self.text_encoder.train(was)
        length = max(self._bottom[k].shape[0] for k in keys)
        hidden = torch.zeros(len(keys), length, self.text_encoder.config.hidden_size)
        mask = torch.zeros(len(keys), length, dtype=torch.long)
        for i, k in enumerate(keys):
            h = self._bottom[k]
            hidden[i, : h.shape[0]] = h
            mask[i, : h.shape[0]] = 1
        return hidden.to(device), mask.to(device)

    def _top_pooled(self, keys: list[str], device) -> torch.Tensor:
        """Pooled output of the top ``train_layers`` layers run on the cached lower states: the same
        numbers as ``pooled`` on the sentences' tokens (tested), at a fraction of the cost."""
        hidden, mask = self._bottom_states(keys, device)
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.text_encoder.encoder.layer[-self.train_layers :]:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        if self.pooling == "first":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def _units(self, units: list[str], device) -> torch.Tensor:
        if not self.locked:
            if self.train_layers > 0 and self.sentences and self._layer_cache:
                keys = [normalize_text(u) for u in units]
                distinct = sorted(set(keys))
                at = {k: i for i, k in enumerate(distinct)}
                index = torch.tensor([at[k] for k in keys], device=device)
                return self._top_pooled(distinct, device)[index]
            return self.pooled(**self.tokenize(units, device))
        keys = [normalize_text(u) for u in units]
        self.cache_features(keys)  # normalisation is idempotent: keys map to themselves
        return torch.stack([self._features[k] for k in keys]).to(device)

    def sentence_units(self, texts: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
        """The distinct normalised sentences of ``texts`` (after ``keep_sentences``) and the
        (text, sentence) pairs that say which text states which (``joint.match=sentences``)."""
        units: dict[str, int] = {}
        pairs = []
        for i, t in enumerate(texts):
            for part in split_sentences(keep_sentences(t, self.keep_sentences)):
                pairs.append((i, units.setdefault(normalize_text(part), len(units))))
        return list(units), sorted(set(pairs))

    def embed_units(self, units: list[str], device=None) -> torch.Tensor:
        """(U, D) embeddings of single sentences (already normalised), each its own text."""
        return self.linear_layer(self._units(units, device))

    def embed(self, texts: list[str], device=None) -> torch.Tensor:
        """(B, D) embeddings of raw texts (the training and evaluation path), after ``keep_sentences``."""
        texts = [keep_sentences(t, self.keep_sentences) for t in texts]
        if not self.sentences and not self.locked:
            return self(**self.tokenize(texts, device))
        if not self.sentences:
            return self.linear_layer(self._units(texts, device))
        units, seg = [], []
        for i, t in enumerate(texts):
            parts = split_sentences(t)
            units += parts
            seg += [i] * len(parts)
        out = self.linear_layer(self._units(units, device))
        index = torch.tensor(seg, device=out.device)
        total = torch.zeros(len(texts), out.shape[1], dtype=out.dtype, device=out.device).index_add(0, index, out)
        counts = torch.bincount(index, minlength=len(texts)).clamp(min=1).to(out.dtype)
        return total / counts[:, None]
