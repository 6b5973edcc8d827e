"""The seed paper's arms and the study presets that choose among them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ...config import ConfigError, TrainConfig

SUBSET_FRACTION = 4362 / 15331  # the paper's subset of Merlin's training split


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    sampler: dict  # sampler.* overrides (the subset fraction is filled in from the preset)
    paper: str  # the paper's macro F1 (%) as published
    compare_to: str  # the arm this one is compared with ("" for the baseline)
    overrides: tuple = ()  # other training overrides of this arm (the multi-positive arms)


MULTI_POSITIVE = ("joint.multi_positive=true",)  # duplicate texts are positives, not negatives


@dataclass(frozen=True)
class Contrast:
    """A comparison: sum of coef x arm macro F1. ``paper`` names the paper's arms pair it mirrors."""

    name: str
    terms: tuple  # ((arm, coef), ...)
    question: str
    paper: tuple = ()  # (arm, baseline) whose published values give the paper's delta


ARMS: tuple[Arm, ...] = (
    Arm("random", "full data, random sampling (baseline)", {"kind": "random"}, "74.45", ""),
    Arm(
        "balanced-25-75",
        "full data, section-balanced 25:75",
        {"kind": "balanced", "ratio": "25:75"},
        "71.65-72.02",
        "random",
    ),
    Arm(
        "balanced-50-50",
        "full data, section-balanced 50:50",
        {"kind": "balanced", "ratio": "50:50"},
        "71.65-72.02",
        "random",
    ),
    Arm(
        "balanced-75-25", "full data, section-balanced 75:25", {"kind": "balanced", "ratio": "75:25"}, "72.02", "random"
    ),
    Arm(
        "subset-20",
        "subset, 20 %, random",
        {"kind": "random", "subset": True, "data_fraction": 0.2},
        "65.26",
        "subset-100",
    ),
    Arm(
        "subset-40",
        "subset, 40 %, random",
        {"kind": "random", "subset": True, "data_fraction": 0.4},
        "not published",
        "subset-100",
    ),
    Arm(
        "subset-100",
        "subset, 100 %, random",
        {"kind": "random", "subset": True, "data_fraction": 1.0},
        "71.88",
        "random",
    ),
    Arm(
        "subset-100-balanced-50-50",
        "subset, 100 %, section-balanced 50:50",
        {"kind": "balanced", "ratio": "50:50", "subset": True, "data_fraction": 1.0},
        "68.01",
        "subset-100",
    ),
)
ARMS += (
    Arm(
        "random-mp",
        "full data, random sampling, multi-positive loss",
        {"kind": "random"},
        "not published",
        "random",
        MULTI_POSITIVE,
    ),
    Arm(
        "balanced-50-50-mp",
        "full data, section-balanced 50:50, multi-positive loss",
        {"kind": "balanced", "ratio": "50:50"},
        "not published",
        "random-mp",
        MULTI_POSITIVE,
    ),
    Arm(
        "subset-20-mp",
        "subset, 20 %, random, multi-positive loss",
        {"kind": "random", "subset": True, "data_fraction": 0.2},
        "not published",
        "subset-100-mp",
        MULTI_POSITIVE,
    ),
    Arm(
        "subset-100-mp",
        "subset, 100 %, random, multi-positive loss",
        {"kind": "random", "subset": True, "data_fraction": 1.0},
        "not published",
        "random-mp",
        MULTI_POSITIVE,
    ),
)
SAMPLER_ARMS = tuple(a.name for a in ARMS)  # a preset's arms when it names none: the sampler study
# Ablation arms (a study preset that names them): the preset's training recipe is the baseline arm `random`;
# each arm turns one method off (or the wider image stem on), the last turns them all off.
SCRATCH_TEXT = (
    "text.model=''",  # empty: the small BERT + WordPiece built offline (text.model= alone parses as null)
    "text.train_layers=-1",
    "text.sentences=false",
    "text.head=linear",
    "text.pooling=first",
    "text.max_length=192",
)
ARMS += (
    Arm(
        "abl-no-mp",
        "recipe without the multi-positive loss",
        {"kind": "random"},
        "-",
        "random",
        ("joint.multi_positive=false",),
    ),
    Arm(
        "abl-no-text-rule",
        "recipe without the text rule (all sentences)",
        {"kind": "random"},
        "-",
        "random",
        ("text.keep_sentences=all",),
    ),
    Arm(
        "abl-scratch-text",
        "recipe with a from-scratch text tower instead of MiniLM",
        {"kind": "random"},
        "-",
        "random",
        SCRATCH_TEXT,
    ),
    Arm(
        "abl-wide",
        "recipe with the wider image stem (resnet10_wide)",
        {"kind": "random"},
        "-",
        "random",
        ("image.arch=resnet10_wide",),
    ),
    Arm(
        "abl-none",
        "every method off (from-scratch text, plain InfoNCE, all sentences)",
        {"kind": "random"},
        "-",
        "random",
        SCRATCH_TEXT + ("joint.multi_positive=false", "text.keep_sentences=all"),
    ),
)
ARM_BY_NAME = {a.name: a for a in ARMS}
SCALING_ARMS = ("subset-20", "subset-40", "subset-100")
# Contrasts beyond "arm vs its compare_to": the rival explanation and the low-data question.
EXTRA_CONTRASTS: tuple[Contrast, ...] = (
    Contrast(
        "balancing penalty, multi-positive minus plain",
        (("balanced-50-50-mp", 1), ("random-mp", -1), ("balanced-50-50", -1), ("random", 1)),
        "does balancing hurt less once duplicate texts stop being negatives? (> 0: it does)",
    ),
    Contrast(
        "20 %-to-100 % gap closed by the multi-positive loss",
        (("subset-20-mp", 1), ("subset-100-mp", -1), ("subset-20", -1), ("subset-100", 1)),
        "how much of the 20 % -> 100 % gap the low-data method closes (> 0: it closes some)",
    ),
)


