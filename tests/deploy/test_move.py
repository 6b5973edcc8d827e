"""``ct-zeroshot move``: the listener asks its source PACS (Orthanc) for studies by UID or by date (C-FIND,
C-MOVE); Orthanc sends them to the listener, whose SRs come back to Orthanc."""

from __future__ import annotations

import pydicom
import pytest
import yaml

from operators.cli import main
from tests.deploy.pacs import OrthancServer, free_port, start_listener, wait_for, wait_listening, write_listener_config
from tests.deploy.test_dicomweb import _dated_study


def test_move_by_uid_and_by_date_from_orthanc(tmp_path, tiny_package, capsys):
    lport = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", lport)
    try:
        uids, ids = {}, {}
        for name, date in (("MOVE2020A", "20200305"), ("MOVE2020B", "20201111"), ("MOVE2021", "20210606")):
            files = _dated_study(tmp_path / "studies", name, date)
            uids[name] = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            ids[name] = orthanc.upload(files)
        cfg = write_listener_config(
            tmp_path,
            lport,
            orthanc,
            tiny_package,
            source={"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom},
        )
        proc = start_listener(cfg, tmp_path / "listener.log")
        try:
            wait_listening(lport, proc)
            assert main(["move", "--config", str(cfg), "--study", uids["MOVE2021"]]) == 0
            out = capsys.readouterr().out
            assert f"[1/1] study {uids['MOVE2021']}: sent; 10 instance(s) sent" in out, out
            wait_for(lambda: len(orthanc.srs(ids["MOVE2021"])) == 1, 120, "no SR for the moved study")
            assert main(["move", "--config", str(cfg), "--dates", "20200101-20201231"]) == 0
            out = capsys.readouterr().out
            assert out.startswith("2 studies to move from ORTHANC@127.0.0.1") and "MOVE" not in out  # UIDs only
            wait_for(lambda: all(len(orthanc.srs(ids[n])) == 1 for n in ("MOVE2020A", "MOVE2020B")), 120, "no SRs")
            assert len(orthanc.srs(ids["MOVE2021"])) == 1  # not moved again
        finally:
            proc.terminate()
            proc.wait(60)
        # bad requests: one line, exit 2; a PACS that does not answer: exit 1
        for argv, expected in (
            (["--study", "1.02.3"], "not a Study Instance UID"),
            (["--dates", "2020-01-01"], "expected YYYYMMDD-YYYYMMDD"),
            ([], "name the studies"),
        ):
            assert main(["move", "--config", str(cfg), *argv]) == 2
            err = capsys.readouterr().err
            assert expected in err and err.count("\n") == 1, err
    finally:
        orthanc.stop()
    assert main(["move", "--config", str(cfg), "--study", uids["MOVE2021"]]) == 1  # Orthanc stopped
    assert "association not established" in capsys.readouterr().err
    plain = yaml.safe_load(cfg.read_text())
    del plain["source"]
    cfg.write_text(yaml.safe_dump(plain))
    assert main(["move", "--config", str(cfg), "--study", uids["MOVE2021"]]) == 2
    assert "names no 'source' PACS" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [{"ae_title": "ORTHANC", "host": "h"}, {"ae_title": "ORTHANC", "port": 0, "host": "h"}])
def test_a_bad_source_is_one_line(tmp_path, bad, capsys):
    base = {
        "allowed": [{"ae_title": "PACS"}],
        "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        "spool": str(tmp_path / "spool"),
        "source": bad,
    }
    (tmp_path / "l.yaml").write_text(yaml.safe_dump(base))
    assert main(["move", "--config", str(tmp_path / "l.yaml"), "--study", "1.2.3"]) == 2
    err = capsys.readouterr().err
    assert "source.port" in err and err.count("\n") == 1, err
