"""What an operations team runs the listener with: typed configs (one line per mistake, exit 2),
``serve --check``, ``/healthz`` ``/readyz`` ``/metrics``, JSON logs and the audit record."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from operators.cli import main
from tests.deploy.pacs import OrthancServer, free_port, start_listener, wait_for, wait_listening, write_listener_config
from tests.dicom_cases import broken_studies, small_study


def _base(tmp_path: Path) -> dict:
    return {
        "allowed": [{"ae_title": "PACS", "host": "127.0.0.1"}],
        "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        "spool": str(tmp_path / "spool"),
    }


BAD_CONFIGS = {  # the change to a good config -> what the one line must say
    "port": ({"port": "eleven"}, "port: expected a valid integer, got 'eleven'"),
    "nested misspelt key": (
        {"destination": {"ae_title": "PACS", "hostname": "pacs", "port": 104}},
        "destination.hostname: unknown key",
    ),
    "unknown top-level key": ({"workerz": 2}, "workerz: unknown key"),
    "no allowed caller": ({"allowed": []}, "allowed: must list at least one calling AE title"),
    "AE title too long": ({"ae_title": "A" * 17}, "ae_title: an AE title: 1 to 16 characters"),
    "AE title with a backslash": ({"allowed": [{"ae_title": "A\\B"}]}, "allowed[0].ae_title: an AE title"),
    "port out of range": ({"port": 70000}, "port: expected less than or equal to 65535, got 70000"),
    "bool for a number": ({"max_instance_mb": True}, "max_instance_mb: expected a valid number, got True"),
    "string for a bool": ({"maps": "yes"}, "maps: expected a valid boolean, got 'yes'"),
    "negative timeout": ({"idle_timeout_s": -1}, "idle_timeout_s: expected greater than or equal to 0"),
    "findings mode": ({"findings_mode": "merge"}, "findings_mode: expected 'add' or 'replace', got 'merge'"),
    "destination kind": ({"destination": {"kind": "hl7", "url": "x"}}, "destination: kind must be dimse or dicomweb"),
    "destination without a port": ({"destination": {"ae_title": "PACS", "host": "h"}}, "destination.port: missing"),
    "TLS files missing": (
        {"tls": {"cert": "/nonexistent/c.pem", "key": "/nonexistent/k.pem", "ca": "/nonexistent/ca.pem"}},
        "tls: cert '/nonexistent/c.pem' is not a readable file",
    ),
    "workers zero": ({"workers": 0}, "workers: expected greater than or equal to 1, got 0"),
    "health port is the DICOM port": ({"health": {"port": 11112}}, "health.port 11112 is the DICOM port too"),
    "log format": ({"log_format": "xml"}, "log_format: expected 'text' or 'json', got 'xml'"),
    "UID root": ({"uid_root": "1.02.3"}, "uid_root: an organisation's UID root: '1.02.3' is not a usable UID root"),
    "procedure code": ({"procedure": "36813-4"}, "procedure: a procedure code: '36813-4' is not SCHEME^VALUE^MEANING"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_listener_config_is_one_line_naming_the_key(case, tmp_path, capsys):
    change, expected = BAD_CONFIGS[case]
    cfg = tmp_path / "listener.yaml"
    cfg.write_text(yaml.safe_dump({**_base(tmp_path), **change}))
    for argv in (["serve", "--config", str(cfg)], ["serve", "--check", str(cfg)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"ct-zeroshot serve: error: {cfg}: ") and expected in err, err
    assert not (tmp_path / "spool").exists()  # nothing was started


def test_a_config_that_is_not_yaml_or_not_a_mapping(tmp_path, capsys):
    for text, expected in (("port: [1", "cannot read listener config"), ("- a\n- b\n", "expected a mapping")):
        (tmp_path / "l.yaml").write_text(text)
        assert main(["serve", "--config", str(tmp_path / "l.yaml")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err


def _echo_scp():
    """A DICOM peer that answers C-ECHO (pynetdicom), as a destination that is up."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification)
    port = free_port()
    return ae.start_server(("127.0.0.1", port), block=False), port


