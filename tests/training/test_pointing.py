"""The pointing game (ct-zeroshot-train pointing) on a small corpus written with lesion masks."""

import json
import subprocess
import sys

import numpy as np
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


def test_the_lesion_is_hidden_with_its_surroundings_and_the_control_site_lies_in_the_same_tissue():
    from training.lesion_occlusion import _control_site, _fill_value, _hidden

    hu = np.full((40, 40, 40), -100.0, dtype=np.float32)  # fat
    hu[5:35, 5:35, 5:35] = 60.0  # an organ
    hu[:, :, :3] = -1000.0  # air: outside the body
    lesion = np.zeros(hu.shape, dtype=bool)
    lesion[10:14, 10:14, 10:14] = True
    hu[lesion] = 0.0
    body = hu > -500
    fill = _fill_value(hu, lesion, body)
    assert fill == 60.0
    hidden = _hidden(hu, lesion, fill)
    assert (hidden[lesion] == 60.0).all() and (hidden[~lesion] == hu[~lesion]).all() and (hu[lesion] == 0).all()
    for seed in range(5):
        site = _control_site(hu, lesion, body, lesion, fill, np.random.default_rng(seed))
        assert site is not None and site.sum() == lesion.sum() and not (site & lesion).any()
        assert (hu[site] == 60.0).all()  # in the organ, not the fat around it
    tiny_organ = np.where(lesion, 0.0, -100.0).astype(np.float32)  # the lesion fills its organ: nowhere to go
    assert _control_site(tiny_organ, lesion, tiny_organ > -500, lesion, 60.0, np.random.default_rng(0)) is None


def test_lesion_site_occlusion_scores_each_focal_case_three_times(masked, tmp_path):
    from operators.contract.package import default_package_dir
    from training.lesion_occlusion import lesion_occlusion

    out = tmp_path / "lo.json"
    cmd = [sys.executable, "-m", "training.cli", "lesion-occlusion", "--package", str(default_package_dir())]
    proc = subprocess.run(
        [*cmd, "--data", str(masked), "--split", "all", "--out", str(out), "--quiet"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lesion-site occlusion" in proc.stdout or "no focal finding" in proc.stdout
    result = json.loads(out.read_text())
    assert result["cases"] == len(result["rows"]) > 0
    for r in result["rows"]:
        assert 0 < r["lesion_share"] < result["focal_share"]
        assert all(0 <= r[k] <= 1 for k in ("p", "p_lesion_hidden", "p_control"))
    for fid, v in result["per_finding"].items():
        sel = [r for r in result["rows"] if r["finding"] == fid]
        assert v["n"] == len(sel)
        if sel:
            effect = np.mean([r["p_control"] - r["p_lesion_hidden"] for r in sel]) * 100
            assert v["lesion_effect"] == pytest.approx(effect)
    assert out.with_suffix(".md").read_text().startswith("| finding | cases |")
    again = lesion_occlusion(default_package_dir(), masked, split=None, progress=False)
    assert again["rows"] == result["rows"]  # the control sites are a function of the seed
    with pytest.raises(PointingError, match="no lesion_masks"):
        lesion_occlusion(default_package_dir(), tmp_path, progress=False)


def test_the_occlusion_search_finds_the_patch_a_score_depends_on():
    from training.pointing import OCCLUSION_LEVELS, occlusion_peaks

    rng = np.random.default_rng(3)
    x = rng.uniform(0.3, 0.5, size=(1, 40, 36, 30)).astype(np.float32)
    lesions = [(slice(9, 12), slice(20, 23), slice(5, 8)), (slice(30, 33), slice(4, 7), slice(22, 25))]
    for sl in lesions:
        x[0][sl] = 1.0  # a bright spot the occluder's blur takes away

    def margins(batch):  # finding j reads the contrast of lesion j only
        return np.array([[(b[0][sl] - 0.4).sum() for sl in lesions] for b in batch])

    peaks = occlusion_peaks(margins, x, [0, 1])
    finest = OCCLUSION_LEVELS[-1][0]
    for j, sl in enumerate(lesions):
        centre = np.array([(s.start + s.stop - 1) / 2 for s in sl])
        assert np.abs(peaks[j] - centre).max() <= finest / 2, (j, peaks[j], centre)
    assert occlusion_peaks(margins, x, []) == {}


def test_the_pointing_game_by_occlusion_needs_no_localisation_output(masked, tmp_path):
    from operators.contract.package import default_package_dir

    out = tmp_path / "occ.json"
    cmd = [sys.executable, "-m", "training.cli", "pointing", "--package", str(default_package_dir())]
    proc = subprocess.run(
        [*cmd, "--data", str(masked), "--split", "all", "--limit", "2", "--method", "occlusion", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["method"] == "occlusion" and result["cases"] == len(result["rows"]) > 0
    assert all(r["mass"] is None and isinstance(r["hit"], bool) for r in result["rows"])
    assert all(v["mass_share"] is None for v in result["per_finding"].values())
    assert "| - |" in out.with_suffix(".md").read_text()
    with pytest.raises(PointingError, match="unknown method"):
        pointing_game(default_package_dir(), masked, split=None, method="saliency", progress=False)
