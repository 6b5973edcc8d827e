"""The deploy image, built by `make image`, run as a user runs it (`make test-image`; marked `image`).

Needs a Docker engine and the images; without them the tests skip, unless CT_ZEROSHOT_IMAGE_REQUIRED=1
(`make test-image`, CI), where a missing engine or image fails them.
"""

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from pathlib import Path

import pydicom
import pytest

from operators import __version__
from tests.deploy.pacs import free_port, orthanc_request, wait_for
from tests.sr_validators import have_validators, validate_all

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("CT_ZEROSHOT_IMAGE", f"ct-zeroshot:{__version__}")
ORTHANC_IMAGE = os.environ.get("ORTHANC_IMAGE", f"ct-zeroshot-orthanc:{__version__}")
VIEWER_IMAGE = os.environ.get("VIEWER_IMAGE", f"ct-zeroshot-viewer:{__version__}")
# Screenshots of the browser test land here (ignored by git); one of them is docs/img/ohif-maps.png.
ARTIFACTS = Path(os.environ.get("CT_ZEROSHOT_ARTIFACTS", ROOT / "build" / "test-artifacts"))
DOCKER = os.environ.get("DOCKER", "docker")
REQUIRED = os.environ.get("CT_ZEROSHOT_IMAGE_REQUIRED") == "1"
UID = 1000  # the image's user (holoscan)


