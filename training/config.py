"""Typed training configuration, loaded from YAML presets with ``key=value`` overrides.

``TrainConfig.load(preset, overrides)`` reads ``training/presets/<preset>.yaml`` (or a YAML path),
applies dotted overrides (``optim.lr=3e-4``, ``sampler.kind=balanced``, ``sampler.ratio=25:75``),
validates, and ``save`` writes the resolved config beside a run's outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path

import yaml

from operators.contract.findings import SECTIONS
from operators.contract.preprocessing import PreprocessSpec

# How each tower's projection is normalised before the L2 norm (see models/clip.py).
EMBED_NORMS = ("none", "batch", "batch_affine", "text")
STEM_POOLS = ("max", "maxmin")  # image.stem_pool; models/image.py
# Settings that take one of a few words: key -> the words (checked by TrainConfig.validate).
CHOICES: dict[str, tuple[str, ...]] = {
    "sampler.kind": ("random", "balanced"),
    "sampler.order": ("passes", "independent"),
    "sampler.section_rule": ("finding", "stock"),
    "text.keep_sentences": ("all", "findings", "bare"),
    "text.pooling": ("first", "mean"),
    "text.head": ("linear", "mlp"),
    "batching.schedule": ("alternate", "full", "sections"),
    "batching.system_choice": ("round_robin", "random"),
    "joint.embed_norm": EMBED_NORMS,
    "joint.positives": ("text", "labels"),
    "joint.match": ("report", "sentences"),
    "joint.loss": ("infonce", "sigmoid"),
    "train.select": ("macro_f1", "macro_auroc"),
    "image.stem_pool": STEM_POOLS,
}

REQUIRED = "required"  # text.model in a preset that cannot build its text tower offline (merlin.yaml)

_RATIO = re.compile(r"^\d+(\.\d+)?:\d+(\.\d+)?$")


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the key."""


def parse_ratio(value) -> tuple[float, float]:
    """'25:75' / '1:3' / [25, 75] -> (normal fraction, abnormal fraction) summing to 1."""
    try:
        if isinstance(value, str):
            a, b = (float(v) for v in value.split(":"))
        else:
            a, b = (float(v) for v in value)
    except (ValueError, TypeError):
        raise ConfigError(f"sampler.ratio {value!r} does not parse; write normal:abnormal, e.g. 25:75") from None
    if a < 0 or b < 0 or a + b <= 0:
        raise ConfigError(f"sampler.ratio {value!r}: both parts must be >= 0 and not both 0")
    return a / (a + b), b / (a + b)


@dataclass
class ImageCfg:
    arch: str = "resnet10_tiny"
    embed_dim: int = 128
    # an image_init.pt from `pretrain-image` (strict load), or merlin:FILE.pt (both towers and the logit scale
    # from the official checkpoint, to fine-tune it); empty: random init
    init: str = ""
    # the first k stages (1: the stem, 2: + layer1, ...) stay at their initial weights; their output per
    # volume is computed once per run and each step trains the rest (models/image.py)
    frozen_stages: int = 0
    # How the last feature map becomes the embedding: "avg" (global average pooling, Merlin's),
    # "flatten" (a linear map of the whole map, so where a feature fires counts) or "both" (the sum of
    # the two heads; models/image.py)
    pool: str = "avg"
    # The stem's pooling window: "max" (ResNet's max-pool) or "maxmin" (half the stem's channels
    # max-pooled, half min-pooled, for dark structures in enhanced organs; experiments/recipe-variants;
    # models/image.py)
    stem_pool: str = "max"


