"""A PACS on loopback for the listener's tests: Debian's Orthanc, started and stopped by the test, and
the listener as a subprocess (``ct-zeroshot serve``)."""

import base64
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ORTHANC = "/usr/sbin/Orthanc"
AUTH = "Basic " + base64.b64encode(b"ci:ci").decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_request(port: int, auth: str, method: str, path: str, data=None, ctype="application/json", timeout=300):
    """One call to the REST API of an Orthanc on 127.0.0.1:``port``: JSON decoded, other bodies as bytes."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"Authorization": auth, "Content-Type": ctype},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body and r.headers.get_content_type() == "application/json" else body


DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian orthanc-dicomweb


class OrthancServer:
    def __init__(self, root: Path, listener_port: int, tls: dict | None = None, dicomweb: bool = False):
        self.http, self.dicom = free_port(), free_port()
        listener = ["CTZEROSHOT", "127.0.0.1", listener_port]
        cfg = {
            "Name": "ct-zeroshot-test",
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {"ci": "ci"},
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomModalities": {
                "ctzs": dict(zip(("AET", "Host", "Port"), listener), UseDicomTls=True) if tls else listener
            },
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
            **({"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}} if dicomweb else {}),
            **(tls or {}),
        }
        (root / "conf").mkdir(parents=True)
        (root / "conf" / "orthanc.json").write_text(json.dumps(cfg))
        self.root = root
        self.start()

    def start(self):
        """Start Orthanc (again: ``stop`` then ``start`` is a PACS that was down), its database kept."""
        self.log = open(self.root / "orthanc.log", "a")
        self.proc = subprocess.Popen(
            [ORTHANC, str(self.root / "conf") + "/"], stdout=self.log, stderr=subprocess.STDOUT
        )
        for _ in range(100):
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not start: " + (self.root / "orthanc.log").read_text()[-2000:])

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http}/dicom-web"

    def find_instance(self, sop_instance_uid: str) -> list[str]:
        query = {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}
        return self.request("POST", "/tools/find", json.dumps(query).encode())

    def request(self, method, path, data=None, ctype="application/json"):
        return orthanc_request(self.http, AUTH, method, path, data, ctype)

    def get(self, path):
        return self.request("GET", path)

    def upload(self, files) -> str:
        study = None
        for f in files:
            study = self.request("POST", "/instances", f.read_bytes(), "application/dicom")["ParentStudy"]
        return study

    def push(self, studies):
        return self.request(
            "POST", "/modalities/ctzs/store", json.dumps({"Resources": studies, "Synchronous": True}).encode()
        )

    def srs(self, study) -> list[str]:
        out = []
        for series in self.get(f"/studies/{study}/series"):
            if series["MainDicomTags"].get("Modality") == "SR":
                out += series["Instances"]
        return out

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def start_listener(cfg_path: Path, log: Path, cwd: Path | None = None):
    def stack():
        import resource

        resource.setrlimit(resource.RLIMIT_STACK, (32 << 20, resource.getrlimit(resource.RLIMIT_STACK)[1]))

    fh = open(log, "a")
    return subprocess.Popen(
        [sys.executable, "-m", "operators.cli", "serve", "--config", str(cfg_path)],
        stdout=fh,
        stderr=subprocess.STDOUT,
        preexec_fn=stack,
        cwd=cwd,
    )


def wait_listening(port: int, proc, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        assert proc.poll() is None, "listener exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError("listener did not open its port")


def wait_for(pred, timeout, what):
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return
        time.sleep(1)
    raise TimeoutError(what)


def write_listener_config(tmp_path: Path, port: int, orthanc: OrthancServer, tiny_package, **extra) -> Path:
    """``tmp_path/listener.yaml``: the listener on ``port``, taking studies from Orthanc and sending SRs to it."""
    cfg = {
        "ae_title": "CTZEROSHOT",
        "bind": "127.0.0.1",
        "port": port,
        "allowed": [{"ae_title": "ORTHANC", "host": "127.0.0.1"}],
        "destination": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom},
        "spool": str(tmp_path / "spool"),
        "model": str(tiny_package["pkg"]),
        "idle_timeout_s": 2.0,
        **extra,
    }
    (tmp_path / "listener.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "listener.yaml"