# The paper's main contrasts (random vs each balanced ratio; 20 % vs 100 % of the subset; balanced on the
# subset): their own Holm family, and the arms a study needs at least 10 seeds of (docs/study.md).
MAIN_CONTRASTS = (
    "balanced-25-75 vs random",
    "balanced-50-50 vs random",
    "balanced-75-25 vs random",
    "subset-20 vs subset-100",
    "subset-100-balanced-50-50 vs subset-100",
)
MAIN_ARMS = ("random", "balanced-25-75", "balanced-50-50", "balanced-75-25", "subset-20", "subset-100",
             "subset-100-balanced-50-50")  # fmt: skip


def contrasts(arm_names: list[str]) -> list[Contrast]:
    """The study's family of comparisons among the arms it runs: each arm against its
    ``compare_to``, then the extra contrasts whose arms are all present."""
    out = [
        Contrast(
            f"{a.name} vs {a.compare_to}",
            ((a.name, 1), (a.compare_to, -1)),
            a.label,
            (a.name, a.compare_to),
        )
        for a in (ARM_BY_NAME[n] for n in arm_names)
        if a.compare_to and a.compare_to in arm_names
    ]
    out += [c for c in EXTRA_CONTRASTS if all(arm in arm_names for arm, _ in c.terms)]
    return out


@dataclass
class StudyPreset:
    name: str = "custom"
    description: str = ""
    train_preset: str = "cpu-tiny"
    overrides: list = field(default_factory=list)  # applied to every arm's training config
    seeds: int = 3
    jobs: int = 1  # runs at a time (0: the cores // threads per run)
    threads: int = 0  # torch threads per run (0: torch's default)
    subset_fraction: float = SUBSET_FRACTION
    split: str = "test"
    occlusion: list = field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5])
    bootstrap: int = 1000
    arms: list = field(default_factory=lambda: list(SAMPLER_ARMS))

    @classmethod
    def available(cls) -> list[str]:
        folder = resources.files("training").joinpath("presets", "study")
        return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))

    @classmethod
    def load(cls, name: str, overrides: list[str] | None = None) -> StudyPreset:
        """A shipped preset or a YAML file; ``overrides`` (``key=value``) are added to its own, for every arm
        (e.g. ``text.model=DIR`` for ``paper-merlin``)."""
        path = Path(name)
        if path.suffix in (".yaml", ".yml") and path.exists():
            text = path.read_text()
        else:
            f = resources.files("training").joinpath("presets", "study", f"{name}.yaml")
            if not f.is_file():
                raise ConfigError(f"study preset {name!r} does not exist; available: {', '.join(cls.available())}")
            text = f.read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"study preset {name!r}: expected a mapping")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ConfigError(f"study preset {name!r}: unknown key(s) {sorted(unknown)}")
        data.setdefault("name", path.stem if path.suffix in (".yaml", ".yml") else name)
        if overrides:
            data["overrides"] = [*data.get("overrides", []), *overrides]
        preset = cls(**data)
        preset.validate()
        return preset

    def validate(self) -> None:
        bad = [a for a in self.arms if a not in ARM_BY_NAME]
        if bad:
            raise ConfigError(f"study arms {bad} do not exist; known: {list(ARM_BY_NAME)}")
        if "random" not in self.arms:
            raise ConfigError("a study needs the baseline arm 'random'")
        if self.seeds < 1 or self.jobs < 0 or self.bootstrap < 0:
            raise ConfigError("seeds must be >= 1, jobs >= 0 (0: from the cores) and bootstrap >= 0")
        if not 0 < self.subset_fraction <= 1:
            raise ConfigError(f"subset_fraction must be in (0, 1], got {self.subset_fraction}")
        for a in self.arms:  # every arm's config must load (a bad override is named here, not an hour in)
            self.train_config(ARM_BY_NAME[a], 0)

    def train_config(self, arm: Arm, seed: int) -> TrainConfig:
        s = dict(arm.sampler)
        sub = s.pop("subset", False)
        over = [f"sampler.{k}={v}" for k, v in s.items()]
        over.append(f"sampler.subset_fraction={self.subset_fraction if sub else 1.0}")
        # Arms differ only in the sampler (and the loss for the multi-positive arms): steps, LR schedule,
        # alternation and initial weights come from the preset.
        return TrainConfig.load(
            self.train_preset, list(self.overrides) + over + list(arm.overrides) + [f"train.seed={seed}"]
        )

    def digest_fields(self) -> dict:
        d = asdict(self)
        d.pop("seeds")  # more seeds may be added to a study on --resume
        d.pop("jobs")
        d.pop("threads")
        d.pop("bootstrap")  # the test-study resamples of the statistics: no run depends on them
        return d


# ---------------------------------------------------------------------------------------------
# Running
