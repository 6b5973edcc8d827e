import csv
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from operators.contract.findings import load_catalogue
from tests.conftest import have
from training.synth.corpus import SynthConfig, generate_corpus
from training.synth.patient import sample_patient
from training.synth.phantom import T, build_phantom
from training.synth.raster import Grid

IDS = load_catalogue().ids


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_merlin_release_layout(corpus200):
    reports = _rows(corpus200 / "reports_final.csv")
    assert len(reports) == 200
    assert list(reports[0]) == ["study id", "Findings", "Split", "Few Shot"]
    assert {r["Split"] for r in reports} == {"train", "validation", "test"}
    for r in reports:
        assert r["Findings"].startswith("FINDINGS:") and "IMPRESSION:" in r["Findings"]
        assert (corpus200 / "merlin_data" / f"{r['study id']}.nii.gz").exists()
        assert (corpus200 / "dicom" / r["study id"]).is_dir()
    assert (corpus200 / "reports_final.xlsx").exists()
    labels = _rows(corpus200 / "zero_shot_findings_disease_cls.csv")
    assert list(labels[0]) == ["study id", *IDS]
    assert [r["study id"] for r in labels] == [r["study id"] for r in reports]
    for fid in IDS:
        values = {int(r[fid]) for r in labels}
        assert values == {1, 0, -1}, f"{fid} has label values {values}"
    for name in ("prevalence.csv", "prevalence.md", "montage.png", "ground_truth.jsonl", "corpus.json"):
        assert (corpus200 / name).exists(), name
    assert not list(corpus200.rglob(".*tmp*"))


def test_prevalence_is_realistic(corpus200):
    truth = [json.loads(line) for line in (corpus200 / "ground_truth.jsonl").read_text().splitlines()]
    normal = np.mean([t["normal"] for t in truth])
    assert 0.1 <= normal <= 0.32
    prev = {fid: np.mean([fid in t["findings"] for t in truth]) for fid in IDS}
    assert max(prev.values()) <= 0.35
    assert min(prev.values()) >= 0.01
    # Labels follow the report: a positive label always means the phantom has the finding.
    labels = _rows(corpus200 / "zero_shot_findings_disease_cls.csv")
    for t, row in zip(truth, labels):
        for fid in IDS:
            if row[fid] == "1":
                assert fid in t["findings"]
            if row[fid] == "0":
                assert fid not in t["findings"]


def test_nifti_geometry(corpus200):
    sid = _rows(corpus200 / "reports_final.csv")[0]["study id"]
    img = nib.load(corpus200 / "merlin_data" / f"{sid}.nii.gz")
    assert img.ndim == 3 and img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    zooms = img.header.get_zooms()
    assert 4.5 <= zooms[0] <= 5.5 and zooms[2] in (5.0, 6.0)
    data = np.asarray(img.dataobj)
    assert data.min() >= -1024 and data.max() > 500  # air and bone present


def _dciodvfy(path: Path) -> tuple[Path, int, str]:
    p = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return path, p.returncode, p.stdout + p.stderr


