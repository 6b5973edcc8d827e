"""Zero-shot metrics: fair ranks under ties, one rule for single-class findings."""

import numpy as np
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
