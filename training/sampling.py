"""What each optimisation step trains on: the alternating batch schedule and the samplers.

Every step's *global* batch (all ranks together) is a pure function of (seed, step), so all
ranks agree on it without communication, rank ``r`` takes its slice, a resumed run sees exactly
the batches it would have seen, and every arm of a study runs the same schedule:

- **Schedule.** ``alternate``: even steps train on full findings text, odd steps on one
  organ-system section (``round_robin`` through the systems or ``random``); ``full`` or
  ``sections`` only. In a section batch each item may use its full report instead with
  ``full_report_prob``. Items whose report lacks the section are never drawn for it (they are
  replaced by studies that have it), so no item trains on empty text.
- **Samplers.** ``random``: the batch is drawn without replacement from the eligible pool.
  ``balanced``: a section batch holds round(B * n) studies whose section is normal and the rest
  abnormal (normal: no sentence states a finding, ``sampler.section_rule``); a pool that runs short
  is drawn with replacement and the shortfall counted. Full-report batches are balanced too only
  with ``balance_full_reports`` (normal = every section normal).
- **Order.** ``sampler.order=passes``: each pool (per batch kind, and per normal / abnormal part)
  is walked in shuffled passes, as a data loader's epochs with ``drop_last``: the n-th batch of a
  kind takes the n-th slice of the current pass, so every study of the pool is seen once per pass.
  ``independent``: every batch is a fresh draw (the early-training study's order).
- **Data fractions.** A fixed subset of the training split (``subset_fraction``, seeded by
  ``subset_seed``, independent of the run seed) and a nested fraction of it (``data_fraction``):
  the first k of one fixed permutation, so 20 % lies within 40 % within 100 %.
- **Epochs.** ``steps_per_epoch`` is fixed by the *full* training split and the global batch,
  identical for every arm; unique volumes seen are counted per epoch.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .config import TrainConfig, parse_ratio
from .data import Study
from .reports import keep_sentences, section_status

NORMAL = "Normal."  # what keep_sentences(..., "findings") gives a text that states no finding

FULL = "full"


@dataclass(frozen=True)
class Item:
    index: int  # into the training-study list
    text: str  # FULL or a system name


class BatchPlanner:
    """What every step trains on: ``global_items(step)`` is the step's global batch (a pure function of
    the seed and the step), ``local_items`` a rank's slice, ``text_of`` an item's text, ``kind`` the
    step's batch kind (full report or one section), ``epoch`` its epoch; ``pool`` is the sampled
    training pool and ``shortfall`` counts draws made with replacement."""

    def __init__(self, studies: list[Study], cfg: TrainConfig, world_size: int = 1):
        self.studies = studies
        self.cfg = cfg
        self.world = world_size
        self.global_batch = cfg.train.batch_size * world_size
        s = cfg.sampler
        self.pool = nested_subset(len(studies), s.subset_fraction, s.data_fraction, s.subset_seed)
        if len(self.pool) < self.global_batch:
            raise ValueError(
                f"the sampled training pool has {len(self.pool)} studies, fewer than the global batch "
                f"{self.global_batch}; lower train.batch_size or raise the data fraction"
            )
        self.ratio = parse_ratio(s.ratio)
        self.sections = [
            sec for sec in cfg.batching.sections if sum(sec in studies[i].sections for i in self.pool) >= 2
        ]
        if cfg.batching.schedule != "full" and not self.sections:
            raise ValueError("no training report has any of the configured sections; use batching.schedule=full")
        self.has = {sec: np.array([i for i in self.pool if sec in studies[i].sections]) for sec in self.sections}
        status = {i: section_status(studies[i].parsed, s.section_rule) for i in self.pool}
        self.normal = {sec: np.array([i for i in self.has[sec] if status[i][sec] == "normal"]) for sec in self.sections}
        self.abnormal = {sec: np.setdiff1d(self.has[sec], self.normal[sec]) for sec in self.sections}
        self.report_normal = np.array([i for i in self.pool if all(v == "normal" for v in status[i].values())])
        self.report_abnormal = np.setdiff1d(self.pool, self.report_normal)
        self.steps_per_epoch = cfg.train.steps_per_epoch or max(1, len(studies) // self.global_batch)
        self.shortfall: Counter = Counter()  # draws made with replacement, by batch kind
        self._kinds: list[str] = []  # kind of steps 0.. (memo for occurrence counts under a random choice)
        from operators.contract.findings import load_catalogue

        cat = load_catalogue()
        self._section_findings = {sec: [j for j, f in enumerate(cat) if f.section == sec] for sec in self.sections}

    # -- schedule ----------------------------------------------------------------------------
    def kind(self, step: int) -> str:
        b = self.cfg.batching
        if b.schedule == "full":
            return FULL
        if b.schedule == "alternate" and step % 2 == 0:
            return FULL
        n_section = step // 2 if b.schedule == "alternate" else step
        if b.system_choice == "round_robin":
            return self.sections[n_section % len(self.sections)]
        return self.sections[int(self._rng(step, 1).integers(len(self.sections)))]

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _rng(self, step: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.train.seed, self.epoch(step), step, stream])

    def occurrence(self, step: int) -> int:
        """How many earlier steps had this step's batch kind."""
        b = self.cfg.batching
        kind = self.kind(step)
        if b.schedule == "full" or (b.schedule == "sections" and b.system_choice == "round_robin"):
            return step if b.schedule == "full" else step // len(self.sections)
        if b.schedule == "alternate" and kind == FULL:
            return step // 2
        if b.system_choice == "round_robin":  # alternate: section steps are the odd ones
            return (step // 2) // len(self.sections)
        while len(self._kinds) < step:
            self._kinds.append(self.kind(len(self._kinds)))
        return self._kinds[:step].count(kind)

    # -- sampling ----------------------------------------------------------------------------
    def _draw(self, pool: np.ndarray, k: int, rng: np.random.Generator, kind: str, step: int = -1) -> np.ndarray:
        if k == 0:
            return np.empty(0, dtype=int)
        if len(pool) == 0:
            raise ValueError(f"batch of kind {kind!r} needs {k} studies from an empty pool")
        if len(pool) >= k and self.cfg.sampler.order == "passes" and step >= 0:
            per_pass = len(pool) // k
            n = self.occurrence(step)
            stream = zlib.crc32(kind.encode())
            perm = np.random.default_rng([self.cfg.train.seed, stream, n // per_pass]).permutation(pool)
            j = n % per_pass
            return perm[j * k : (j + 1) * k]
        if len(pool) >= k:
            return rng.choice(pool, size=k, replace=False)
        self.shortfall[kind] += k - len(pool)
        return np.concatenate([rng.permutation(pool), rng.choice(pool, size=k - len(pool), replace=True)])

    def _balanced(self, normal, abnormal, rng, kind, step) -> np.ndarray:
        n = int(round(self.global_batch * self.ratio[0]))
        a = self.global_batch - n
        if len(normal) == 0:
            n, a = 0, self.global_batch
            self.shortfall[kind + ":no-normal"] += 1
        if len(abnormal) == 0:
            n, a = self.global_batch, 0
            self.shortfall[kind + ":no-abnormal"] += 1
        idx = np.concatenate(
            [self._draw(normal, n, rng, kind + ":normal", step), self._draw(abnormal, a, rng, kind + ":abnormal", step)]
        )
        return rng.permutation(idx)

    def global_items(self, step: int) -> list[Item]:
        kind = self.kind(step)
        rng = self._rng(step, 0)
        balanced = self.cfg.sampler.kind == "balanced"
        if kind == FULL:
            if balanced and self.cfg.sampler.balance_full_reports:
                idx = self._balanced(self.report_normal, self.report_abnormal, rng, FULL, step)
            else:
                idx = self._draw(np.asarray(self.pool), self.global_batch, rng, FULL, step)
            return [Item(int(i), FULL) for i in idx]
        if balanced:
            idx = self._balanced(self.normal[kind], self.abnormal[kind], rng, kind, step)
        else:
            idx = self._draw(self.has[kind], self.global_batch, rng, kind, step)
        p = self.cfg.batching.full_report_prob
        use_full = rng.random(len(idx)) < p if p > 0 else np.zeros(len(idx), bool)
        return [Item(int(i), FULL if f else kind) for i, f in zip(idx, use_full)]

    def local_items(self, step: int, rank: int = 0, items: list[Item] | None = None) -> list[Item]:
        """Rank ``rank``'s slice of the step's global batch (``items``: that batch, already drawn)."""
        items = self.global_items(step) if items is None else items
        b = self.cfg.train.batch_size
        return items[rank * b : (rank + 1) * b]

    def all_items(self) -> list[Item]:
        """Every (study, text) the pool can train on: each full report and each section it has."""
        items = [Item(int(i), FULL) for i in self.pool]
        if self.cfg.batching.schedule != "full":
            items += [Item(int(i), sec) for sec in self.sections for i in self.has[sec]]
        return items

    def finding_share(self, steps: int) -> dict[str, float]:
        """Share of section-batch items over ``steps`` steps whose section holds a finding: by the
        sampler's rule, by the report labels (a label-1 finding of that organ system), and by the rule
        over the sections that have both normal and abnormal studies (the ones a ratio can balance)."""
        n = rule = labelled = 0
        n_bal = rule_bal = 0
        abnormal = {sec: set(self.abnormal[sec].tolist()) for sec in self.sections}
        for step in range(steps):
            kind = self.kind(step)
            if kind == FULL:
                continue
            balanceable = len(self.normal[kind]) > 0 and len(self.abnormal[kind]) > 0
            for it in self.global_items(step):
                if it.text == FULL:
                    continue
                hit = it.index in abnormal[kind]
                labels = self.studies[it.index].labels
                n += 1
                rule += hit
                labelled += labels is not None and any(labels[j] == 1 for j in self._section_findings[kind])
                if balanceable:
                    n_bal += 1
                    rule_bal += hit
        return {
            "items": n,
            "by_rule": rule / n if n else float("nan"),
            "by_labels": labelled / n if n else float("nan"),
            "balanceable_by_rule": rule_bal / n_bal if n_bal else float("nan"),
            "unbalanceable_sections": [
                s for s in self.sections if not len(self.normal[s]) or not len(self.abnormal[s])
            ],
        }

    def label_key_of(self, item: Item) -> str:
        """What the item's text says in labels: the findings stated present (of its section, for a
        section item). Items with equal keys are positives under ``joint.positives=labels``; a study
        without labels falls back to its text."""
        st = self.studies[item.index]
        if st.labels is None:
            return "text:" + self.text_of(item)
        cols = self._section_findings.get(item.text) if item.text != FULL else None
        present = [j for j in (cols if cols is not None else range(len(st.labels))) if st.labels[j] == 1]
        return f"{item.text}:{present}"

    def text_of(self, item: Item) -> str:
        st = self.studies[item.index]
        keep = self.cfg.text.keep_sentences
        if item.text == FULL:
            return keep_sentences(st.findings_text, keep)
        kept = keep_sentences(st.sections[item.text], keep)
        if keep in ("findings", "bare") and kept == NORMAL:
            # A section that states no finding encodes as "Normal.", as a normal report and a denying
            # prompt do; the text tower applies the same rule again and this text is its fixed point.
            return NORMAL
        if keep == "bare":
            return kept  # the tower would strip a "<section>: " header again
        return f"{item.text}: {kept}"


def nested_subset(n: int, subset_fraction: float, data_fraction: float, seed: int) -> list[int]:
    """Indices of a fixed subset of ``n`` studies and a nested fraction of it (sorted)."""
    perm = np.random.default_rng(seed).permutation(n)
    subset = perm[: max(1, int(round(n * subset_fraction)))]
    inner = np.random.default_rng([seed, 1]).permutation(len(subset))
    k = max(1, int(round(len(subset) * data_fraction)))
    return sorted(int(i) for i in subset[inner[:k]])
