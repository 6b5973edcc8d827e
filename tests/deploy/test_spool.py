"""The listener's spool: UIDs from a sender never name a path outside it."""

import pydicom
import pytest

from operators.listener.spool import Spool, SpoolError
from tests.dicom_cases import small_study


@pytest.fixture
def instance(tmp_path):
    path = small_study(tmp_path, "study")[0]
    return pydicom.dcmread(path), path.read_bytes()


@pytest.mark.parametrize(
    "study, sop",
    [
        ("../../../../tmp/x", "1.2.3"),
        ("1.2.3", "../../escape"),
        ("", "1.2.3"),
        ("1.2.3", "1.2.3/4"),
        ("01.2", "1.2"),
        ("1." + "2" * 70, "1.2"),
    ],
)
def test_a_uid_that_is_not_a_uid_is_refused_and_nothing_is_written(tmp_path, instance, study, sop):
    spool = Spool(tmp_path / "spool")
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(SpoolError, match="is not a valid DICOM UID"):
        spool.store(instance[1], study, sop)
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_an_instance_moves_through_the_stages(tmp_path, instance):
    spool = Spool(tmp_path / "spool")
    ds, data = instance
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    spool.store(data, study, sop)
    assert spool.studies("incoming") == [study]
    ready, reopened = spool.complete(study)
    assert (
        not reopened and (ready / f"{sop}.dcm").read_bytes() == data and spool.studies("incoming") == []
    )  # as received
    assert spool.attempts(study) == 0 and spool.attempts(study, add=1) == 1 and spool.attempts(study) == 1
    failed = spool.finish(study, "no CT series")
    assert (failed / "reason.txt").read_text() == "no CT series\n" and (failed / f"{sop}.dcm").is_file()


def test_a_study_that_receives_more_after_it_finished_is_reopened_with_everything(tmp_path):
    """Nothing received is deleted: the earlier part comes back from done/ (or failed/) into ready/."""
    spool = Spool(tmp_path / "spool")
    files = small_study(tmp_path, "parts", n=6)
    ds = [pydicom.dcmread(p) for p in files]
    study = str(ds[0].StudyInstanceUID)
    for d, p in zip(ds[:4], files[:4]):
        spool.store(p.read_bytes(), study, str(d.SOPInstanceUID))
    spool.complete(study)
    spool.finish(study)  # the first part: processed, its SR delivered
    for d, p in zip(ds[4:], files[4:]):
        spool.store(p.read_bytes(), study, str(d.SOPInstanceUID))
    ready, reopened = spool.complete(study)
    assert reopened and sorted(f.name for f in ready.iterdir()) == sorted(f"{d.SOPInstanceUID}.dcm" for d in ds)
    assert spool.studies("done") == [] and spool.studies("incoming") == []
    digest = spool.instances_digest(study)
    assert digest.endswith("/6")
    spool.finish(study, "no CT series")  # a failed study re-opens too, without its old reason
    spool.store(files[0].read_bytes(), study, str(ds[0].SOPInstanceUID))  # sent again: replaces its copy
    ready, reopened = spool.complete(study)
    assert reopened and not (ready / "reason.txt").exists() and spool.instances_digest(study) == digest
    spool.set_sr_state(study, {"instances": digest, "sop": "1.2.3"})
    assert spool.sr_state(study) == {"instances": digest, "sop": "1.2.3"}


def test_a_purged_study_keeps_only_its_record(tmp_path):
    """After retention, a delivered study's instances and SR files go; sr.json (UIDs, times) stays."""
    spool = Spool(tmp_path / "spool")
    files = small_study(tmp_path, "purge", n=3)
    ds = [pydicom.dcmread(p) for p in files]
    study = str(ds[0].StudyInstanceUID)
    for d, p in zip(ds, files):
        spool.store(p.read_bytes(), study, str(d.SOPInstanceUID))
    spool.complete(study)
    covered = spool.instance_uids(study)
    assert covered == sorted(str(d.SOPInstanceUID) for d in ds)
    out = spool.path("out", study)
    (out / "superseded").mkdir(parents=True)
    (out / "superseded" / "1.2.3.dcm").write_bytes(b"old SR")
    (out / f"SR_{study}.dcm").write_bytes(b"SR")
    spool.set_sr_state(study, {"sop": "1.2.4", "covered": covered, "delivered_at": 1.0})
    spool.finish(study)
    spool.purge(study, 2.0)
    assert spool.studies("done") == [] and [f.name for f in out.iterdir()] == ["sr.json"]
    assert spool.sr_state(study) == {"sop": "1.2.4", "covered": covered, "delivered_at": 1.0, "purged": 2.0}
    spool.purge(study, 3.0)  # again (a crash half-way through the first): harmless
    assert spool.sr_state(study)["purged"] == 3.0


def test_other_bytes_under_a_held_sop_uid_are_refused(tmp_path):
    from operators.listener.spool import InstanceConflict

    spool = Spool(tmp_path / "spool")
    spool.store(b"first", "1.2.3", "1.2.3.4")
    spool.store(b"first", "1.2.3", "1.2.3.4")  # a retry of the same instance
    spool.complete("1.2.3")
    with pytest.raises(InstanceConflict, match="instance 1.2.3.4 was received before with other content"):
        spool.store(b"second", "1.2.3", "1.2.3.4")
    assert (spool.path("ready", "1.2.3") / "1.2.3.4.dcm").read_bytes() == b"first"
