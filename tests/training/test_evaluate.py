"""Zero-shot metrics: fair ranks under ties, one rule for single-class findings, a site's own findings."""

import numpy as np
import pytest
import torch

from training.evaluate import macro_f1_from, retrieval_metrics, zero_shot_metrics


def test_retrieval_ranks_ties_fairly():
    # every similarity equal: a random order puts the true match in the top 5 of 10 half the time
    emb = torch.ones(10, 4)
    r = retrieval_metrics(emb, emb)
    assert abs(r["image_to_report"]["R@5"] - 0.5) < 1e-9
    assert abs(r["report_to_image"]["R@1"] - 0.1) < 1e-9
    eye = torch.eye(10)  # distinct embeddings: the true match alone on top
    assert retrieval_metrics(eye, eye)["image_to_report"]["R@1"] == 1.0


def test_single_class_findings_enter_no_macro_metric():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(50, 30)).astype(np.int8)
    labels[:, 3] = 0  # no positive: F1 would be 0 whatever the model does
    labels[:, 4] = 1  # no negative
    margins = rng.normal(size=(50, 30))
    m = zero_shot_metrics(margins, labels)
    ids = list(m["per_finding"])
    for j in (3, 4):
        assert m["per_finding"][ids[j]]["f1"] is None and m["per_finding"][ids[j]]["auroc"] is None
    pred = (margins > 0).astype(int)
    keep = [j for j in range(30) if j not in (3, 4)]
    assert abs(macro_f1_from(pred, labels) - macro_f1_from(pred[:, keep], labels[:, keep])) < 1e-12
    assert abs(m["macro_f1"] - macro_f1_from(pred, labels)) < 1e-9


def test_a_sites_own_findings_are_evaluated_as_the_catalogue_is(tiny_package, tmp_path, capsys):
    """``evaluate --findings FILE --labels CSV``: a site's findings (here two catalogue findings' prompts under
    new ids, one with its own threshold) scored as the catalogue's, on the split's labelled studies."""
    import csv
    import json
    import shutil

    import yaml

    from operators.contract.findings import load_catalogue
    from operators.contract.scoring import decide_present, margin_probability
    from training.data import load_studies
    from training.evaluate import finding_auroc
    from training.evaluate_run import evaluate_run
    from training.run_folder import load_run

    data, run = tiny_package["data"], tmp_path / "run"
    shutil.copytree(tiny_package["run"], run)
    common = {"cache_dir": tiny_package["cache"], "progress": False, "occlusion_levels": (0.0,)}
    evaluate_run(run, data, **common)
    cat = np.load(run / "metrics_predictions.npz")
    test = [s for s in load_studies(data) if s.split == "test"]
    labels = np.stack([s.labels for s in test])
    ids = load_catalogue().ids
    both = [j for j in range(len(ids)) if (labels[:-2, j] == 1).sum() >= 2 and (labels[:-2, j] == 0).sum() >= 2]
    picked = both[:2]
    catalogue = list(load_catalogue())
    site = {"findings": [
        {"id": f"site_{ids[j]}", "positive_prompts": list(catalogue[j].positive_prompts),
         "negative_prompts": list(catalogue[j].negative_prompts), "threshold": t}
        for j, t in zip(picked, (0.5, 0.7))
    ]}  # fmt: skip
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site))
    train_one = next(s for s in load_studies(data) if s.split == "train")
    with open(tmp_path / "labels.csv", "w", newline="") as fh:  # the last two test studies unlabelled
        w = csv.writer(fh)
        w.writerow(["study id", *(f"site_{ids[j]}" for j in picked)])
        for s in [*test[:-2], train_one]:
            w.writerow([s.study_id, *(int(s.labels[j]) for j in picked)])
    path, text = evaluate_run(run, data, findings=tmp_path / "site.yaml", labels=tmp_path / "labels.csv", **common)
    assert path.name == "metrics_site.json" and "site_" in text
    m = json.loads(path.read_text())
    meta = m["meta"]["findings"]
    assert m["meta"]["studies"] == len(test) - 2
    assert meta["split_studies_without_labels"] == 2 and meta["label_rows_not_in_split"] == 1
    own = np.load(run / "metrics_site_predictions.npz")
    assert list(own["study_ids"]) == list(cat["study_ids"][:-2])
    np.testing.assert_allclose(own["margins"], cat["margins"][:-2][:, picked], atol=1e-6)
    scale = load_run(run, "best", "cpu")[0].scale().item()
    for j, threshold in zip(picked, (0.5, 0.7)):
        got = m["zero_shot"]["per_finding"][f"site_{ids[j]}"]
        y, margin = labels[:-2, j], cat["margins"][:-2, j]
        keep = y != -1
        assert got["auroc"] == pytest.approx(finding_auroc(y[keep], margin[keep]))
        pred = decide_present(margin_probability(margin[keep], scale), threshold)
        tp, fp, fn = (pred & (y[keep] == 1)).sum(), (pred & (y[keep] == 0)).sum(), (~pred & (y[keep] == 1)).sum()
        assert got["f1"] == pytest.approx(2 * tp / max(2 * tp + fp + fn, 1))
        assert got["n"] == keep.sum()

    # refusals name the file and the problem, one line, exit 2
    from training.cli import main

    (tmp_path / "short.csv").write_text(f"study id,site_{ids[picked[0]]}\n{test[0].study_id},1\n")
    cli = ["evaluate", "--run", str(run), "--data", str(data), "--quiet"]
    for extra, message in (
        (["--findings", tmp_path / "site.yaml", "--labels", tmp_path / "short.csv"], "short.csv: missing column"),
        (["--findings", tmp_path / "site.yaml"], "both --findings FILE and --labels CSV"),
    ):
        capsys.readouterr()
        assert main([*cli, *map(str, extra)]) == 2
        err = capsys.readouterr().err
        assert message in err.strip().splitlines()[-1] and "Traceback" not in err, err
