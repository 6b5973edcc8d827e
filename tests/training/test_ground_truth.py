"""The phantoms' ground truth beside the report labels, and the no-image baseline."""

import json

import numpy as np
import pytest

from operators.contract.findings import load_catalogue
from training.data import load_studies
from training.ground_truth import (
    GroundTruthError,
    demographics,
    ground_truth_metrics,
    load_ground_truth,
    no_image_baseline,
    split_ids,
    truth_matrix,
    truth_report,
)

N_FINDINGS = len(load_catalogue().ids)


def test_truth_covers_every_cell_and_agrees_with_the_labels(corpus200):
    truth = load_ground_truth(corpus200)
    studies = load_studies(corpus200)
    ids = [s.study_id for s in studies]
    t = truth_matrix(truth, ids)
    labels = np.stack([s.labels for s in studies])
    assert t.shape == labels.shape == (200, N_FINDINGS)
    mentioned = labels != -1
    assert mentioned.mean() < 0.6  # the reports leave most cells unmentioned; the truth fills them
    agree = (t[mentioned] == labels[mentioned]).mean()
    assert agree > 0.95, agree  # the reports' deliberate errors are rare
    demo = demographics(truth, ids)
    assert demo.shape == (200, 2) and set(np.unique(demo[:, 1])) <= {0.0, 1.0}
    assert 1.5 < demo[:, 0].mean() < 9.0  # age in decades


def test_metrics_of_a_perfect_and_an_everything_positive_reader():
    rng = np.random.default_rng(0)
    t = (rng.random((80, N_FINDINGS)) < 0.2).astype(np.int8)
    t[:, 5] = 0  # a finding no phantom holds: enters no macro figure, its calls still count
    perfect = ground_truth_metrics(t.astype(float), t, t)
    assert perfect["macro_auroc"] == 1.0 and perfect["macro_f1"] == 1.0
    assert perfect["calls_per_true_finding"] == 1.0 and perfect["sensitivity"] == 1.0
    assert perfect["per_finding"][load_catalogue().ids[5]]["auroc"] is None
    everything = ground_truth_metrics(np.zeros(t.shape), np.ones(t.shape), t)
    assert everything["calls_per_true_finding"] == pytest.approx(t.size / t.sum())
    assert everything["macro_auroc"] == 0.5


def test_the_baseline_reads_co_occurrence_not_chance():
    rng = np.random.default_rng(1)
    n = 600
    t = (rng.random((n, N_FINDINGS)) < 0.3).astype(np.int8)
    t[:, 0] = t[:, 1]  # finding 0 always comes with finding 1: knowable without the image
    demo = np.column_stack([rng.uniform(3, 8, n), rng.integers(0, 2, n)])
    scores = no_image_baseline(t[:400], demo[:400], t[400:], demo[400:])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(t[400:, 0], scores[:, 0]) > 0.99
    assert abs(roc_auc_score(t[400:, 7], scores[:, 7]) - 0.5) < 0.15  # independent of everything


def test_truth_report_names_findings_that_do_not_beat_the_baseline(corpus200):
    truth = load_ground_truth(corpus200)
    test = split_ids(truth, "test")
    t = truth_matrix(truth, test)
    rng = np.random.default_rng(2)
    noise = rng.normal(size=t.shape)
    rep = truth_report(truth, test, noise, noise > 1.0)  # an image-blind reader
    gt, base = rep["ground_truth"], rep["no_image_baseline"]
    assert gt["studies"] == len(test) and abs(gt["macro_auroc"] - 0.5) < 0.1
    short = {f for f, v in base["per_finding"].items() if v["margin"] is not None and v["margin"] < 0.05}
    assert short and set(base["not_beating_baseline"]) == short
    oracle = truth_report(truth, test, t + 0.01 * noise, t == 1)
    assert oracle["ground_truth"]["macro_f1"] == 1.0
    assert oracle["no_image_baseline"]["not_beating_baseline"] == [] or all(
        oracle["no_image_baseline"]["per_finding"][f]["baseline_auroc"] > 0.95
        for f in oracle["no_image_baseline"]["not_beating_baseline"]
    )


