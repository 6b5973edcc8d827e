import numpy as np
import pytest

from training.config import TrainConfig
from training.data import read_merlin_release
from training.sampling import FULL, BatchPlanner, Item, nested_subset


@pytest.fixture(scope="module")
def train_studies(corpus200):
    return [s for s in read_merlin_release(corpus200) if s.split == "train"]


def planner(studies, *overrides, world=1):
    return BatchPlanner(studies, TrainConfig.load("cpu-tiny", ["train.batch_size=8", *overrides]), world)


def test_alternating_round_robin_and_no_empty_text(train_studies):
    p = planner(train_studies)
    kinds = [p.kind(s) for s in range(2 * len(p.sections) + 2)]
    assert kinds[0::2] == [FULL] * len(kinds[0::2])
    assert kinds[1::2][: len(p.sections)] == p.sections
    for step in range(40):
        for it in p.global_items(step):
            text = p.text_of(it)
            assert text.strip() and (it.text == FULL or it.text in train_studies[it.index].sections)
            if it.text != FULL:
                assert it.text == p.kind(step)


def test_schedule_variants(train_studies):
    assert all(planner(train_studies, "batching.schedule=full").kind(s) == FULL for s in range(5))
    p = planner(train_studies, "batching.schedule=sections", "batching.system_choice=random")
    kinds = [p.kind(s) for s in range(30)]
    assert FULL not in kinds and len(set(kinds)) > 3
    p = planner(train_studies, "batching.full_report_prob=0.5")
    items = [it for s in range(1, 40, 2) for it in p.global_items(s)]
    frac = np.mean([it.text == FULL for it in items])
    assert 0.35 < frac < 0.65


@pytest.mark.parametrize("ratio,normal", [("25:75", 2), ("50:50", 4), ("75:25", 6)])
def test_balanced_ratio(train_studies, ratio, normal):
    p = planner(train_studies, "sampler.kind=balanced", f"sampler.ratio={ratio}")
    for step in range(1, 30, 2):
        sec = p.kind(step)
        items = p.global_items(step)
        n = sum(it.index in set(p.normal[sec].tolist()) for it in items)
        if len(p.normal[sec]) and len(p.abnormal[sec]):
            assert n == normal, (sec, n)


@pytest.mark.parametrize("extra", [[], ["batching.schedule=sections", "batching.system_choice=random"]])
def test_passes_cover_every_study_once_per_pass(train_studies, extra):
    """sampler.order=passes: the n-th batch of a kind is the n-th slice of a shuffled pass over its
    pool (drop_last), so a pass shows each study once; independent draws repeat and miss studies."""
    p = planner(train_studies, "sampler.order=passes", *extra)
    kind = FULL if not extra else p.kind(0)
    steps = [s for s in range(4000) if p.kind(s) == kind]
    pool = np.asarray(p.pool) if kind == FULL else p.has[kind]
    per_pass = len(pool) // p.global_batch
    seen = [it.index for s in steps[:per_pass] for it in p.global_items(s)]
    assert len(seen) == len(set(seen)) == per_pass * p.global_batch
    second = [it.index for s in steps[per_pass : 2 * per_pass] for it in p.global_items(s)]
    assert len(set(second)) == len(second) and second != seen  # a fresh shuffle
    again = planner(train_studies, "sampler.order=passes", *extra)  # a pure function of (seed, step)
    assert [it.index for it in p.global_items(steps[3])] == [it.index for it in again.global_items(steps[3])]
    q = planner(train_studies, *extra)
    drawn = [it.index for s in steps[:per_pass] for it in q.global_items(s)]
    assert len(set(drawn)) < len(drawn)


def test_balanced_passes_keep_the_ratio(train_studies):
    p = planner(train_studies, "sampler.kind=balanced", "sampler.ratio=25:75", "sampler.order=passes")
    for step in range(1, 60, 2):
        sec = p.kind(step)
        if len(p.normal[sec]) >= 2 and len(p.abnormal[sec]) >= 6:
            items = p.global_items(step)
            assert sum(it.index in set(p.normal[sec].tolist()) for it in items) == 2
            assert len({it.index for it in items}) == 8