@pytest.mark.skipif(not have("dciodvfy"), reason="dicom3tools not installed")
def test_every_series_passes_dciodvfy(corpus200):
    series = sorted(d for d in (corpus200 / "dicom").iterdir() if d.is_dir())
    assert len(series) == 200
    files = []
    for d in series:  # one writer writes every slice: the first, middle and last of each series
        slices = sorted(d.glob("*.dcm"))
        assert len(slices) > 40, d
        files += [slices[0], slices[len(slices) // 2], slices[-1]]
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(_dciodvfy, files))
    bad = [(p, out) for p, rc, out in results if rc != 0 or "Error" in out]
    assert not bad, f"{len(bad)} files fail dciodvfy, first {bad[0][0]}:\n{bad[0][1]}"


def test_dicom_series_attributes(corpus200):
    truth = {
        json.loads(x)["study id"]: json.loads(x) for x in (corpus200 / "ground_truth.jsonl").read_text().splitlines()
    }
    positions = {"HFS": 0, "FFS": 0}
    for sid in list(truth)[:30]:
        files = sorted((corpus200 / "dicom" / sid).glob("*.dcm"))
        ds = pydicom.dcmread(files[0])
        assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert list(ds.ImageType)[:2] == ["ORIGINAL", "PRIMARY"]
        assert ds.PatientPosition == truth[sid]["position"]
        assert ds.PatientName.family_name == "SYNTHETIC"
        assert len(files) == truth[sid]["shape"][2]
        positions[ds.PatientPosition] += 1
        iop = [float(v) for v in ds.ImageOrientationPatient]
        assert iop == ([1, 0, 0, 0, 1, 0] if ds.PatientPosition == "HFS" else [-1, 0, 0, 0, 1, 0])
        uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
        assert len(uids) == len(files)
    assert positions["HFS"] > positions["FFS"] > 0


def test_deterministic_and_independent_of_workers(tmp_path):
    a = generate_corpus(SynthConfig(out=str(tmp_path / "a"), studies=6, seed=3, workers=1), progress=False)
    b = generate_corpus(SynthConfig(out=str(tmp_path / "b"), studies=6, seed=3, workers=2), progress=False)
    assert a["studies"] == b["studies"] == 6
    for name in ("reports_final.csv", "zero_shot_findings_disease_cls.csv", "ground_truth.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for f in (tmp_path / "a" / "merlin_data").glob("*.nii.gz"):
        va = np.asarray(nib.load(f).dataobj)
        vb = np.asarray(nib.load(tmp_path / "b" / "merlin_data" / f.name).dataobj)
        assert np.array_equal(va, vb)
    c = generate_corpus(SynthConfig(out=str(tmp_path / "c"), studies=6, seed=4), progress=False)
    assert (
        c and (tmp_path / "c" / "reports_final.csv").read_bytes() != (tmp_path / "a" / "reports_final.csv").read_bytes()
    )


def test_refuses_existing_corpus(corpus200):
    with pytest.raises(FileExistsError, match="already holds a corpus"):
        generate_corpus(SynthConfig(out=str(corpus200), studies=1), progress=False)


def _count(lab, *tissues):
    return int(np.isin(lab, [int(t) for t in tissues]).sum())


# What each finding must change in the phantom: (tissue or check, minimum ratio or "new").
SIGNATURES = {
    "submucosal_edema": ("new", T.EDEMA_WALL),
    "renal_hypodensities": ("new", T.HYPODENSITY),
    "aortic_valve_calcification": ("new", T.CALCIUM),
    "coronary_calcification": ("new", T.CALCIUM),
    "atherosclerosis": ("new", T.CALCIUM),
    "thrombosis": ("new", T.THROMBUS),
    "metastatic_disease": ("new", T.METASTASIS),
    "renal_cyst": ("new", T.CYST),
    "atelectasis": ("new", T.ATELECTASIS),
    "anasarca": ("new", T.SUBQ_EDEMA),
    "biliary_ductal_dilation": ("new", T.BILE),
    "appendicitis": ("new", T.STRANDING),
    "gallstones": ("new", T.STONE),
    "free_air": ("new", T.FREE_AIR),
    "fracture": ("new", T.SCLEROSIS),
    "abdominal_aortic_aneurysm": ("new", T.THROMBUS),
    "surgically_absent_gallbladder": ("new", T.METAL),
    "pancreatic_atrophy": ("shrinks", T.PANCREAS),
    "splenomegaly": ("grows", T.SPLEEN),
    "hepatomegaly": ("grows", T.LIVER),
    "cardiomegaly": ("grows", T.MYOCARDIUM),
    "prostatomegaly": ("grows", T.PROSTATE),
    "lymphadenopathy": ("grows", T.NODE),
    "hydronephrosis": ("grows", T.URINE),
    "bowel_obstruction": ("grows", T.BOWEL_FLUID),
    "ascites": ("grows", T.FLUID),
    "pleural_effusion": ("grows", T.FLUID),
    "hiatal_hernia": ("site", None),
    "hepatic_steatosis": ("hu_drops", T.LIVER),
    "osteopenia": ("hu_drops", T.TRABECULAR_BONE),
}


def test_signature_table_covers_catalogue():
    assert set(SIGNATURES) == set(IDS)


GRID = Grid((80, 80, 60), (5.0, 5.0, 6.0), (-197.5, -185.5, 0.0))


def _pair(fid: str, version: int, severity: str = "moderate"):
    """The same patient without and with one finding, painted at the tiny profile's 5 mm voxels."""
    from training.synth.patient import FindingInstance

    base = sample_patient(np.random.default_rng(11), 0)
    base.findings, base.sex = {}, "M"
    sick = sample_patient(np.random.default_rng(11), 0)
    sick.findings, sick.sex = {fid: FindingInstance(fid, severity=severity, side="bilateral")}, "M"
    hu0, lab0 = build_phantom(base, GRID, np.random.default_rng(5), version=version)
    hu1, lab1 = build_phantom(sick, GRID, np.random.default_rng(5), version=version)
    return sick, (hu0, lab0), (hu1, lab1)


@pytest.mark.parametrize("version", [1, 3, 4])
@pytest.mark.parametrize("fid", IDS)
def test_every_finding_has_a_visible_signature(fid, version):
    """The same patient with and without the finding differs where the finding lives."""
    grid = GRID
    sick, (hu0, lab0), (hu1, lab1) = _pair(fid, version)
    kind, tissue = SIGNATURES[fid]
    if kind == "new":
        assert _count(lab1, tissue) >= 1 and _count(lab0, tissue) == 0
    elif kind == "grows":
        assert _count(lab1, tissue) > 1.2 * _count(lab0, tissue) + 3
    elif kind == "shrinks":
        assert _count(lab1, tissue) < 0.7 * _count(lab0, tissue)
    elif kind == "hu_drops":
        assert hu1[lab1 == tissue].mean() < hu0[lab0 == tissue].mean() - 40
    site = sick.findings[fid].site
    assert site is not None
    if kind == "site":  # hiatal hernia: bowel content above the diaphragm, where the lungs are
        idx = [int(round((site[a] - grid.origin[a]) / grid.spacing[a])) for a in range(3)]
        assert lab1[tuple(idx)] in (T.BOWEL_FLUID, T.BOWEL_AIR, T.BOWEL_WALL)
        assert lab0[tuple(idx)] not in (T.BOWEL_FLUID, T.BOWEL_AIR, T.BOWEL_WALL)


# Version 3's promise (docs/corpus.md): the focal findings that version 2 left below
# 0.70 with the labels span several 5 mm voxels even when mild.
V3_FOCAL = {
    "renal_hypodensities": (T.HYPODENSITY, 30),
    "renal_cyst": (T.CYST, 60),
    "coronary_calcification": (T.CALCIUM, 8),
    "aortic_valve_calcification": (T.CALCIUM, 8),
    "thrombosis": (T.THROMBUS, 150),
    "free_air": (T.FREE_AIR, 15),
    "lymphadenopathy": (T.NODE, 150),
    "appendicitis": (T.STRANDING, 600),
}


@pytest.mark.parametrize("fid", sorted(V3_FOCAL))
def test_version_3_focal_findings_span_several_voxels(fid):
    tissue, least = V3_FOCAL[fid]
    grown = []
    for version in (2, 3):
        _, (_, lab0), (_, lab1) = _pair(fid, version, severity="mild")
        grown.append(_count(lab1, tissue) - _count(lab0, tissue))
    assert grown[1] >= least, f"{fid}: {grown[1]} voxels at version 3"
    assert grown[1] > grown[0], f"{fid}: version 3 ({grown[1]}) not larger than version 2 ({grown[0]})"


def test_version_3_keeps_the_patients_and_reports(tmp_path):
    """Only the painting changes between versions: the truth tables and the reports are identical."""
    rows = {}
    for version in (2, 3):
        out = tmp_path / f"v{version}"
        generate_corpus(SynthConfig(out=str(out), studies=6, seed=3, workers=1, version=version), progress=False)
        rows[version] = (_rows(out / "reports_final.csv"), (out / "zero_shot_findings_disease_cls.csv").read_bytes())
    assert rows[2] == rows[3]


def test_version_4_keeps_the_patients_and_reports_and_varies_anatomy_and_scanner(tmp_path):
    """Version 4 paints other phantoms of the same patients: the reports and labels are version 3's; the
    anatomy, habitus and scanner spread as in patients and scanners (docs/corpus.md)."""
    import json

    from training.synth.patient import vary_anatomy

    rows, truth = {}, {}
    for version in (3, 4):
        out = tmp_path / f"v{version}"
        generate_corpus(SynthConfig(out=str(out), studies=6, seed=3, workers=1, version=version), progress=False)
        rows[version] = (_rows(out / "reports_final.csv"), (out / "zero_shot_findings_disease_cls.csv").read_bytes())
        truth[version] = [json.loads(line) for line in (out / "ground_truth.jsonl").read_text().splitlines()]
    assert rows[3] == rows[4]
    assert all("scanner" in r for r in truth[4]) and not any("scanner" in r for r in truth[3])
    noise = [r["scanner"]["noise_sd_hu"] for r in truth[4]]
    assert min(noise) >= 3.0 and max(noise) <= 14.0 and len(set(noise)) >= 4
    # the spread over 400 patients: organ scale +-25 %, positions sd 15 mm, habitus wider
    bodies = []
    for i in range(400):
        p = sample_patient(np.random.default_rng([9, i]), i)
        vary_anatomy(p)
        bodies.append(p.body)
    scale = np.array([b["organ_scale"] for b in bodies])
    assert 0.75 <= scale.min() < 0.8 and 1.2 < scale.max() <= 1.25
    assert 12 < np.std([b["jitter_x"] for b in bodies]) < 18
    width = np.array([b["half_width"] for b in bodies])
    assert width.min() < 118 and width.max() > 182


def test_version_4_paints_lesions_at_the_size_the_report_states():
    from training.synth.patient import FindingInstance

    base = sample_patient(np.random.default_rng(11), 0)
    base.findings, base.sex = {}, "M"
    _, lab0 = build_phantom(base, GRID, np.random.default_rng(5), version=4)
    counts = {}
    for mm in (20, 50):
        sick = sample_patient(np.random.default_rng(11), 0)
        f = FindingInstance("renal_cyst", severity="moderate", side="left")
        f.details["report_mm"] = mm
        sick.findings, sick.sex = {"renal_cyst": f}, "M"
        _, lab1 = build_phantom(sick, GRID, np.random.default_rng(5), version=4)
        counts[mm] = _count(lab1, T.CYST) - _count(lab0, T.CYST)
    # a sphere of the stated diameter, in 5 x 5 x 6 mm voxels (clipped to the kidney and its fat)
    assert counts[50] > 5 * counts[20] and 0.3 < counts[20] / (4 / 3 * np.pi * 10**3 / 150) < 2.0
    # subcentimeter renal hypodensities: each under 10 mm across, a few voxels, not version 3's 2 cm
    small = {}
    for version in (3, 4):
        _, (_, l0), (_, l1) = _pair("renal_hypodensities", version, severity="severe")
        small[version] = _count(l1, T.HYPODENSITY) - _count(l0, T.HYPODENSITY)
    assert small[4] < small[3] / 3


def test_lesion_masks_show_where_each_finding_is_and_change_nothing_else(corpus200, tmp_path):
    """Each present finding's mask (what its painting left visible), as NIfTI on the volume's grid and as a
    DICOM Segmentation of the study's series: the same voxels, in the series' frame of reference. The
    phantoms are the same with and without masks (recording draws nothing from the generator)."""
    import highdicom as hd
    from scipy.spatial import cKDTree

    masked_corpus = tmp_path / "masked"
    config = SynthConfig(out=str(masked_corpus), studies=12, seed=0, profile="tiny", dicom=True, workers=1)
    generate_corpus(config, progress=False)

    truth = [json.loads(line) for line in (masked_corpus / "ground_truth.jsonl").read_text().splitlines()]
    present = sum(len(r["findings"]) for r in truth)
    masked = 0
    for r in truth:
        folder = masked_corpus / "lesion_masks" / r["study id"]
        found = {p.name.removesuffix(".nii.gz") for p in folder.glob("*.nii.gz")} if folder.exists() else set()
        assert found <= set(r["findings"]), r["study id"]  # never a mask for an absent finding
        masked += len(found)
    assert masked >= 0.95 * present  # a finding whose painting was covered entirely has none

    # the same voxels in the SEG as in the NIfTI masks, for a head-first and a feet-first study
    by_display = {f.display[:64]: f.id for f in load_catalogue()}
    for position in ("HFS", "FFS"):
        r = next(r for r in truth if r["position"] == position and r["findings"] and
                 (masked_corpus / "dicom_seg" / f"{r['study id']}.dcm").exists())  # fmt: skip
        seg_path = masked_corpus / "dicom_seg" / f"{r['study id']}.dcm"
        if have("dciodvfy"):
            out = subprocess.run(["dciodvfy", str(seg_path)], capture_output=True, text=True)
            assert "Error" not in out.stdout + out.stderr, out.stderr[-2000:]
        seg = hd.seg.segread(seg_path)
        series = {pydicom.dcmread(p, stop_before_pixels=True).FrameOfReferenceUID
                  for p in (masked_corpus / "dicom" / r["study id"]).glob("*.dcm")}  # fmt: skip
        assert series == {seg.FrameOfReferenceUID}
        labels = [by_display[d.SegmentLabel] for d in seg.SegmentSequence]
        assert labels == [
            f for f in load_catalogue().ids if (masked_corpus / "lesion_masks" / r["study id"] / f"{f}.nii.gz").exists()
        ]
        for d, fid in zip(seg.SegmentSequence, labels):
            vol = seg.get_volume(segment_numbers=[d.SegmentNumber], combine_segments=True)
            ijk = np.argwhere(vol.array > 0)
            in_seg = (vol.affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
            img = nib.load(masked_corpus / "lesion_masks" / r["study id"] / f"{fid}.nii.gz")
            ijk = np.argwhere(np.asarray(img.dataobj) > 0)
            in_nifti = (img.affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3] * [-1, -1, 1]  # RAS -> LPS
            assert len(in_seg) == len(in_nifti) > 0, fid
            assert cKDTree(in_nifti).query(in_seg)[0].max() < 0.01, fid  # mm

    assert not (corpus200 / "lesion_masks").exists()  # generated with masks=False
    for p in (masked_corpus / "merlin_data").glob("*.nii.gz"):
        assert np.array_equal(
            np.asarray(nib.load(p).dataobj), np.asarray(nib.load(corpus200 / "merlin_data" / p.name).dataobj)
        )
