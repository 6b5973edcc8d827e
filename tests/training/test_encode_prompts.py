"""``ct-zeroshot-train encode-prompts``: custom findings baked into a copy of a package that cannot encode
prompts itself (Merlin's case: a Longformer text tower that ships without an ONNX encoder)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.merlin_stub import SMALL_LONGFORMER, write_longformer_stub
from operators.contract.package import load_package
from operators.contract.scoring import finding_scores, package_with_findings
from tests.conftest import TINY_TRAIN, export_cli
from training.config import TrainConfig
from training.run_folder import load_run
from training.train import train

FINDINGS = """\
findings:
  - id: enlarged_liver
    display: Enlarged liver
    positive_prompts: ["the liver is enlarged", "enlarged liver"]
    negative_prompts: ["the liver is normal in size"]
"""
PROMPTS = ["the liver is enlarged", "enlarged liver", "the liver is normal in size"]


def encode_cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "training.cli", "encode-prompts", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def longformer_package(corpus200, tiny_package, tmp_path_factory) -> dict:
    """A few-step run whose text tower is a small Longformer (Merlin's text architecture scaled down),
    exported with prompt embeddings only, as a converted Merlin package is."""
    root = tmp_path_factory.mktemp("longformer-run")
    small = write_longformer_stub(
        root / "small-longformer",
        **SMALL_LONGFORMER,
    )
    cfg = TrainConfig.load("cpu-tiny", [*TINY_TRAIN, f"text.model={small}", "text.max_length=64", "train.steps=2"])
    train(corpus200, root / "run", cfg, cache_dir=tiny_package["cache"], progress=False)
    proc = subprocess.run(
        export_cli(root / "run", corpus200, root / "pkg", tiny_package["cache"], "--text", "none"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run": root / "run", "pkg": root / "pkg"}


def test_encode_prompts_writes_a_package_that_scores_the_custom_finding_as_the_torch_tower(
    longformer_package, tiny_package, tmp_path
):
    (tmp_path / "f.yaml").write_text(FINDINGS)
    original = load_package(longformer_package["pkg"])
    before = (longformer_package["pkg"] / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="cannot encode prompts"):  # the deploy side cannot, and says how
        package_with_findings(original, tmp_path / "f.yaml")
    base = ["--package", longformer_package["pkg"], "--findings", tmp_path / "f.yaml"]
    proc = encode_cli(*base, "--out", tmp_path / "pkg2", "--run", longformer_package["run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = load_package(tmp_path / "pkg2")  # loads and verifies every file's checksum
    assert new.catalogue.ids == original.catalogue.ids + ["enlarged_liver"]
    assert new.uid != original.uid and new.identity != original.identity  # its SRs get their own UIDs
    provenance = new.manifest.provenance["custom_findings"]
    assert provenance["source_package"]["uid"] == original.uid and provenance["ids"] == ["enlarged_liver"]
    assert (longformer_package["pkg"] / "manifest.json").read_bytes() == before  # the original untouched
    model, _ = load_run(longformer_package["run"], "best", device="cpu")
    with torch.no_grad():
        ref = model.eval().encode_texts(PROMPTS).numpy()
    rows = new.rows[-1]
    assert np.abs(new.prompt_embeddings[rows.positive[0] : rows.negative[1]] - ref).max() <= 1e-4
    assert np.array_equal(new.prompt_embeddings[: len(original.prompt_embeddings)], original.prompt_embeddings)
    x = np.random.default_rng(0).standard_normal((3, new.embedding_dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    margins, _ = finding_scores(x, new.prompt_embeddings, new.rows, new.logit_scale)
    sim = x @ ref.T
    assert np.allclose(margins[:, -1], sim[:, :2].mean(1) - sim[:, 2], atol=1e-5)
    manifest = json.loads((tmp_path / "pkg2" / "manifest.json").read_text())
    assert manifest["findings"][-1]["threshold_selection"]["method"] == "custom"

    # Another run's text tower is not this package's: refused, nothing written.
    proc = encode_cli(*base, "--out", tmp_path / "pkg3", "--run", tiny_package["run"])
    assert proc.returncode == 2 and "does not reproduce" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "pkg3").exists() and not list(tmp_path.glob(".pkg3*"))
    # An output that exists and is not empty is refused too.
    proc = encode_cli(*base, "--out", tmp_path / "pkg2", "--run", longformer_package["run"])
    assert proc.returncode == 2 and "not empty" in proc.stderr