def test_a_broken_ground_truth_file_is_named(tmp_path, corpus200):
    lines = (corpus200 / "ground_truth.jsonl").read_text().splitlines()
    (tmp_path / "ground_truth.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(GroundTruthError, match=r"ground_truth.jsonl: line 2"):
        load_ground_truth(tmp_path)
    rec = json.loads(lines[0])
    rec["findings"] = {"made_up_finding": {}}
    (tmp_path / "ground_truth.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(GroundTruthError, match="outside the catalogue"):
        load_ground_truth(tmp_path)
    with pytest.raises(GroundTruthError, match="no ground truth"):
        load_ground_truth(tmp_path / "absent")
    with pytest.raises(GroundTruthError, match="no record for 1 studies"):
        truth_matrix({}, ["SYdeadbee"])


def test_evaluate_reports_ground_truth_beside_labels(tiny_package, tmp_path):
    import shutil

    from training.evaluate_run import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(tiny_package["run"], run)
    path, text = evaluate_run(
        run, tiny_package["data"], cache_dir=tiny_package["cache"], progress=False, occlusion_levels=(0.0,)
    )
    m = json.loads(path.read_text())
    assert m["ground_truth"]["studies"] == m["meta"]["studies"]
    assert set(m["ground_truth"]["per_finding"]) == set(m["zero_shot"]["per_finding"])
    assert m["ground_truth"]["decision"].startswith("merlin")
    assert "no_image_baseline" in m and "not beating the no-image baseline" in text
    # the side-by-side table of evaluated runs (python -m benchmarks.compare_runs)
    from benchmarks.compare_runs import main as compare_main

    out = tmp_path / "cmp" / "compare"
    assert compare_main(["--run", f"a={run}={tiny_package['data']}", "--run", f"b={run}={tiny_package['data']}",
                         "--out", str(out)]) == 0  # fmt: skip
    table = (out.with_suffix(".md")).read_text()
    assert "a: truth" in table and "b: no-image" in table and "python -m benchmarks.compare_runs" in table
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["runs"]["a"]["truth_macro_auroc"] == m["ground_truth"]["macro_auroc"]


def test_threshold_rules_are_fitted_on_one_validation_half_and_scored_on_the_other():
    from benchmarks.threshold_rules import RULES, compare_rules

    rng = np.random.default_rng(7)
    n, k = 400, 4
    truth = (rng.random((n, k)) < 0.3).astype(np.int8)
    probs = np.clip(truth * 0.35 + rng.random((n, k)) * 0.65, 0, 1)
    probs[:, 3] = rng.random(n)  # a finding the score cannot tell apart
    labels = truth.copy()
    missed = rng.random((n, k)) < 0.5  # reports mention half the findings; a mentioned truth is right
    labels[missed] = -1
    rows = compare_rules(probs, labels, truth, seed=0)
    assert len(rows) == len(RULES) and sum(r["shipped_rule"] for r in rows) == 1
    by = {(r["fitted_on"], r["auroc_floor"], r["max_call_ratio"]): r for r in rows}
    for r in rows:
        assert 0 <= r["truth_macro_f1"] <= 1 and r["calls_per_true_finding"] > 0
        assert all(a <= k for a in r["assessed"])
    floor_rows = [r for r in rows if r["auroc_floor"] > 0]
    assert all(max(r["assessed"]) <= k - 1 for r in floor_rows)  # the chance finding is never assessed
    assert all(min(r["assessed"]) == k for r in rows if r["auroc_floor"] == 0)
    assert rows == compare_rules(probs, labels, truth, seed=0)  # the halves are a function of the seed
    assert by[("validation labels", 0.65, 1.5)]["shipped_rule"]