def docker(*args, check=True, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} ... exit {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module", autouse=True)
def images():
    for image in (IMAGE, ORTHANC_IMAGE, VIEWER_IMAGE):
        try:
            found = docker("image", "inspect", image, check=False, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            found = False
        if not found:
            why = f"no Docker engine or no image {image} (make image)"
            if REQUIRED:
                pytest.fail(why)
            pytest.skip(why)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    """Three synthetic CT studies as DICOM (tiny profile), readable by the image's user."""
    from training.synth.corpus import SynthConfig, generate_corpus

    root = tmp_path_factory.mktemp("image-corpus")
    generate_corpus(
        SynthConfig(out=str(root / "c"), studies=3, seed=3, profile="tiny", dicom=True, version=2),
        progress=False,
    )
    return root / "c" / "dicom"


def _writable_by_image(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, UID, UID)
    else:
        path.chmod(0o777)
    return path


def run_offline(mounts: dict[Path, str], *args: str) -> subprocess.CompletedProcess:
    """The image run as a user runs it: no network, its own (non-root) user, Holoscan's stack size,
    ``mounts`` {host folder: container path[:ro]}."""
    volumes = [a for host, inside in mounts.items() for a in ("-v", f"{host}:{inside}")]
    return docker("run", "--rm", "--network", "none", "--ulimit", "stack=33554432", *volumes, IMAGE, *args)


def _tree(path: Path) -> dict[str, float]:
    return {str(p.relative_to(path)): p.stat().st_mtime for p in sorted(path.rglob("*"))}


def test_image_imports_monai_resolves_holoscan_and_lists_the_cuda_provider():
    proc = docker("run", "--rm", "--network", "none", "--entrypoint", "python3", IMAGE, "/opt/ct-zeroshot/smoke.py")
    report = json.loads(proc.stdout)
    assert report["problems"] == []
    assert "CUDAExecutionProvider" in report["ort_providers"] and report["ort_device"] == "GPU"
    assert report["holoscan_missing"] == {}
    assert report["python"].startswith("3.11") and report["holoscan"].startswith("4.2")
    # ldd itself, on the library every Holoscan app loads: nothing missing but the host's driver.
    ldd = docker(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        IMAGE,
        "-c",
        "ldd /opt/venv/lib/python3.11/site-packages/holoscan/lib/libholoscan_core.so",
    ).stdout
    assert "libcudart.so.13 => /opt/venv" in ldd and "not found" not in ldd


def test_map_manifests_match_the_image():
    inspect = json.loads(docker("image", "inspect", IMAGE).stdout)[0]["Config"]
    env = dict(e.split("=", 1) for e in inspect["Env"])
    app = json.loads(docker("run", "--rm", "--entrypoint", "cat", IMAGE, "/etc/holoscan/app.json").stdout)
    pkg = json.loads(docker("run", "--rm", "--entrypoint", "cat", IMAGE, "/etc/holoscan/pkg.json").stdout)
    assert {k: env.get(k) for k in app["environment"]} == app["environment"]
    assert json.loads(app["command"]) == inspect["Entrypoint"] == ["python3", "/opt/holoscan/app"]
    assert app["timeout"] == 1800 and app["sdk"] == "monai-deploy" and app["version"] == __version__
    assert pkg["models"] == {"demo": "/opt/holoscan/models/demo"} and pkg["platformConfig"] == "dgpu"
    assert inspect["User"] == "holoscan" and inspect["WorkingDir"] == app["workingDirectory"]


@pytest.mark.skipif(not have_validators(), reason="DICOM validators not installed")
def test_container_run_writes_valid_srs_offline_as_a_non_root_user(studies, tmp_path):
    before = _tree(studies)
    out = _writable_by_image(tmp_path / "out")
    proc = run_offline({studies: "/var/holoscan/input:ro", out: "/var/holoscan/output"})
    assert "model ct-zeroshot" in proc.stderr
    srs = sorted(out.glob("*.dcm"))
    assert len(srs) == 3, proc.stderr[-3000:]
    assert all(p.stat().st_uid == UID for p in srs) or os.geteuid() != 0  # written by the image's user
    assert validate_all(srs, pixelmed_files=1) == {}
    assert _tree(studies) == before  # input untouched (and mounted read-only)


def test_container_infer_command_runs_batch_inference(studies, tmp_path):
    out = _writable_by_image(tmp_path / "batch")
    run_offline({studies: "/data/in:ro", out: "/data/out"}, "infer", "/data/in", "--out", "/data/out", "--quiet")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["processed"] == 3 and summary["complete"]
    assert len(list((out / "sr").glob("*.dcm"))) == 3


class Pipeline:
    """docker/pacs/docker-compose.yml as a compose project of its own, torn down with its volumes."""

    def __init__(self, tmp: Path, override: dict | None = None):
        self.project = "czs" + uuid.uuid4().hex[:8]
        self.password = uuid.uuid4().hex
        self.http, self.viewer = free_port(), free_port()
        self.dir = tmp / "pacs"
        shutil.copytree(ROOT / "docker" / "pacs", self.dir)
        self.files = [self.dir / "docker-compose.yml"]
        if override:  # a site's docker-compose.override.yml: more mounts, say
            import yaml

            (self.dir / "override.yml").write_text(yaml.safe_dump({"version": "2.4", "services": override}))
            self.files.append(self.dir / "override.yml")
        self.env = {
            **os.environ,
            "ORTHANC_PASSWORD": self.password,
            "ORTHANC_HTTP": str(self.http),
            "ORTHANC_DICOM": str(free_port()),
            "CT_ZEROSHOT_IMAGE": IMAGE,
            "ORTHANC_IMAGE": ORTHANC_IMAGE,
            "VIEWER_IMAGE": VIEWER_IMAGE,
            "VIEWER_HTTP": str(self.viewer),
        }

    def compose(self, *args, check=True):
        cmd = ["docker-compose", "-p", self.project, *(a for f in self.files for a in ("-f", str(f))), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=300)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(cmd)}: {proc.stderr[-3000:]}")
        return proc

    @property
    def auth(self) -> str:
        return "Basic " + b64encode(f"pacs:{self.password}".encode()).decode()

    def request(self, method, path, data=None, ctype="application/json"):
        return orthanc_request(self.http, self.auth, method, path, data, ctype, timeout=60)


def _answers(call):
    """``call``'s result, or None while the server is not up yet (for ``wait_for``)."""
    try:
        return call()
    except (OSError, urllib.error.URLError):
        return None


def _store(pacs: Pipeline, study_dir: Path) -> tuple[str, str]:
    """A modality's store of one study through Orthanc's REST API: (StudyInstanceUID, Orthanc ID)."""
    files = sorted(p for p in study_dir.rglob("*") if p.is_file())
    for f in files:
        pacs.request("POST", "/instances", f.read_bytes(), "application/dicom")
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    return study_uid, pacs.request("POST", "/tools/lookup", study_uid.encode(), "text/plain")[0]["ID"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_pipeline_study_into_orthanc_sr_back_in_orthanc(studies, tmp_path):
    """The PACS pipeline end to end, through a listener outage: a study routed while the listener is
    down is not lost (its failed route job is resubmitted with the next routed series)."""
    pacs = Pipeline(tmp_path)
    pacs.compose("up", "-d")
    try:
        wait_for(lambda: _answers(lambda: pacs.request("GET", "/system")), 60, "Orthanc did not answer")
        # healthy: its /readyz (model loaded, spool writable, Orthanc answering C-ECHO) answered 200
        wait_for(lambda: "(healthy)" in pacs.compose("ps", "listener").stdout, 180, "listener not ready")
        pacs.compose("stop", "listener")  # the listener restarting, say, for an update
        first, second = sorted(studies.iterdir())[:2]
        study_uid, study = _store(pacs, first)

        def route_jobs(state):
            jobs = pacs.request("GET", "/jobs?expand")
            return [j for j in jobs if j["Type"] == "DicomModalityStore" and j["State"] == state]

        wait_for(lambda: route_jobs("Failure"), 60, "the route to the stopped listener did not fail")
        pacs.compose("start", "listener")
        wait_for(lambda: "(healthy)" in pacs.compose("ps", "listener").stdout, 120, "listener not healthy again")
        _, second_study = _store(pacs, second)  # its route resubmits the failed one

        def sr_instances(study=study):
            series = pacs.request("GET", f"/studies/{study}/series")
            return [i for s in series if s["MainDicomTags"].get("Modality") == "SR" for i in s["Instances"]]

        try:
            wait_for(lambda: _answers(sr_instances) and _answers(lambda: sr_instances(second_study)), 300, "no SR")
        except TimeoutError:
            logs = pacs.compose("logs", "--no-color", check=False).stdout
            raise AssertionError(logs[-6000:]) from None
        assert not route_jobs("Failure") and len(route_jobs("Success")) == 2
        (sr_id,) = sr_instances()
        sr_file = tmp_path / "sr.dcm"
        sr_file.write_bytes(pacs.request("GET", f"/instances/{sr_id}/file"))
        sr = pydicom.dcmread(sr_file)
        assert sr.StudyInstanceUID == study_uid and sr.Modality == "SR"
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        if have_validators():
            assert validate_all([sr_file], pixelmed_files=0) == {}
        # The SR's own (non-CT) series is not routed back: still one SR after two more stable periods.
        time.sleep(12)
        assert len(sr_instances()) == 1 and len(sr_instances(second_study)) == 1
        logs = pacs.compose("logs", "--no-color", check=False).stdout
        assert "resubmitted route job" in logs
        assert str(sr.PatientName) not in logs and sr.PatientID not in logs  # no PHI in either log
    finally:
        pacs.compose("down", "-v", "--remove-orphans", check=False)


def _browser():
    """Headless Chromium (Debian's, with its chromedriver) through Selenium; WebGL on SwiftShader."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--window-size=1600,1000",
        "--hide-scrollbars",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)


def _crop(png: bytes, box: dict):
    """``box`` of a screenshot, RGB."""
    import io

    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    x, y, w, h = (int(box[k]) for k in ("x", "y", "width", "height"))
    return img[y : y + h, x : x + w]


def _overlay_pixels(png: bytes, box: dict) -> int:
    """Coloured pixels (a segment's overlay; the CT itself is grey) inside ``box`` of a screenshot."""
    crop = _crop(png, box)
    return int(((crop.max(axis=2) - crop.min(axis=2)) > 60).sum())


def _lit_pixels(png: bytes, box: dict) -> int:
    """Pixels that are not (nearly) black inside ``box`` of a screenshot: an image is shown there."""
    return int((_crop(png, box).max(axis=2) > 40).sum())


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
@pytest.mark.skipif(shutil.which("chromedriver") is None, reason="Debian chromium and chromium-driver needed")
def test_viewer_shows_the_findings_maps_over_the_ct(corpus200, tiny_package, tmp_path):
    """The pipeline with maps on: a study stored into Orthanc comes back with its SR and a SEG with one
    segment per present finding; OHIF (the viewer service, behind Orthanc's credentials) renders the CT,
    lists the SR and the SEG among the study's series, and, the SEG opened as a user opens it, lists every
    present finding's segment and paints its region over the CT."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from operators.sr import read_findings

    model = tmp_path / "model"
    shutil.copytree(tiny_package["pkg"], model)
    for p in [model, *model.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    pacs = Pipeline(tmp_path, {"listener": {"volumes": [f"{model}:/opt/models/site:ro"]}})
    cfg = (pacs.dir / "listener.yaml").read_text().replace("/opt/holoscan/models/demo", "/opt/models/site")
    (pacs.dir / "listener.yaml").write_text(cfg + "maps: true\n")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pacs.compose("up", "-d")
    drv = None
    console: list[dict] = []  # the browser's log, read as the test goes (reading it empties it)
    try:
        wait_for(lambda: _answers(lambda: pacs.request("GET", "/system")), 60, "Orthanc did not answer")
        study_uid, study = _store(pacs, sorted((corpus200 / "dicom").iterdir())[0])

        def series(modality):
            found = pacs.request("GET", f"/studies/{study}/series")
            return [i for s in found if s["MainDicomTags"].get("Modality") == modality for i in s["Instances"]]

        try:
            wait_for(lambda: _answers(lambda: series("SR")), 300, "no SR")
        except TimeoutError:
            raise AssertionError(pacs.compose("logs", "--no-color", check=False).stdout[-6000:]) from None
        (sr_id,) = series("SR")
        (tmp_path / "sr.dcm").write_bytes(pacs.request("GET", f"/instances/{sr_id}/file"))
        mapped = {fid for fid, v in read_findings(tmp_path / "sr.dcm").items() if "map" in v}
        assert mapped, "the model called nothing present in this study: no map to show"
        (seg_id,) = series("SEG")
        (tmp_path / "seg.dcm").write_bytes(pacs.request("GET", f"/instances/{seg_id}/file"))
        labels = {str(s.SegmentLabel) for s in pydicom.dcmread(tmp_path / "seg.dcm").SegmentSequence}
        assert len(labels) == len(mapped)

        base = f"http://127.0.0.1:{pacs.viewer}"
        with pytest.raises(urllib.error.HTTPError) as refused:  # no credentials, no viewer (nor PACS)
            urllib.request.urlopen(f"{base}/dicom-web/studies", timeout=30)
        assert refused.value.code == 401 and "Basic" in refused.value.headers.get("WWW-Authenticate", "")
        drv = _browser()
        drv.execute_cdp_cmd("Network.enable", {})  # the browser's credentials: Orthanc's user
        drv.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": pacs.auth}})
        drv.get(f"{base}/viewer?StudyInstanceUIDs={study_uid}")
        wait = WebDriverWait(drv, 180, poll_frequency=0.5)

        def thumbnails():
            out = {}
            for el in drv.find_elements(By.CSS_SELECTOR, '[data-cy^="study-browser-thumbnail"]'):
                kind = el.find_elements(By.CSS_SELECTOR, '[data-cy="series-modality-label"]')
                desc = el.find_elements(By.CSS_SELECTOR, '[data-cy="series-description-label"]')
                if kind:
                    out[kind[0].text] = (el, desc[0].text if desc else "")
            return out

        wait.until(lambda d: {"CT", "SEG", "SR"} <= set(thumbnails()))
        shown = thumbnails()
        assert shown["SR"][1] == "ct-zeroshot AI findings" and shown["SEG"][1] == "ct-zeroshot AI finding maps"
        wait.until(
            lambda d: d.execute_script(
                "const c = document.querySelector('[data-cy=\"viewport-pane\"] canvas'); return c && c.width > 0;"
            )
        )
        drv.save_screenshot(str(ARTIFACTS / "viewer-study.png"))
        pane = drv.find_element(By.CSS_SELECTOR, '[data-cy="viewport-pane"]')
        before = _overlay_pixels(drv.get_screenshot_as_png(), pane.rect)  # the grey CT, the viewport's own marks
        time.sleep(3)  # the hanging protocol settles; a double-click before that is lost
        ActionChains(drv).double_click(thumbnails()["SEG"][0]).perform()  # open the SEG, as a user does
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-cy="yes-hydrate-btn"]'))[0].click()
        if not drv.find_elements(By.CSS_SELECTOR, '[data-cy="data-row-title"]'):
            drv.find_element(By.CSS_SELECTOR, '[data-cy="panelSegmentation-btn"]').click()
        wait.until(lambda d: {e.text for e in d.find_elements(By.CSS_SELECTOR, '[data-cy="data-row-title"]')} >= labels)
        for _ in range(5):  # a click on a segment moves to it (the panel re-renders while it loads: retried)
            try:
                drv.find_elements(By.CSS_SELECTOR, '[data-cy="data-row-title"]')[0].click()
                break
            except StaleElementReferenceException:
                time.sleep(1)
        wait.until(lambda d: _overlay_pixels(d.get_screenshot_as_png(), pane.rect) > before + 1000)
        time.sleep(2)
        drv.save_screenshot(str(ARTIFACTS / "viewer-maps.png"))
        # the SR, opened as a user opens it: its qualitative groups (no coordinates) do not stop OHIF
        console.extend(drv.get_log("browser"))
        ActionChains(drv).double_click(thumbnails()["SR"][0]).perform()
        time.sleep(5)

        # OHIF's SR viewport (its badge reads "SR") shows the CT once the SR's first measurement has a place on
        # it (the groups with a map's peak come first); while that one has none, it shows nothing
        def shown(d):
            badges = d.find_elements(By.CSS_SELECTOR, '[data-cy^="ModalityLoadBadge-"]')
            if not any(b.text.strip() == "SR" for b in badges):
                return False
            box = d.find_element(By.CSS_SELECTOR, '[data-cy="viewport-pane"]').rect
            return _lit_pixels(d.get_screenshot_as_png(), box) > 0.05 * box["width"] * box["height"]

        try:
            wait.until(shown)
        finally:
            drv.save_screenshot(str(ARTIFACTS / "viewer-sr.png"))
            console.extend(drv.get_log("browser"))
        failed = [e["message"][:300] for e in console if "Error Boundary" in e["message"]]
        assert not failed, failed
    finally:
        if drv is not None:
            console.extend(drv.get_log("browser"))
            (ARTIFACTS / "viewer-console.log").write_text(
                "\n".join(f"{e['level']} {e['message'][:400]}" for e in console)
            )
            drv.save_screenshot(str(ARTIFACTS / "viewer-last.png"))
            drv.quit()
        pacs.compose("down", "-v", "--remove-orphans", check=False)
