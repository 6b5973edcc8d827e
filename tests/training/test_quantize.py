"""ct-zeroshot-train quantize: an int8 image encoder, calibrated on training studies, checked against the
float package and written as a new model; the OpenVINO device that runs it; the benchmark's smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from operators.contract.package import load_package
from operators.contract.scoring import DeviceError, ZeroShotModel

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def int8_package(tiny_package, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quant") / "int8"
    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "quantize", "--package", str(tiny_package["pkg"]), "--data",
         str(tiny_package["data"]), "--out", str(out), "--studies", "6", "--evaluate", str(tiny_package["data"]),
         "--max-decisions-changed", "1", "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "int8 on onnxruntime" in proc.stdout and "int8 on openvino" in proc.stdout
    return out


def test_the_int8_package_is_a_new_model_that_records_its_calibration_and_agreement(tiny_package, int8_package):
    flt, q = load_package(tiny_package["pkg"]), load_package(int8_package)
    assert q.version == f"{flt.version}+int8" and q.manifest.model.uid != flt.manifest.model.uid
    assert q.manifest.model.evaluation is None  # a float's held-out figures never pass for the int8 weights
    rec = q.manifest.provenance["quantization"]
    assert rec["float_package"]["uid"] == flt.manifest.model.uid
    cal = rec["calibration"]
    assert cal["split"] == "train" and cal["studies"] == 6 == len(set(cal["study_ids"]))
    train_ids = {r["study_id"] for r in _rows(tiny_package["data"]) if r["split"] == "train"}
    assert set(cal["study_ids"]) <= train_ids
    check = rec["check"]
    assert check["split"] == "validation" and check["studies"] > 0
    for r in (check, check["openvino"], rec["evaluation"], rec["evaluation"]["openvino"]):
        assert 0 <= r["changed_fraction"] <= 1 and r["decisions"] > 0
        assert -1 <= r["embedding_cosine_min"] <= 1
        assert abs(r["report_labels"]["difference"]) < 0.2
    assert "ground_truth" in rec["evaluation"] and rec["evaluation"]["split"] == "all"
    graph = onnx.load(str(q.image_encoder_path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert rec["bytes_int8"] < rec["bytes_float"]
    # the stem (first convolution) and the head stay float: their weights are float initialisers
    first_conv = next(n for n in graph.node if n.op_type == "Conv")
    weights = {i.name: i for i in graph.initializer}
    assert weights[first_conv.input[1]].data_type == onnx.TensorProto.FLOAT


def _rows(data: Path) -> list[dict]:
    import csv

    with open(data / "reports_final.csv") as f:
        return [{"study_id": r["study id"], "split": r["Split"]} for r in csv.DictReader(f)]


def test_openvino_runs_a_package_as_onnx_runtime_does(tiny_package, int8_package):
    x = np.random.default_rng(0).random((2, 1, *load_package(tiny_package["pkg"]).spec.spatial_size), np.float32)
    for pkg in (tiny_package["pkg"], int8_package):
        package = load_package(pkg)
        ort_model, ov_model = ZeroShotModel(package, device="cpu"), ZeroShotModel(package, device="openvino")
        assert ov_model.device == "openvino" and ort_model.device == "cpu"
        a, b = ort_model.embed_images(x), ov_model.embed_images(x)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > (0.9999 if pkg == tiny_package["pkg"] else 0.9)  # float: the same up to summation order
        assert ov_model.prompts.providers == ["CPUExecutionProvider"]  # the text encoder stays on ORT


def test_openvino_named_but_not_installed_is_an_error(tiny_package, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(DeviceError, match="device openvino: the openvino package is not installed"):
        ZeroShotModel(load_package(tiny_package["pkg"]), device="openvino")


def test_too_many_changed_decisions_are_refused_and_nothing_is_written(tiny_package, int8_package, tmp_path):
    from training.quantize import QuantizeError, quantize_package

    out = tmp_path / "q"
    with pytest.raises(QuantizeError, match="decisions"):
        quantize_package(tiny_package["pkg"], tiny_package["data"], out, studies=2, progress=False,
                         log=lambda *_: None, max_changed=-1.0)  # fmt: skip
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(QuantizeError, match="already quantised"):
        quantize_package(int8_package, tiny_package["data"], out, studies=2, progress=False, log=lambda *_: None)
    with pytest.raises(QuantizeError, match="already exists"):
        quantize_package(tiny_package["pkg"], tiny_package["data"], int8_package, progress=False)


def test_infer_and_the_listener_config_name_the_device(tiny_package, int8_package, tmp_path):
    from operators.listener.config import ConfigError, ListenerConfig
    from tests.dicom_cases import small_study

    small_study(tmp_path / "in", "DEV")
    proc = subprocess.run(
        [sys.executable, "-m", "operators.cli", "infer", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
         "--model", str(int8_package), "--device", "openvino", "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["device"] == "openvino" and summary["model"]["version"].endswith("+int8")
    cfg = {"ae_title": "CTZS", "port": 11112, "spool": str(tmp_path / "spool"), "allowed": [{"ae_title": "PACS"}],
           "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}}  # fmt: skip
    for device in ("openvino", "cpu"):
        (tmp_path / "l.yaml").write_text(yaml.safe_dump({**cfg, "device": device}))
        assert ListenerConfig.load(tmp_path / "l.yaml").device == device
    (tmp_path / "l.yaml").write_text(yaml.safe_dump({**cfg, "device": "gpu"}))
    with pytest.raises(ConfigError, match="device"):
        ListenerConfig.load(tmp_path / "l.yaml")


def test_the_quantisation_benchmark_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_quant", "--out", str(tmp_path), "--arch", "resnet10_tiny",
         "--runs", "1", "--per-stream", "1", "--calibration", "2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "quant.json").read_text())["merlin_size"]
    engines = {f"{rt} {v}" for rt in ("onnxruntime", "openvino") for v in ("float", "int8", "int8 (int8 stem)")}
    assert set(r["latency_median_s"]) == engines == set(r["throughput_studies_per_hour"])
    assert all(v > 0 for v in r["throughput_studies_per_hour"].values())
    for name, best in r["best_studies_per_hour"].items():  # the better of one at a time and the streams
        assert best >= r["throughput_studies_per_hour"][name] and best >= 3600 / r["latency_median_s"][name] - 1e-6
    assert r["embedding_cosine_to_onnxruntime_float_min"]["openvino float"] > 0.9999
    assert "| openvino int8 |" in (tmp_path / "quant.md").read_text()
