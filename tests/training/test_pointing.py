"""The pointing game (ct-zeroshot-train pointing) on a small corpus written with lesion masks."""

import json
import subprocess
import sys

import pytest

from operators.contract.volume import load_nifti
from training.pointing import BODY_HU, PointingError, pointing_game
from training.synth.corpus import SynthConfig, generate_corpus


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    out = tmp_path_factory.mktemp("pointing") / "c"
    generate_corpus(SynthConfig(out=str(out), studies=16, seed=31, profile="tiny", workers=1), progress=False)
    return out


def test_the_pointing_game_scores_maps_against_the_lesion_masks(masked, tiny_package, tmp_path):
    out = tmp_path / "pointing.json"
    cmd = [sys.executable, "-m", "training.cli", "pointing", "--package", str(tiny_package["pkg"])]
    proc = subprocess.run(
        [*cmd, "--data", str(masked), "--split", "all", "--out", str(out), "--quiet"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pointing game" in proc.stdout or "no focal finding" in proc.stdout
    result = json.loads(out.read_text())
    assert result["cases"] > 0 and result["split"] is None
    per = result["per_finding"]
    assert sum(v["n"] for v in per.values()) == result["cases"]
    for v in per.values():
        assert 0 <= v["hit_rate"] <= 1 and 0 <= v["mass_share"] <= 1 and 0 < v["random_rate"] < 1
        assert v["focal"] == (v["median_lesion_share"] < result["focal_share"])
    assert out.with_suffix(".md").read_text().startswith("| finding | focal |")

    # each case's random rate is the lesion's share of the body, computed here from the files
    row = result["rows"][0]
    body = load_nifti(masked / "merlin_data" / f"{row['study']}.nii.gz").array > BODY_HU
    lesion = load_nifti(masked / "lesion_masks" / row["study"] / f"{row['finding']}.nii.gz").array > 0
    assert row["random"] == pytest.approx((lesion & body).sum() / body.sum())
    again = pointing_game(tiny_package["pkg"], masked, split=None, progress=False)
    assert again["per_finding"] == per  # the same numbers in process


def test_a_corpus_without_masks_or_a_package_without_maps_is_refused(corpus200, masked, tmp_path):
    from operators.contract.package import PackageError, default_package_dir, load_package

    with pytest.raises(PointingError, match="no lesion_masks"):
        pointing_game(default_package_dir(), corpus200, progress=False)
    if load_package(default_package_dir()).image_encoder.localisation is None:
        with pytest.raises(PackageError, match="no localisation output"):
            pointing_game(default_package_dir(), masked, split=None, progress=False)