@dataclass
class PretrainCfg:
    """The self-supervised image pretext (``pretrain-image``; training/research/pretrain.py)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.02
    warmup_steps: int = 20
    temperature: float = 0.1
    crop: float = 0.85  # each view is a random crop of this fraction of the volume per axis
    checkpoint_every: int = 50


@dataclass
class TextCfg:
    model: str = ""  # a local Hugging Face model folder; empty: build a small BERT + WordPiece offline
    max_length: int = 192
    pooling: str = "first"  # first (Merlin) | mean
    vocab_size: int = 3000
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    train_layers: int = -1  # -1: the whole tower trains; 0: locked (LiT, pooled outputs cached); k: the top k layers
    sentences: bool = False  # a text's embedding = mean of the head over its sentences (models/text.py)
    head: str = "linear"  # linear (Merlin) | mlp
    # which sentences of a report or section train and evaluate: all (Merlin) | findings (only those that
    # state a finding, by the negation-aware rule of reports.py; a text with none becomes "Normal.") |
    # bare (findings, without section headers and list numbers: sentences shaped like the prompts)
    keep_sentences: str = "all"


@dataclass
class JointCfg:
    embed_norm: str = (
        "none"  # none (Merlin) | batch | batch_affine | text (centre the towers' projections; models/clip.py)
    )
    init_logit_scale: float = 2.6592600369644043  # log(1 / 0.07)
    multi_positive: bool = False  # identical normalised texts are positives of each other (loss.py)
    positives: str = "text"  # with multi_positive: text (identical texts) | labels (identical finding labels)
    # report: an image against its text's one embedding (the mean over its sentences with text.sentences);
    # sentences: an image against every distinct sentence of the batch, its own text's sentences the
    # positives (loss.sentence_loss)
    match: str = "report"
    loss: str = "infonce"  # infonce (softmax, both ways) | sigmoid (SigLIP's pairwise loss; match=sentences)
    init_logit_bias: float = -10.0  # the sigmoid loss's learnable bias at the start (SigLIP's)
    # match=sentences: a batch sentence whose locked-tower cosine to one of an image's own sentences is
    # at least this is neither its positive nor its negative (0: off; loss.sentence_loss)
    neighbours: float = 0.0
    # match=report: the sentence-level loss (joint.loss, joint.neighbours) added with this weight to the
    # report-level InfoNCE (0: off)
    sentence_weight: float = 0.0


@dataclass
class SamplerCfg:
    kind: str = "random"  # random | balanced
    ratio: str = "50:50"  # normal:abnormal for balanced section batches
    balance_full_reports: bool = False  # also balance full-report batches (normal = every section normal)
    subset_fraction: float = 1.0  # fixed subset of the training split (the paper: 4,362 / 15,331)
    data_fraction: float = 1.0  # nested fraction of that subset (20 % within 40 % within 100 %)
    subset_seed: int = 1234  # fixes the subset and the nesting, independent of the run seed
    # passes: each batch kind walks shuffled passes over its pool (a data loader's epochs, drop_last);
    # independent: every batch an independent draw (one "epoch" then covers ~63 % of the studies)
    order: str = "independent"
    # finding: a section is abnormal when a sentence states a finding (denials are normal);
    # stock: normal only when every sentence is a stock phrase (the early-training study's rule)
    section_rule: str = "finding"


@dataclass
class BatchingCfg:
    schedule: str = "alternate"  # alternate | full | sections
    system_choice: str = "round_robin"  # round_robin | random
    full_report_prob: float = 0.0  # per-sample chance that a section-batch item uses its full report
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))


@dataclass
class OptimCfg:
    lr: float = 1e-3
    text_lr: float = 3e-4
    # the pretrained text tower's trainable layers (text.train_layers k > 0), apart from its head: a
    # pretrained transformer wants a far smaller step than a head learnt from scratch; 0: text_lr
    tower_lr: float = 0.0
    weight_decay: float = 0.02
    warmup_steps: int = 50
    grad_clip: float = 1.0


@dataclass
class TrainCfg:
    steps: int = 600
    batch_size: int = 32  # per process
    steps_per_epoch: int = 0  # 0: one pass of the full training split at the global batch size
    eval_every: int = 100
    eval_studies: int = 0  # 0: the whole validation split
    # The validation metric that picks checkpoints/best.pt. Macro F1 at the validation split's own
    # F1-optimal thresholds is noisy on a few hundred studies; macro AUROC ranks without thresholds.
    select: str = "macro_f1"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    grad_checkpointing: bool = False
    num_workers: int = 0  # processes loading each step's volumes ahead of it (a DataLoader; 0: in the training process)
    # under torchrun: how long a rank waits at a collective for the others (cache, validation, checkpoints)
    dist_timeout_s: float = 1800.0
    sync_batchnorm: bool = False  # under torchrun: batch-norm statistics over the global batch (SyncBatchNorm)
    seed: int = 0
    deterministic: bool = True
    log_every: int = 10


@dataclass
class TrainConfig:
    preset: str = "custom"
    preprocess: dict = field(default_factory=lambda: PreprocessSpec.tiny().to_dict())
    image: ImageCfg = field(default_factory=ImageCfg)
    text: TextCfg = field(default_factory=TextCfg)
    joint: JointCfg = field(default_factory=JointCfg)
    sampler: SamplerCfg = field(default_factory=SamplerCfg)
    batching: BatchingCfg = field(default_factory=BatchingCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    pretrain: PretrainCfg = field(default_factory=PretrainCfg)

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def presets(cls) -> list[str]:
        folder = resources.files("training").joinpath("presets")
        return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))

    @classmethod
    def load(cls, preset: str, overrides: list[str] | None = None) -> TrainConfig:
        path = Path(preset)
        if path.suffix in (".yaml", ".yml") and path.exists():
            data = yaml.safe_load(path.read_text()) or {}
        else:
            f = resources.files("training").joinpath("presets", f"{preset}.yaml")
            if not f.is_file():
                raise ConfigError(f"preset {preset!r} does not exist; available: {', '.join(cls.presets())}")
            data = yaml.safe_load(f.read_text()) or {}
            data.setdefault("preset", preset)
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must be key=value")
            key, raw = item.split("=", 1)
            node = data
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {key!r}: {p!r} is not a section")
            # YAML 1.1 reads 50:50 as the base-60 integer 3050: keep ratios as written.
            node[parts[-1]] = raw if _RATIO.match(raw.strip()) else yaml.safe_load(raw)
        cfg = _build(cls, data, "")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for key, allowed in CHOICES.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if value not in allowed:
                raise ConfigError(f"{key} {value!r}: expected {', '.join(allowed[:-1])} or {allowed[-1]}")
        if self.joint.sentence_weight < 0 or (self.joint.sentence_weight and self.joint.match == "sentences"):
            raise ConfigError("joint.sentence_weight must be >= 0, and is for joint.match=report")
        if self.joint.loss == "sigmoid" and self.joint.match != "sentences" and not self.joint.sentence_weight:
            raise ConfigError("joint.loss sigmoid needs joint.match=sentences or joint.sentence_weight")
        if self.joint.match == "sentences" and self.joint.multi_positive and self.joint.positives == "labels":
            raise ConfigError("joint.match=sentences: positives come from the sentences, not joint.positives=labels")
        sentence_level = self.joint.match == "sentences" or self.joint.sentence_weight
        if self.joint.neighbours and (not sentence_level or self.text.train_layers != 0):
            raise ConfigError("joint.neighbours needs a sentence-level loss and a locked tower (text.train_layers=0)")
        parse_ratio(self.sampler.ratio)
        for name in ("subset_fraction", "data_fraction"):
            v = getattr(self.sampler, name)
            if not 0 < v <= 1:
                raise ConfigError(f"sampler.{name} must be in (0, 1], got {v}")
        bad = [s for s in self.batching.sections if s not in SECTIONS]
        if bad:
            raise ConfigError(f"batching.sections: unknown section(s) {bad}; known: {list(SECTIONS)}")
        if not 0 <= self.batching.full_report_prob <= 1:
            raise ConfigError("batching.full_report_prob must be in [0, 1]")
        if self.text.train_layers < -1:
            raise ConfigError(f"text.train_layers {self.text.train_layers}: expected -1 (all), 0 (locked) or k > 0")
        if self.train.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision {self.train.precision!r}: expected auto, fp32, bf16 or fp16")
        if self.text.model == REQUIRED:
            raise ConfigError(
                f"text.model: the {self.preset} preset trains a pretrained text tower; name its local Hugging Face "
                "folder, e.g. text.model=/models/Clinical-Longformer (nothing is downloaded)"
            )
        if self.train.num_workers < 0 or self.train.dist_timeout_s <= 0:
            raise ConfigError("train.num_workers must be >= 0 and train.dist_timeout_s > 0")
        if self.train.steps < 1 or self.train.batch_size < 2:
            raise ConfigError(
                "train.steps must be >= 1 and train.batch_size >= 2 (a contrastive batch needs negatives)"
            )
        try:
            PreprocessSpec.from_dict(self.preprocess)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"preprocess: {exc}") from None

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocess)

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        """What identifies a run's training: the settings that differ from the defaults (a new option
        whose default keeps the old behaviour leaves existing runs' digests, and so their resume, as
        they were); the ``preset`` label is not a setting."""
        base, mine = TrainConfig().to_dict(), self.to_dict()
        diff = {
            f"{sec}.{k}": v
            for sec, vals in mine.items()
            if isinstance(vals, dict)
            for k, v in vals.items()
            if base.get(sec, {}).get(k) != v
        }
        return hashlib.sha256(json.dumps(diff, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}")
    kwargs = {}
    defaults = cls()
    for name in known:
        if name not in data:
            continue
        value = data[name]
        default = getattr(defaults, name)
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, default, prefix + name)
    return dataclasses.replace(defaults, **kwargs)


def _coerce(value, default, key):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and ":" in str(default):
            raise ConfigError(f'{key}: YAML read the ratio as the number {value}; quote it, e.g. "50:50"')
        return str(value)
    if isinstance(default, (list, dict)):
        if not isinstance(value, type(default)):
            raise ConfigError(f"{key}: expected a {type(default).__name__}, got {value!r}")
        return value
    return value