def test_section_rule_finding_treats_denials_as_normal(train_studies):
    """Under the stock rule a section that only denies findings counted as abnormal; under the
    finding rule abnormal sections are the ones that state a finding."""
    stock = planner(train_studies, "sampler.section_rule=stock")
    finding = planner(train_studies)
    for sec in ("adrenal glands", "kidneys"):
        if sec in finding.sections:
            assert len(finding.abnormal[sec]) < len(stock.abnormal[sec])
    for sec in finding.sections:
        for i in finding.abnormal[sec][:5]:
            assert "no " not in train_studies[i].sections[sec].lower()[:3] or "." in train_studies[i].sections[sec]


def test_short_pool_draws_with_replacement_and_logs(train_studies):
    p = planner(train_studies, "sampler.kind=balanced", "sampler.ratio=1:0", "train.batch_size=64")
    for step in range(1, 27, 2):
        assert len(p.global_items(step)) == 64
    assert sum(p.shortfall.values()) > 0


def test_nested_fractions():
    full = set(nested_subset(1000, 0.3, 1.0, 7))
    f40 = set(nested_subset(1000, 0.3, 0.4, 7))
    f20 = set(nested_subset(1000, 0.3, 0.2, 7))
    assert len(full) == 300 and len(f40) == 120 and len(f20) == 60
    assert f20 < f40 < full
    assert nested_subset(1000, 0.3, 0.2, 7) == nested_subset(1000, 0.3, 0.2, 7)
    assert set(nested_subset(1000, 0.3, 1.0, 8)) != full


def test_fraction_arm_draws_only_from_its_pool(train_studies):
    p = planner(train_studies, "sampler.data_fraction=0.2", "train.batch_size=4")
    pool = set(p.pool)
    assert len(pool) == round(len(train_studies) * 0.2)
    assert all(it.index in pool for s in range(30) for it in p.global_items(s))
    assert p.steps_per_epoch == planner(train_studies, "train.batch_size=4").steps_per_epoch


def test_ddp_shards_partition_the_global_batch(train_studies):
    p = planner(train_studies, world=2)
    for step in range(6):
        g = p.global_items(step)
        assert len(g) == 16
        assert p.local_items(step, 0) + p.local_items(step, 1) == g


def test_deterministic_and_reseeded_per_step(train_studies):
    a, b = planner(train_studies), planner(train_studies)
    assert [a.global_items(s) for s in range(10)] == [b.global_items(s) for s in range(10)]
    assert a.global_items(0) != a.global_items(2)
    c = planner(train_studies, "train.seed=1")
    assert c.global_items(0) != a.global_items(0)
    # Every arm runs the same schedule of batch kinds.
    d = planner(train_studies, "sampler.kind=balanced", "sampler.ratio=25:75")
    assert [a.kind(s) for s in range(40)] == [d.kind(s) for s in range(40)]


def test_label_keys_follow_the_findings_stated_present(train_studies):
    from operators.contract.findings import load_catalogue

    p = planner(train_studies)
    cat = load_catalogue()
    liver = [j for j, f in enumerate(cat) if f.section == "liver"]
    has_liver = [i for i, s in enumerate(train_studies) if "liver" in s.sections]
    keys = {}
    for i in has_liver:
        keys.setdefault(p.label_key_of(Item(i, "liver")), set()).add(
            tuple(int(train_studies[i].labels[j] == 1) for j in liver)
        )
    assert len(keys) > 1 and all(len(v) == 1 for v in keys.values())  # one key <=> one set of liver findings
    full = {p.label_key_of(Item(i, FULL)) for i in range(len(train_studies))}
    assert len(full) > len(keys)
