"""The recipe command end to end on a small corpus: stages timed, bars recorded, a loadable package."""

import json

import pytest

from operators.contract.package import load_package
from training.research.recipe import run_recipe

SMALL = [
    "train.batch_size=8",
    "train.steps=3",
    "train.eval_every=3",
    "train.eval_studies=16",
    "optim.warmup_steps=1",
    "text.vocab_size=400",
    "text.hidden=32",
    "text.layers=1",
    "text.heads=2",
    "text.max_length=64",
    "image.init=pretext",
    "pretrain.steps=2",
    "pretrain.batch_size=4",
]


@pytest.mark.long
def test_recipe_writes_times_bars_and_a_package(corpus200, tmp_path):
    result = run_recipe(tmp_path / "r", "cpu-tiny", SMALL, data=corpus200, cache_dir=tmp_path / "cache", progress=False)
    saved = json.loads((tmp_path / "r" / "recipe.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved["seconds"]) == {"pretrain_image", "train", "evaluate", "supervised_reference", "export"}
    assert (tmp_path / "r" / "pretext" / "image_init.pt").exists()
    assert 0 <= saved["test_macro_auroc"] <= 1 and 0 <= saved["supervised_macro_auroc"] <= 1
    assert set(saved["bars"]) == {
        "test_macro_auroc >= 0.85",
        "test_macro_f1_package >= 0.60",
        "minutes_total <= 30",
        "gap_to_supervised <= 0.05",
    }
    assert saved["bars"]["test_macro_auroc >= 0.85"] is False  # three steps learn nothing
    # --data named a corpus: the corpus-to-package time bar was not measured, and the record says so
    assert saved["bars"]["minutes_total <= 30"] is None and "corpus stage was skipped" in str(
        saved["bars_not_measured"]
    )
    pkg = load_package(tmp_path / "r" / "package")
    assert pkg.assessed is not None and len(pkg.assessed) == 30
    # The gap against a reference probe of the same tower, without the supervised stage (24 CPU minutes
    # at the recipe's size): the bar is recorded, with where its yardstick came from.
    ref = tmp_path / "r" / "run" / "probe.json"
    plain = [o for o in SMALL if not o.startswith(("image.init", "pretrain."))]
    again = run_recipe(
        tmp_path / "s", "cpu-tiny", plain, data=corpus200, supervised=False, reference=ref,
        cache_dir=tmp_path / "cache", progress=False,
    )  # fmt: skip
    assert "supervised_reference" not in again["seconds"] and again["supervised_reference"] == str(ref)
    assert again["gap_to_supervised"] == saved["supervised_macro_auroc"] - again["test_macro_auroc"]
    assert "gap_to_supervised <= 0.05" in again["bars"]


def test_recipe_refuses_a_reference_beside_its_own_supervised_stage_or_missing(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="--no-supervised"):
        run_recipe(tmp_path / "r", "cpu-tiny", [], data=tmp_path, reference=tmp_path / "probe.json")
    with pytest.raises(FileNotFoundError, match="probe.json"):
        run_recipe(tmp_path / "r", "cpu-tiny", [], data=tmp_path, supervised=False, reference=tmp_path / "probe.json")


def test_recipe_refuses_a_reference_of_another_tower_steps_or_corpus(corpus200, tmp_path):
    import pytest

    ref = tmp_path / "probe.json"
    meta = {"arch": "resnet152", "supervised_steps": 5, "split": "validation", "corpus": {"seed": 4}}
    ref.write_text(json.dumps({"macro_auroc": {"supervised": 0.9}, "meta": meta}))
    with pytest.raises(ValueError, match="not a reference for this recipe") as err:
        run_recipe(tmp_path / "r", "cpu-tiny", SMALL, data=corpus200, supervised=False, reference=ref)
    for part in ("image tower 'resnet152'", "5 supervised steps", "split 'validation'", "corpus {'seed': 4}"):
        assert part in str(err.value)
    assert not (tmp_path / "r" / "run").exists()  # refused before any stage ran
