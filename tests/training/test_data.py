import csv

import nibabel as nib
import numpy as np
import pytest

from operators.contract.volume import VolumeError, load_nifti
from training.data import DataError, load_studies, load_volume, read_manifest, read_merlin_release


def test_reads_the_synthetic_release(corpus200):
    studies = read_merlin_release(corpus200)
    assert len(studies) == 200
    assert {s.split for s in studies} == {"train", "validation", "test"}
    s = studies[0]
    assert s.labels is not None and s.labels.shape == (30,) and set(np.unique(s.labels)) <= {-1, 0, 1}
    assert s.sections and set(s.section_status.values()) <= {"normal", "abnormal"}
    assert "IMPRESSION" not in s.findings_text
    all_labels = np.stack([x.labels for x in studies])
    assert ((all_labels == 1).sum(0) > 0).all() and ((all_labels == -1).sum(0) > 0).all()
    assert load_volume(s).array.ndim == 3


def test_xlsx_is_read_when_no_csv(corpus200, tmp_path):
    import shutil

    shutil.copy(corpus200 / "reports_final.xlsx", tmp_path / "reports_final.xlsx")
    (tmp_path / "merlin_data").symlink_to(corpus200 / "merlin_data")
    studies = read_merlin_release(tmp_path)
    assert len(studies) == 200 and studies[0].labels is None


def _rewrite(path, mutate):
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    rows = mutate(rows)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)


def test_missing_reports_file(tmp_path):
    with pytest.raises(DataError, match="no reports_final.csv or reports_final.xlsx"):
        read_merlin_release(tmp_path)


def test_missing_column(corpus_copy):
    _rewrite(corpus_copy / "reports_final.csv", lambda rows: [[c for i, c in enumerate(r) if i != 2] for r in rows])
    with pytest.raises(DataError, match=r"reports_final.csv: missing column\(s\) \['Split'\]"):
        read_merlin_release(corpus_copy)


def test_malformed_csv(corpus_copy):
    path = corpus_copy / "reports_final.csv"
    path.write_text(path.read_text() + 'SYextra,"FINDINGS: Liver: normal.",train,0,surplus\n')
    with pytest.raises(DataError, match="reports_final.csv: line .* more fields than the header"):
        read_merlin_release(corpus_copy)
    path.write_bytes(b"study id,Findings,Split\n\xff\xfe bad bytes\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_merlin_release(corpus_copy)


def test_bad_label_value(corpus_copy):
    _rewrite(
        corpus_copy / "zero_shot_findings_disease_cls.csv",
        lambda rows: [rows[0], [rows[1][0], "2", *rows[1][2:]], *rows[2:]],
    )
    with pytest.raises(DataError, match=r"zero_shot_findings_disease_cls.csv line 2: label 'submucosal_edema' is 2"):
        read_merlin_release(corpus_copy)


@pytest.mark.parametrize(
    "row,column,value,message",
    [
        (5, 1, "IMPRESSION: 1. No acute abnormality.", r"reports_final.csv line 6: .*no 'FINDINGS:' section"),
        (3, 0, "SYmissing", r"line 4: image .*SYmissing.nii.gz does not exist"),
    ],
    ids=["report-without-findings-section", "missing-nifti"],
)
def test_bad_report_row(corpus_copy, row, column, value, message):
    def mutate(rows):
        rows[row][column] = value
        return rows

    _rewrite(corpus_copy / "reports_final.csv", mutate)
    with pytest.raises(DataError, match=message):
        read_merlin_release(corpus_copy)


def test_nifti_errors(tmp_path):
    with pytest.raises(VolumeError, match="nope.nii.gz: NIfTI file does not exist"):
        load_nifti(tmp_path / "nope.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(VolumeError, match=r"flat.nii.gz: expected a 3D volume, found shape \(4, 4\)"):
        load_nifti(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.int16), np.eye(4)), tmp_path / "multi.nii.gz")
    with pytest.raises(VolumeError, match="multi.nii.gz: expected a 3D volume"):
        load_nifti(tmp_path / "multi.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(VolumeError, match="junk.nii.gz: cannot be read as NIfTI"):
        load_nifti(tmp_path / "junk.nii.gz")


def test_manifest_with_nifti_and_dicom(corpus200, tmp_path):
    studies = read_merlin_release(corpus200)[:4]
    man = tmp_path / "manifest.csv"
    with open(man, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "report", "split"])
        for i, s in enumerate(studies):
            image = corpus200 / "dicom" / s.study_id if i % 2 else s.image
            w.writerow([str(image), s.report, ["train", "val", "test", "train"][i]])
    got = load_studies(man)
    assert [g.split for g in got] == ["train", "validation", "test", "train"]
    assert [g.is_dicom for g in got] == [False, True, False, True]
    assert got[1].study_id == studies[1].study_id and got[0].labels is None
    v0, v1 = load_volume(got[0]), load_volume(got[1])
    assert v0.array.ndim == v1.array.ndim == 3


def test_manifest_errors(tmp_path):
    man = tmp_path / "m.csv"
    man.write_text("image,report\nx.nii.gz,FINDINGS: Liver: Normal.\n")
    with pytest.raises(DataError, match=r"m.csv: missing column\(s\) \['split'\]"):
        read_manifest(man)
    man.write_text("image,report,split\nx.nii.gz,FINDINGS: Liver: Normal.,train\n")
    with pytest.raises(DataError, match="m.csv line 2: image .*x.nii.gz does not exist"):
        read_manifest(man)
    man.write_text("image,report,split\nx.nii.gz,FINDINGS: Liver: Normal.,holdout\n")
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        read_manifest(man, check_images=False)
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "absent.csv")
