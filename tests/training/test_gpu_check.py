"""``make gpu-check`` at test sizes on the CPU: every code path of the GPU check runs, and its JSON names
every figure it measures on a GPU (``null`` with a reason where this machine cannot measure it)."""

import json

import pytest
import torch

from benchmarks.gpu_check import main

pytestmark = pytest.mark.merlin_scale  # make test-merlin-scale (CI runs it beside make test)


def test_gpu_check_runs_at_small_sizes_and_names_every_figure(tmp_path):
    out = tmp_path / "gpu-check.json"
    assert main(["--small", "--steps", "1", "--runs", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["size"] == "small" and doc["command"].startswith("python -m benchmarks.gpu_check --small")
    step = doc["training_step"]
    assert step["arch"] == "i3_resnet152_mini" and step["grad_checkpointing"] is True
    assert step["step_s_median"] > 0 and step["images_per_s"] > 0 and step["peak_memory_gib"] > 0
    ort = doc["ort_cuda"]
    assert {"provider_loaded", "parity_tf32_on", "parity_tf32_off"} <= set(ort)
    if not torch.cuda.is_available():
        assert doc["device"] == "cpu" and doc["gpu"] is None and "no CUDA device" in doc["note"]
        assert ort["provider_loaded"] is False and ort["parity_tf32_on"] is None and ort["reason"]
    sr = doc["dicom_to_sr"]
    assert sr["study"] == "512x512x40" and sr["seconds_median"] > 0
    assert {"decode_volume_s", "preprocess_s", "encoder_s", "sr_s"} <= set(sr["stages_median_s"])
