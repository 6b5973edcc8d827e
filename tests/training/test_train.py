import subprocess
import sys

import pytest
import torch

from tests.conftest import TINY_TRAIN
from training.config import TrainConfig
from training.data import DataError
from training.train import train

SMALL = [*TINY_TRAIN, "train.log_every=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One preprocessed-volume cache for this module's runs (the same spec): built by the first, read by
    the rest, as runs share a cache in practice."""
    return tmp_path_factory.mktemp("volume-cache")


def _scalars(folder):
    """{tag: [(step, value), ...]} of a run's TensorBoard event files (the last value written per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        steps = {e.step: round(e.value, 6) for e in acc.Scalars(tag)}
        out[tag] = sorted(steps.items())
    return out


def _weights(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]


def test_resume_gives_the_same_weights(corpus200, cache, tmp_path, monkeypatch):
    cfg = TrainConfig.load("cpu-tiny", SMALL)
    a = train(corpus200, tmp_path / "a", cfg, cache_dir=cache, progress=False)
    # run b is tracked in MLflow too (its local file store here; a site points this at its server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert a["finished"] and a["steps_done"] == 6
    b1 = train(corpus200, tmp_path / "b", cfg, cache_dir=cache, stop_after=3, progress=False)
    assert not b1["finished"] and not (tmp_path / "b" / "train_summary.json").exists()
    b2 = train(corpus200, tmp_path / "b", cfg, cache_dir=cache, progress=False)
    assert b2["finished"]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # The logs of the resumed run read like the uninterrupted one.
    assert (tmp_path / "a" / "log.csv").read_text().count("\n") == (tmp_path / "b" / "log.csv").read_text().count("\n")
    for name in ("config.yaml", "epochs.csv", "val.csv", "checkpoints/init.pt", "checkpoints/best.pt"):
        assert (tmp_path / "a" / name).exists(), name
    for name in ("epochs.csv", "val.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name
    # TensorBoard events beside the CSVs: the same series, and the resumed run's read like the uninterrupted one.
    events = {run: _scalars(tmp_path / run / "tensorboard") for run in ("a", "b")}
    assert sorted(events["a"]) == ["train/loss", "train/lr", "train/temperature", "validation/macro_auroc",
                                   "validation/macro_f1"]  # fmt: skip
    assert [s for s, _ in events["a"]["train/loss"]] == list(range(1, 7))  # steps done
    assert [s for s, _ in events["a"]["validation/macro_f1"]] == [3, 6]
    assert events["a"] == events["b"]
    # MLflow: one run across the resume, the config as parameters, the same series (last value per step)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id = (tmp_path / "b" / "mlflow_run_id").read_text().strip()
    tracked = client.get_run(run_id)
    assert tracked.info.status == "FINISHED" and tracked.data.tags["config_digest"] == cfg.digest()
    assert tracked.data.params["train.steps"] == "6"
    assert len(client.search_runs([tracked.info.experiment_id])) == 1
    for tag, series in events["b"].items():
        history = {m.step: round(m.value, 6) for m in client.get_metric_history(run_id, tag)}
        assert sorted(history.items()) == series, tag
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # Starting a finished run again (a study killed before it recorded the run) changes none of its logs.
    logs = {n: (tmp_path / "a" / n).read_text() for n in ("log.csv", "epochs.csv", "val.csv")}
    assert train(corpus200, tmp_path / "a", cfg, cache_dir=cache, progress=False)["finished"]
    assert logs == {n: (tmp_path / "a" / n).read_text() for n in logs}
    # Training moved the weights.
    init = torch.load(tmp_path / "a" / "checkpoints" / "init.pt", weights_only=False)["model"]
    assert not torch.equal(init["encode_image.i3_resnet.conv1.weight"], wa["encode_image.i3_resnet.conv1.weight"])


@pytest.mark.parametrize("select", ["macro_f1", "macro_auroc"])
def test_best_checkpoint_is_the_best_validation_step_by_train_select(corpus200, cache, tmp_path, select):
    import csv

    cfg = TrainConfig.load("cpu-tiny", [*SMALL, "train.eval_every=1", f"train.select={select}"])
    summary = train(corpus200, tmp_path / "r", cfg, cache_dir=cache, progress=False)
    with open(tmp_path / "r" / "val.csv", newline="") as fh:
        rows = [(int(r["step"]), float(r[select])) for r in csv.DictReader(fh)]
    assert len(rows) == 6
    step, value = max(rows, key=lambda r: (r[1], -r[0]))  # the first step at the best value
    best = torch.load(tmp_path / "r" / "checkpoints" / "best.pt", weights_only=False)
    assert summary["best"]["step"] == best["step"] == step
    assert best["val"] == pytest.approx(value, abs=1e-5)


def test_mlflow_asked_for_but_not_installed_is_refused(corpus200, cache, tmp_path, monkeypatch):
    import sys

    from training.config import ConfigError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI is set .* MLflow is not installed"):
        train(corpus200, tmp_path / "r", TrainConfig.load("cpu-tiny", SMALL), cache_dir=cache, progress=False)


def test_train_select_refuses_an_unknown_metric():
    with pytest.raises(ValueError, match="train.select 'loss'"):
        TrainConfig.load("cpu-tiny", ["train.select=loss"])


def test_a_different_config_does_not_resume(corpus200, cache, tmp_path):
    cfg = TrainConfig.load("cpu-tiny", SMALL)
    train(corpus200, tmp_path / "r", cfg, cache_dir=cache, stop_after=1, progress=False)
    other = TrainConfig.load("cpu-tiny", [*SMALL, "optim.lr=0.1"])
    with pytest.raises(ValueError, match="different config"):
        train(corpus200, tmp_path / "r", other, cache_dir=cache, progress=False)


def test_wrong_data_format(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "volumes.txt").write_text("x")
    with pytest.raises(DataError, match="no reports_final.csv or reports_final.xlsx"):
        train(tmp_path / "data", tmp_path / "run", TrainConfig.load("cpu-tiny", SMALL), progress=False)


def test_train_command_refusals(corpus200, tmp_path):
    """A bad preset or override is one line and exit 2. (The train and evaluate commands themselves run in
    tests/e2e/test_readme.py, as the README's quick start.)"""
    cmd = [sys.executable, "-m", "training.cli"]
    p = subprocess.run(
        [*cmd, "train", "--data", str(corpus200), "--out", str(tmp_path / "x"), "--preset", "nope"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "preset 'nope' does not exist" in p.stderr
    p = subprocess.run(
        [*cmd, "train", "--data", str(corpus200), "--out", str(tmp_path / "x"), "sampler.ratio=abc"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "does not parse" in p.stderr


@pytest.mark.parametrize(
    "loss,match",
    [
        ("sigmoid", "joint.match=sentences"),
        ("infonce", "joint.match=sentences"),
        ("infonce", "joint.sentence_weight=0.5"),
    ],
)
def test_sentence_level_loss_trains_and_resumes_exactly(corpus200, cache, tmp_path, loss, match):
    cfg = TrainConfig.load("cpu-tiny", [*SMALL, "train.steps=4", match, f"joint.loss={loss}"])
    a = train(corpus200, tmp_path / "a", cfg, cache_dir=cache, progress=False)
    train(corpus200, tmp_path / "b", cfg, cache_dir=cache, stop_after=2, progress=False)
    assert train(corpus200, tmp_path / "b", cfg, cache_dir=cache, progress=False)["finished"] and a["finished"]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    init = torch.load(tmp_path / "a" / "checkpoints" / "init.pt", weights_only=False)["model"]
    # the sigmoid loss learns its bias; the softmax form has none (the state dict keeps Merlin's keys)
    assert ("logit_bias" in wa) == (loss == "sigmoid")
    if loss == "sigmoid":
        assert wa["logit_bias"] != init["logit_bias"] == cfg.joint.init_logit_bias
    losses = [float(r.split(",")[3]) for r in (tmp_path / "a" / "log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 4 and all(v == v and v > 0 for v in losses)  # finite, positive


def test_sigmoid_needs_sentence_match():
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="joint.match=sentences or joint.sentence_weight"):
        TrainConfig.load("cpu-tiny", ["joint.loss=sigmoid"])


def _corrupted_release(corpus, out):
    """A copy of the corpus with one bad row of each kind and one unreadable image (the images linked one
    by one, the corrupted one written anew: the shared corpus is never touched)."""
    import csv
    import shutil

    out.mkdir()
    for name in ("reports_final.csv", "zero_shot_findings_disease_cls.csv"):
        shutil.copy(corpus / name, out / name)
    (out / "merlin_data").mkdir()
    for f in (corpus / "merlin_data").iterdir():
        (out / "merlin_data" / f.name).symlink_to(f)
    with open(out / "reports_final.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    train_rows = [i for i, r in enumerate(rows) if i and r[2] == "train"]
    bad = {}
    i = train_rows[0]
    rows[i][1] = "  "
    bad[rows[i][0]] = "empty report"
    i = train_rows[1]
    rows[i][1] = "IMPRESSION: 1. No acute abnormality."
    bad[rows[i][0]] = "no 'FINDINGS:' section"
    i = train_rows[2]
    rows[i][0] = "SYnotthere"
    bad["SYnotthere"] = "does not exist"
    junk = rows[train_rows[3]][0]
    (out / "merlin_data" / f"{junk}.nii.gz").unlink()
    (out / "merlin_data" / f"{junk}.nii.gz").write_bytes(b"not a NIfTI volume")
    bad[junk] = "cannot be read"
    with open(out / "reports_final.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    with open(out / "zero_shot_findings_disease_cls.csv", newline="", encoding="utf-8") as fh:
        labels = list(csv.reader(fh))
    j = next(k for k, r in enumerate(labels) if k and r[0] == rows[train_rows[4]][0])
    labels[j][3] = ""
    bad[labels[j][0]] = "label"
    with open(out / "zero_shot_findings_disease_cls.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(labels)
    return bad


@pytest.mark.merlin_scale  # make test-merlin-scale (CI): real releases are messy
def test_a_messy_release_trains_on_its_good_studies_and_reports_the_rest(corpus200, tmp_path):
    """One unreadable NIfTI, an empty or unparseable report, a missing image or a blank label refused the
    whole release: each is now left out with its reason in RUN/data_report.json; --strict refuses as before."""
    import json

    data = tmp_path / "messy"
    bad = _corrupted_release(corpus200, data)
    cfg = TrainConfig.load("cpu-tiny", [*SMALL, "train.steps=2", "train.eval_every=2"])
    summary = train(data, tmp_path / "run", cfg, cache_dir=tmp_path / "cache", progress=False)
    assert summary["finished"]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["skipped"] == len(bad) == 5
    got = {r["study"]: r["reason"] for r in report["rows"]}
    for sid, reason in bad.items():
        assert reason in got[sid], (sid, got.get(sid))
    assert set(report["per_file"]) >= {
        str(data / "reports_final.csv"),
        str(data / "zero_shot_findings_disease_cls.csv"),
    }
    from training.data import load_studies

    all_train = sum(s.split == "train" for s in load_studies(corpus200))
    assert summary["train_studies"] == all_train - 5  # the 4 bad train rows and the unreadable image

    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "train", "--data", str(data), "--out", str(tmp_path / "strict"),
         "--preset", "cpu-tiny", "--cache", str(tmp_path / "cache"), "--strict", "--quiet", *SMALL],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and "is ''; expected 1, 0 or -1" in proc.stderr  # the first bad row read