def test_serve_check_against_a_live_and_a_dead_destination(tmp_path, tiny_package, capsys):
    server, port = _echo_scp()
    try:
        cfg = {**_base(tmp_path), "model": str(tiny_package["pkg"]), "port": free_port()}
        cfg["destination"]["port"] = port
        (tmp_path / "live.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["serve", "--check", str(tmp_path / "live.yaml")]) == 0
        out = capsys.readouterr().out
        assert "FAIL" not in out and "ok    destination: PACS@127.0.0.1" in out and "C-ECHO success" in out, out
        assert "ok    model: " in out and "ok    spool: " in out and "ok    DICOM port: " in out, out
    finally:
        server.shutdown()
    cfg["destination"]["port"] = free_port()  # nothing listens there
    (tmp_path / "dead.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["serve", "--check", str(tmp_path / "dead.yaml")]) == 1
    out = capsys.readouterr().out
    assert "FAIL  destination: PACS@127.0.0.1" in out and "ok    model:" in out and "ok    spool:" in out, out
    assert not (tmp_path / "spool").exists()  # the check writes nothing
    cfg["model"] = str(tmp_path / "no-such-package")
    (tmp_path / "nomodel.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["serve", "--check", str(tmp_path / "nomodel.yaml")]) == 1
    assert "FAIL  model:" in capsys.readouterr().out


def test_readyz_while_loading_and_with_an_unwritable_spool(tmp_path, tiny_package):
    """In one process: not ready (model loading) before the listener exists, ready once it listens, not
    ready when the spool cannot be written, ready again when it can; /healthz alive throughout."""
    from operators.listener.config import ListenerConfig
    from operators.listener.health import HealthServer, Metrics, Readiness
    from operators.listener.service import Listener

    server, port = _echo_scp()
    cfg = {**_base(tmp_path), "model": str(tiny_package["pkg"]), "port": free_port()}
    cfg["destination"]["port"] = port
    cfg["health"] = {"bind": "127.0.0.1", "port": free_port()}
    (tmp_path / "l.yaml").write_text(yaml.safe_dump(cfg))
    config = ListenerConfig.load(tmp_path / "l.yaml")
    metrics = Metrics()
    readiness = Readiness(config, metrics)
    health = HealthServer(config, readiness)
    health.start()
    url = f"http://127.0.0.1:{health.port}"
    listener = None
    try:
        code, body = _get(url + "/readyz")
        assert code == 503 and body["checks"]["model"] == {"ok": False, "detail": "loading"}, body
        assert _get(url + "/healthz")[0] == 200
        listener = Listener(config, metrics)
        readiness.listener = listener
        assert _get(url + "/readyz")[0] == 503  # loaded, not yet listening
        listener.start()
        code, body = _get(url + "/readyz")
        assert code == 200 and body["ready"] is True, body
        spool = Path(config.spool)
        moved = spool.with_name("spool-away")
        spool.rename(moved)
        spool.write_text("not a folder")  # as root, permissions do not stop a write: the spool is made unusable
        if os.geteuid() != 0:
            spool.unlink()
            moved.rename(spool)
            spool.chmod(0o500)
        code, body = _get(url + "/readyz")
        assert code == 503 and body["checks"]["spool"]["ok"] is False, body
        if spool.is_file():
            spool.unlink()
            moved.rename(spool)
        spool.chmod(0o700)
        assert _get(url + "/readyz")[0] == 200
        assert _get(url + "/nothing")[0] == 404
    finally:
        if listener is not None:
            listener.shutdown()
        health.stop()
        server.shutdown()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_metrics_and_audit_after_three_studies_equal_the_spool(tmp_path, tiny_package):
    """Three studies (two good, one the pipeline refuses) from Orthanc through a served listener with
    ``health`` and JSON logs: the counters equal what the spool holds, every study has its audit line, the
    logs are JSON and carry no patient name."""
    lport, hport = free_port(), free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", lport)
    good = [orthanc.upload(small_study(tmp_path / "studies", f"OPS{i}", n=10, shape=(20, 20))) for i in range(2)]
    bad_dir = tmp_path / "bad"
    broken = broken_studies(bad_dir)
    one = next(u for u, why in broken.items() if "1 slice" in why)  # a CT study of one slice: refused
    bad = [orthanc.upload(sorted(p for p in bad_dir.rglob("*.dcm") if _study(p) == one))]
    cfg = write_listener_config(
        tmp_path, lport, orthanc, tiny_package, health={"bind": "127.0.0.1", "port": hport}, log_format="json"
    )
    proc = start_listener(cfg, tmp_path / "listener.log")
    url = f"http://127.0.0.1:{hport}"
    try:
        wait_listening(lport, proc)
        wait_for(lambda: _ready(url), 60, "/readyz ready")
        orthanc.push(good + bad)
        spool = tmp_path / "spool"
        wait_for(lambda: len(_dirs(spool / "done")) == 2 and len(_dirs(spool / "failed")) == 1, 180, "3 outcomes")
        wait_for(lambda: (spool / "audit.jsonl").is_file() and _lines(spool / "audit.jsonl") == 3, 30, "3 audit lines")
        m = _metrics(url)
        spooled = sum(len(list(d.glob("*.dcm"))) for d in _dirs(spool / "done") + _dirs(spool / "failed"))
        assert m["ctzs_instances_received_total"] == spooled == 21
        assert m["ctzs_studies_received_total"] == 3
        assert m["ctzs_studies_reported_total"] == len(_dirs(spool / "done")) == 2
        assert m["ctzs_studies_failed_total"] == len(_dirs(spool / "failed")) == 1
        assert m["ctzs_studies_waiting"] == len(_dirs(spool / "ready")) == 0
        assert m["ctzs_sr_delivery_attempts_total{outcome=stored}"] == 2
        assert m["ctzs_study_latency_seconds_count"] == 2
        assert m["ctzs_stage_seconds_count{stage=encoder}"] == 2
        assert m["ctzs_ready"] == 1
        assert any(k.startswith("ctzs_model_info{name=") for k in m)
        audit = [json.loads(line) for line in (spool / "audit.jsonl").read_text().splitlines()]
        assert sorted(a["outcome"] for a in audit) == ["failed", "reported", "reported"]
        for a in audit:
            assert a["calling_ae"] == ["ORTHANC"] and a["destination"].startswith("ORTHANC@")
            assert a["completed"] is not None and a["completed"] <= a["time"]  # when it was queued
            if a["outcome"] == "reported":
                srs = [s["sop_instance_uid"] for s in a["sent"] if s["modality"] == "SR"]
                assert len(srs) == 1 and orthanc.find_instance(srs[0])
            else:
                assert a["study_uid"] == one and "1 slice" in a["error"]
    finally:
        proc.terminate()
        proc.wait(60)
        orthanc.stop()
    lines = [line for line in (tmp_path / "listener.log").read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert len(records) > 5 and {"time", "level", "logger", "message"} <= set(records[0])
    assert any("listening as CTZEROSHOT" in r["message"] for r in records)
    log_text = (tmp_path / "listener.log").read_text()
    assert "OPS0" not in log_text and "BADONE" not in log_text  # the phantoms' patient names stay out of logs


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def _ready(url: str) -> bool:
    try:
        return _get(url + "/readyz")[0] == 200
    except OSError:
        return False


def _dirs(folder: Path) -> list[Path]:
    return [d for d in folder.iterdir() if d.is_dir()] if folder.is_dir() else []


def _study(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_the_served_readyz_says_loading_before_the_model_is_loaded(tmp_path, tiny_package):
    """Through ``ct-zeroshot serve``: /readyz answers from before the model loads; every answer before the
    first ready one is 503 (never ready early), and /healthz answers 200 once it serves."""
    server, dport = _echo_scp()
    cfg = {**_base(tmp_path), "model": str(tiny_package["pkg"]), "port": free_port()}
    cfg["destination"]["port"] = dport
    cfg["health"] = {"bind": "127.0.0.1", "port": free_port()}
    (tmp_path / "l.yaml").write_text(yaml.safe_dump(cfg))
    proc = start_listener(tmp_path / "l.yaml", tmp_path / "listener.log")
    url = f"http://127.0.0.1:{cfg['health']['port']}"
    answers = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "listener.log").read_text()[-2000:]
            try:
                code, body = _get(url + "/readyz")
            except OSError:
                time.sleep(0.02)
                continue
            answers.append((code, body))
            if code == 200:
                break
        assert answers and answers[-1][0] == 200, answers[-3:]
        assert all(c == 503 for c, _ in answers[:-1])
        loading = [b for _, b in answers[:-1] if "listening" not in b["checks"]]
        assert all(b["checks"]["model"]["detail"] == "loading" for b in loading)
        assert _get(url + "/healthz")[0] == 200
    finally:
        proc.terminate()
        proc.wait(60)
        server.shutdown()
    assert proc.returncode == 0
    shutil.rmtree(tmp_path / "spool", ignore_errors=True)


def test_the_load_benchmark_runs_with_two_workers(tmp_path):
    """``make bench-load`` at test size: 3 studies from 2 concurrent senders to a listener with ``workers: 2``
    (the per-study guarantees are the soak's; here every study gets its SR and the table is written)."""
    from benchmarks import bench_load

    assert bench_load.main(["--out", str(tmp_path), "--studies", "3", "--senders", "2", "--workers", "2"]
                           + ["--profile", "tiny"]) == 0  # fmt: skip
    doc = json.loads((tmp_path / "load.json").read_text())
    (run,) = doc["runs"]
    (queued,) = doc["backlog"]
    assert queued["srs_received"] == 3 and queued["mode"] == "backlog" and queued["seconds"] > 0
    assert run["workers"] == 2 and run["srs_received"] == 3 and not run["errors"]
    assert run["latency_p50_s"] > 0 and run["peak_rss_mb"] > 100 and run["stage_mean_s"]["encoder"] > 0
    assert "| 2 | 3/3 |" in (tmp_path / "load.md").read_text()
