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
    ready = spool.complete(study)
    assert (ready / f"{sop}.dcm").read_bytes() == data and spool.studies("incoming") == []  # as received
    assert spool.attempts(study) == 0 and spool.attempts(study, add=1) == 1 and spool.attempts(study) == 1
    failed = spool.finish(study, "no CT series")
    assert (failed / "reason.txt").read_text() == "no CT series\n" and (failed / f"{sop}.dcm").is_file()
