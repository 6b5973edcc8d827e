"""``ct-zeroshot-train probe``: the linear probe and the supervised reference measure what they claim."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from training.research.probe import linear_probe, per_finding_auroc, train_supervised


def test_linear_probe_finds_an_encoded_finding_and_not_a_random_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8))
    y = np.stack(
        [
            (x[:, 0] + 0.3 * rng.normal(size=600) > 0.5).astype(int),  # encoded in dimension 0
            rng.integers(0, 2, size=600),  # unrelated to x
            np.zeros(600, int),
        ],
        axis=1,
    )  # one class in training
    y[rng.random(600) < 0.3, 0] = -1  # unmentioned: dropped
    y[400:, 2] = rng.integers(0, 2, size=200)
    scores = linear_probe(x[:400], y[:400], x[400:])
    auc = per_finding_auroc(scores, y[400:])
    assert auc[0] > 0.95
    assert 0.35 < auc[1] < 0.65
    assert auc[2] is None  # nothing to fit on: reported as missing, not as a number


def _toy_volumes(n, rng):
    """(1, 16, 16, 16) volumes; finding 0 is a bright cube somewhere, finding 1 is never mentioned."""
    vols = rng.normal(0.5, 0.05, size=(n, 1, 16, 16, 16)).astype(np.float32)
    present = rng.random(n) < 0.4
    for i in np.flatnonzero(present):
        a, b, c = rng.integers(2, 11, size=3)
        vols[i, 0, a : a + 4, b : b + 4, c : c + 4] += 0.4
    labels = np.stack([present.astype(np.int8), np.full(n, -1, np.int8)], axis=1)
    return vols, labels


@pytest.mark.parametrize("frozen_stages", [0, 2])
def test_supervised_reference_learns_a_visible_finding_and_ignores_unmentioned_labels(frozen_stages):
    """Also with the run's frozen stages (trained from their cached output, as train does), which
    keep their initial weights."""
    import torch

    from training.models.image import ImageEncoder

    rng = np.random.default_rng(1)
    vols, labels = _toy_volumes(240, rng)
    model, pick = train_supervised(
        "resnet10_tiny",
        vols[:160],
        labels[:160],
        steps=60,
        batch_size=16,
        lr=3e-3,
        weight_decay=0.0,
        progress=False,
        frozen_stages=frozen_stages,
        val_volumes=vols[200:],
        val_labels=labels[200:],
        eval_every=20,
    )
    assert pick["step"] in (20, 40, 60) and pick["macro_auroc"] > 0.5  # chosen on validation
    if frozen_stages:
        torch.manual_seed(0)
        fresh = ImageEncoder("resnet10_tiny", 2, frozen_stages=frozen_stages)
        for stage_a, stage_b in zip(model.i3_resnet.stages()[:frozen_stages], fresh.i3_resnet.stages()[:frozen_stages]):
            for ma, mb in zip(stage_a, stage_b):
                for ta, tb in zip(ma.state_dict().values(), mb.state_dict().values()):
                    assert torch.equal(ta, tb)

    with torch.no_grad():
        scores = model(torch.from_numpy(vols[160:])).numpy()
    auc = per_finding_auroc(scores, labels[160:])
    assert auc[0] > 0.9
    assert auc[1] is None


def test_probe_command(tiny_package, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_package["run"], run)
    base = [
        sys.executable,
        "-m",
        "training.cli",
        "probe",
        "--run",
        str(run),
        "--data",
        str(tiny_package["data"]),
        "--cache",
        str(tiny_package["cache"]),
        "--quiet",
    ]
    sup = ["--supervised-steps", "3", "--supervised-seeds", "2", "--unlabelled-variant"]
    proc = subprocess.run(base + sup, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "linear_probe" in proc.stdout and "supervised" in proc.stdout
    result = json.loads((run / "probe.json").read_text())
    assert len(result["per_finding"]) == 30
    assert set(result["macro_auroc"]) == {
        "zero_shot", "report_read_out", "linear_probe", "supervised", "supervised_unlabelled_as_negative"
    }  # fmt: skip
    for value in result["macro_auroc"].values():
        assert 0.0 <= value <= 1.0
    meta = result["meta"]
    assert meta["supervised_steps"] == 3 and meta["test_studies"] > 0
    assert meta["split"] == "validation"  # a decision may read it; test only when asked
    assert meta["corpus"]["seed"] == 0 and meta["corpus"]["studies"] == 200
    for name in ("supervised", "supervised_unlabelled_as_negative"):
        assert meta["supervised"][name]["seeds"] == [0, 1] and len(meta["supervised"][name]["selected"]) == 2

    proc = subprocess.run(base + ["--train-limit", "1"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--train-limit must be >= 2" in proc.stderr
