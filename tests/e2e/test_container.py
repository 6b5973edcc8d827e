"""The container without Docker: the image's entry point, variables and folders, from this venv."""

import json
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.dicom_cases import only_reports, study_uid

ROOT = Path(__file__).resolve().parents[2]


def _dockerfile():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    env = dict(re.findall(r"(HOLOSCAN_[A-Z_]+)=(\S+)", text))
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    copies = re.findall(r"^COPY (\S+) (\S+)$", text, re.M)
    return env, entry, copies


def _stack():
    resource.setrlimit(resource.RLIMIT_STACK, (32 * 1024 * 1024, resource.getrlimit(resource.RLIMIT_STACK)[1]))


def test_entry_point_runs_the_app_as_the_image_would(corpus200, tiny_package, tmp_path):
    env, entry, copies = _dockerfile()
    assert entry == ["python3", "/opt/holoscan/app"]
    assert ("docker/app", "/opt/holoscan/app") in copies and ("app.yaml", "/var/holoscan/app.yaml") in copies
    # The packager's values: input/ and output/ relative to the working directory /var/holoscan.
    assert env["HOLOSCAN_INPUT_PATH"] == "input/" and env["HOLOSCAN_OUTPUT_PATH"] == "output/"
    assert env["HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models" and env["HOLOSCAN_WORKDIR"] == "/var/holoscan"
    fs = tmp_path / "image"  # the image's file system, rooted here

    def at(p):
        return fs / p.lstrip("/")

    shutil.copytree(ROOT / "docker" / "app", at("/opt/holoscan/app"))
    shutil.copytree(tiny_package["pkg"], at("/opt/holoscan/models/tiny"))  # a mounted model package
    at("/var/holoscan").mkdir(parents=True)
    shutil.copy(ROOT / "app.yaml", at("/var/holoscan/app.yaml"))
    studies = sorted((corpus200 / "dicom").iterdir())[:2]
    for s in studies:
        shutil.copytree(s, at("/var/holoscan/input") / s.name)
    at("/var/holoscan/output").mkdir(parents=True)
    run_env = {
        "PATH": str(Path(sys.executable).parent),
        **{k: str(at(v)) if v.startswith("/") else v for k, v in env.items()},
    }
    cmd = [sys.executable if entry[0] == "python3" else entry[0], str(at(entry[1]))]
    proc = subprocess.run(
        cmd, env=run_env, cwd=at("/var/holoscan"), capture_output=True, text=True, preexec_fn=_stack, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model ct-zeroshot-resnet10_tiny" in proc.stderr  # the mounted package, not the demo model
    out = [p.name for p in at("/var/holoscan/output").iterdir()]
    assert only_reports(out, [study_uid(next(s.iterdir())) for s in studies])


def test_app_yaml_has_the_keys_the_packager_reads():
    doc = yaml.safe_load((ROOT / "app.yaml").read_text())
    app = doc["application"]
    assert app["title"] and app["version"] and app["input-formats"] == ["file"] and app["output-formats"] == ["file"]
    assert set(doc["resources"]) >= {"cpu", "gpu", "memory", "gpuMemory"}
    assert "inputFormats" not in app  # the SDK examples' camelCase is ignored by the packager


def test_image_requirements_cover_the_runtime_dependencies():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    req = (ROOT / "docker" / "requirements.txt").read_text()
    names = {re.split(r"[\[<>=!~ ]", d)[0].lower() for d in deps}
    in_image = {re.split(r"[\[<>=!~ ]", line)[0].lower() for line in req.splitlines() if line and line[0].isalpha()}
    missing = names - in_image - {"onnxruntime"}  # the image has onnxruntime-gpu instead
    assert not missing and "onnxruntime-gpu" in in_image
