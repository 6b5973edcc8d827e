"""The official-checkpoint converter, on random tensors with every name and shape of Merlin's checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.merlin_stub import SMALL_LONGFORMER, merlin_shapes, random_merlin_state_dict, write_longformer_stub
from operators.contract.findings import load_catalogue
from operators.contract.package import load_package
from training.convert_merlin import ConversionError, build_merlin_model, load_merlin_state, read_checkpoint


@pytest.fixture(scope="module")
def longformer_dir(tmp_path_factory) -> Path:
    return write_longformer_stub(tmp_path_factory.mktemp("clinical-longformer"))


@pytest.fixture(scope="module")
def merlin_model(longformer_dir):
    return build_merlin_model(longformer_dir)


def test_every_key_and_shape_of_merlins_checkpoint_loads_strictly(merlin_model):
    shapes = merlin_shapes()
    assert len(shapes) == 1208
    own = merlin_model.state_dict()
    own = {k: tuple(v.shape) for k, v in own.items() if not k.endswith("position_ids")}
    assert own == shapes  # the architecture is Merlin's, name for name and shape for shape
    sd = random_merlin_state_dict()
    load_merlin_state(merlin_model, sd)
    got = merlin_model.state_dict()
    for k in (
        "encode_image.i3_resnet.layer3.35.conv2.weight",
        "encode_text.text_encoder.encoder.layer.11.output.dense.bias",
        "encode_text.linear_layer.weight",
        "logit_scale",
    ):
        assert torch.equal(got[k], sd[k]), k


def test_other_layouts_are_refused_with_the_keys_named(merlin_model):
    sd = random_merlin_state_dict()
    sd.pop("encode_image.i3_resnet.layer4.2.bn3.weight")
    sd["encode_image.i3_resnet.extra.weight"] = torch.zeros(1)
    sd["encode_text.linear_layer.weight"] = torch.zeros(256, 768)
    with pytest.raises(ConversionError) as err:
        load_merlin_state(merlin_model, sd, "ckpt.pt")
    msg = str(err.value)
    assert "1 missing: encode_image.i3_resnet.layer4.2.bn3.weight" in msg
    assert "1 unexpected: encode_image.i3_resnet.extra.weight" in msg
    assert "encode_text.linear_layer.weight (256, 768) vs (512, 768)" in msg


def test_unreadable_and_foreign_checkpoints(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"layer.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="not a Merlin checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(ConversionError, match="config.json"):
        build_merlin_model(tmp_path)


@pytest.mark.slow  # ~15 min on 2 cores: 376 prompts through a full-size Longformer padded to 512 tokens
def test_convert_merlin_end_to_end(longformer_dir, tmp_path):
    """Full-size random-weight checkpoint -> package with Merlin's preprocessing and prompts; parity recorded."""
    ckpt = tmp_path / "merlin.pt"
    torch.save({f"module.{k}": v for k, v in random_merlin_state_dict(1).items()}, ckpt)  # DDP-saved form too
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.cli",
            "convert-merlin",
            "--checkpoint",
            str(ckpt),
            "--out",
            str(tmp_path / "pkg"),
            "--text-model",
            str(longformer_dir),
            "--text",
            "none",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pkg = load_package(tmp_path / "pkg")
    m = pkg.manifest
    assert m.parity["image"]["passed"] and m.parity["image"]["max_abs_diff"] <= 1e-4
    assert pkg.spec.spatial_size == (224, 224, 160) and pkg.spec.spacing == (1.5, 1.5, 3.0)
    assert pkg.embedding_dim == 512 and len(pkg.catalogue) == 30
    assert pkg.logit_scale == pytest.approx(np.exp(2.3), rel=1e-5)
    assert pkg.text_encoder is None and "custom prompts need the torch model" in str(m.text_encoder.absent_reason)
    assert m.provenance["source"] == "official Merlin checkpoint" and m.provenance["tensors"] == 1208
    # The prompts are the catalogue's, normalised as Merlin does (lower case, wordpunct tokens).
    assert m.findings[0].finding.positive_prompts == load_catalogue().findings[0].positive_prompts
    assert json.loads((tmp_path / "pkg" / "manifest.json").read_text())["files"]["image_encoder.onnx"]["bytes"] > 4e8


def test_longformer_text_tower_ships_only_with_parity(longformer_dir, tmp_path):
    """A small Longformer (Merlin's text architecture, scaled down): exported padded to its attention
    window when ONNX Runtime reproduces it, otherwise left out with the reason in the manifest."""
    from operators.contract.preprocessing import PreprocessSpec
    from operators.contract.scoring import ZeroShotModel
    from training.export import export_package
    from training.models.clip import DualEncoder
    from training.models.image import ImageEncoder
    from training.models.text import TextEncoder
    from training.synth.inputs import synthetic_inputs

    small = write_longformer_stub(
        tmp_path / "small-longformer",
        **SMALL_LONGFORMER,
    )
    torch.manual_seed(0)
    model = DualEncoder(ImageEncoder("resnet10_tiny", 32), TextEncoder(small, 32, 1024, "first"), 1.0, "none").eval()
    spec = PreprocessSpec.tiny()
    m = export_package(
        model,
        tmp_path / "pkg",
        spec=spec,
        parity_volumes=synthetic_inputs(spec, 2),
        name="t",
        version="0",
        provenance={},
        text="auto",
        log=lambda s: None,
    )
    pkg = load_package(tmp_path / "pkg")
    if pkg.text_encoder is not None:
        assert m.parity["text"]["passed"] and pkg.text_encoder.sequence_length == 64
        emb = ZeroShotModel(pkg, device="cpu").embed_texts(["no free air", "free air"])
        with torch.no_grad():
            ref = model.encode_texts(["no free air", "free air"]).numpy()
        assert np.abs(emb - ref).max() < 1e-4
    else:
        reason = str(m.text_encoder.absent_reason)
        assert "parity failed" in reason or "export of the text tower failed" in reason
        assert not (tmp_path / "pkg" / "text_encoder.onnx").exists()
