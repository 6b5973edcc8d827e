"""Export to a model package: parity, thresholds, the deploy-side loader's refusals, the scorer."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from operators.contract.manifest import Manifest, ManifestError
from operators.contract.package import FORMAT_VERSION, PackageError, load_package, write_manifest
from operators.contract.scoring import ZeroShotModel, finding_scores
from tests.conftest import export_cli
from training.data import load_studies
from training.evaluate import prompt_embeddings, zero_shot_scores
from training.run_folder import load_run
from training.thresholds import choose_thresholds


@pytest.fixture(scope="module")
def exported(tiny_package):
    return tiny_package


def _copy(pkg, tmp_path):
    dst = tmp_path / "pkg"
    shutil.copytree(pkg, dst)
    return dst


def test_manifest_records_parity_and_contract(exported):
    pkg = load_package(exported["pkg"])
    m = pkg.manifest
    assert m.format_version == FORMAT_VERSION
    assert m.parity["image"]["passed"] and m.parity["image"]["max_abs_diff"] <= 1e-4
    assert m.parity["image"]["decisions_identical"]
    assert len(m.parity["image"]["spatial_sizes"]) == 2  # dynamic spatial axes exercised
    assert m.parity["text"]["passed"] and m.parity["text"]["tokens_identical"]
    assert set(m.files) == {"image_encoder.onnx", "text_encoder.onnx", "tokenizer.json", "prompt_embeddings.npy"}
    assert pkg.spec.spatial_size == (64, 56, 56)
    assert len(pkg.catalogue) == 30 and pkg.prompt_embeddings.shape[1] == pkg.embedding_dim
    assert m.threshold_method.startswith("validation")
    assert all(f.threshold_selection for f in m.findings)
    assert m.provenance["config_digest"] and m.provenance["source"] == "training run"
    # The model UID derives from the weights: another export of the same weights gets the same UID.
    assert m.model.uid.startswith("1.2.826.0.1.3680043.8.498.")
    # The file is exactly what the typed manifest writes, and reads back to the same manifest.
    on_disk = json.loads((exported["pkg"] / "manifest.json").read_text())
    assert m.to_dict() == on_disk and Manifest.from_dict(on_disk) == m


def test_package_scores_equal_the_torch_evaluation(exported):
    """ONNX image encoder + stored prompt embeddings give the training side's probabilities."""
    pkg = load_package(exported["pkg"])
    model, cfg = load_run(exported["run"])
    from training.cache import CachedVolumes, VolumeCache

    studies = [s for s in load_studies(exported["data"]) if s.split == "test"][:6]
    cache = VolumeCache(exported["cache"], cfg.spec)
    cache.build(studies, workers=1, progress=False)
    vols = np.stack([CachedVolumes(cache, studies)[i] for i in range(len(studies))]).astype(np.float32)
    with torch.no_grad():
        img = model.image_embeddings(torch.from_numpy(vols))
    prompt_emb, rows = prompt_embeddings(model, "cpu")
    _, p_torch = zero_shot_scores(img, prompt_emb, rows, model.scale().item())
    zs = ZeroShotModel(pkg, device="cpu")
    assert zs.device == "cpu" and zs.providers[0] == "CPUExecutionProvider"
    got = zs.decide(zs.embed_images(vols))
    p_onnx = np.stack([g.probabilities for g in got])
    assert np.abs(p_onnx - p_torch).max() < 1e-4
    assert np.array_equal(np.stack([g.present for g in got]), (p_onnx >= pkg.thresholds) & pkg.assessed)
    one = zs.score(vols[0])
    assert one.ids == pkg.catalogue.ids and np.allclose(one.probabilities, p_onnx[0])


def test_custom_prompts_through_the_onnx_text_encoder(exported):
    pkg = load_package(exported["pkg"])
    zs = ZeroShotModel(pkg, device="cpu")
    f = pkg.catalogue.findings[3]
    r = pkg.rows[3]
    emb = zs.embed_texts(list(f.positive_prompts) + list(f.negative_prompts))
    assert np.abs(emb - pkg.prompt_embeddings[r.positive[0] : r.negative[1]]).max() < 1e-4
    # Unnormalised input is normalised the same way as training ("Liver: Normal." -> "liver : normal .").
    a, b = zs.embed_texts(["Small Bowel Obstruction."]), zs.embed_texts(["small bowel obstruction ."])
    assert np.abs(a - b).max() < 1e-6


def test_the_deploy_side_applies_the_text_rule_the_package_records(exported, tmp_path):
    """A tower trained with text.keep_sentences=findings encodes only the sentences that state a
    finding, prompts included: the package says so and the deploy side applies it before tokenising."""
    m = json.loads((exported["pkg"] / "manifest.json").read_text())
    assert m["text_encoder"]["keep_sentences"] == "all"  # cpu-tiny: Merlin's, every sentence
    pkg = _copy(exported["pkg"], tmp_path)
    m["text_encoder"]["keep_sentences"] = "findings"
    write_manifest(pkg, Manifest.from_dict(m))
    zs = ZeroShotModel(load_package(pkg), device="cpu")
    a, b = zs.embed_texts(["No hydronephrosis.", "Normal."])
    assert np.abs(a - b).max() < 1e-6
    a, b = zs.embed_texts(["Mild hydronephrosis. No ascites.", "Mild hydronephrosis."])
    assert np.abs(a - b).max() < 1e-6
    plain = ZeroShotModel(load_package(exported["pkg"]), device="cpu").embed_texts(["No hydronephrosis.", "Normal."])
    assert np.abs(plain[0] - plain[1]).max() > 1e-3
    m["text_encoder"]["keep_sentences"] = "bare"  # ... and drops section headers
    write_manifest(pkg, Manifest.from_dict(m))
    a, b = ZeroShotModel(load_package(pkg), device="cpu").embed_texts(
        ["Kidneys: Mild hydronephrosis.", "Mild hydronephrosis."]
    )
    assert np.abs(a - b).max() < 1e-6
    m["text_encoder"]["keep_sentences"] = "sentences"  # a rule this deploy does not know
    with pytest.raises(ManifestError, match=r"field 'text_encoder.keep_sentences'.*must be one of all, findings, bare"):
        Manifest.from_dict(m)


def test_one_changed_byte_is_refused(exported, tmp_path):
    pkg = _copy(exported["pkg"], tmp_path)
    data = bytearray((pkg / "image_encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (pkg / "image_encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"image_encoder\.onnx: sha256 does not match"):
        load_package(pkg)


def test_missing_file_is_refused(exported, tmp_path):
    pkg = _copy(exported["pkg"], tmp_path)
    (pkg / "tokenizer.json").unlink()
    with pytest.raises(PackageError, match=r"tokenizer\.json: listed in the manifest but missing"):
        load_package(pkg)


def test_newer_format_version_is_refused(exported, tmp_path):
    pkg = _copy(exported["pkg"], tmp_path)
    m = json.loads((pkg / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match=f"format version {FORMAT_VERSION + 1} is newer"):
        load_package(pkg)


def test_malformed_and_unfinished_packages_are_refused(exported, tmp_path):
    pkg = _copy(exported["pkg"], tmp_path)
    (pkg / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        load_package(pkg)
    (pkg / "manifest.json").unlink()
    with pytest.raises(PackageError, match="manifest.json is missing"):
        load_package(pkg)
    with pytest.raises(PackageError, match="nowhere: does not exist"):
        load_package(tmp_path / "nowhere")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PackageError, match="a-file: not a directory"):
        load_package(tmp_path / "a-file")


def test_a_rewritten_manifest_is_still_checked_for_consistency(exported, tmp_path):
    """Checksums can be recomputed by anyone; the loader still checks what the manifest claims."""
    pkg = _copy(exported["pkg"], tmp_path)
    m = json.loads((pkg / "manifest.json").read_text())
    m["findings"][0]["prompt_rows"]["positive"] = [0, 10_000]
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match=r"'findings\[0\]\.prompt_rows\.positive'.*outside"):
        load_package(pkg)
    m["findings"][0]["prompt_rows"]["positive"] = [0, 2]
    m["findings"][0]["threshold"] = 1.5
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match=r"'findings\[0\]\.threshold' must be a probability"):
        load_package(pkg)


def test_export_refuses_a_non_empty_folder(exported, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    proc = subprocess.run(
        export_cli(exported["run"], exported["data"], tmp_path / "out", exported["cache"]),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_validation_thresholds_maximise_f1_within_the_call_cap():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < 0.3).astype(int)
    p = np.clip(0.2 + 0.3 * y + rng.normal(0, 0.12, y.shape), 0.001, 0.999)  # positives around 0.5
    y[:, 2] = 0  # a finding with no validation positives cannot be assessed
    p[:, 3] = rng.random(200)  # a score that knows nothing of finding 3
    thr, notes, assessed = choose_thresholds(p, y)
    for j in range(2):

        def f1(t, j=j):
            pred = p[:, j] >= t
            return 2 * (pred & (y[:, j] == 1)).sum() / (pred.sum() + y[:, j].sum())

        allowed = [t for t in np.linspace(0.01, 0.99, 400) if (p[:, j] >= t).sum() <= 1.5 * y[:, j].sum()]
        assert f1(thr[j]) >= max(f1(t) for t in allowed) - 1e-9
        assert (p[:, j] >= thr[j]).sum() <= 1.5 * y[:, j].sum()
        assert notes[j]["validation_f1"] == pytest.approx(f1(thr[j])) and assessed[j]
    assert not assessed[2] and "single class" in notes[2]["reason"]
    assert not assessed[3] and "below the floor 0.65" in notes[3]["reason"]
    # "everything positive" is the F1 optimum of a near-chance score; the cap forbids it
    _, notes_weak, _ = choose_thresholds(p[:, 3:], (p[:, :1] > 0.45).astype(int), auroc_floor=0.0)
    assert notes_weak[0]["validation_calls"] <= 1.5 * notes_weak[0]["positives"]


def test_the_call_cap_counts_unlabelled_studies_too():
    """A finding the reports rarely mention: 20 labelled positives, 20 labelled negatives, 160 studies
    that do not mention it (-1), most of them scoring as high as the positives. Counted on the labelled
    studies alone, a low threshold passes the cap; counted on all 200 studies it must not."""
    rng = np.random.default_rng(1)
    y = np.full((200, 1), -1)
    y[:20, 0], y[20:40, 0] = 1, 0
    p = np.empty((200, 1))
    p[:20, 0] = rng.uniform(0.6, 0.9, 20)
    p[20:40, 0] = rng.uniform(0.0, 0.3, 20)
    p[40:, 0] = rng.uniform(0.3, 0.8, 160)
    thr, notes, assessed = choose_thresholds(p, y)
    assert assessed[0] and notes[0]["validation_calls_all_studies"] == (p[:, 0] >= thr[0]).sum() <= 30
    assert notes[0]["validation_calls"] <= notes[0]["validation_calls_all_studies"]


def test_a_finding_not_assessed_is_never_reported_present(tiny_package, tmp_path):
    import shutil

    import pydicom

    from operators.contract.scoring import ZeroShotModel
    from operators.sr import read_findings, write_sr
    from tests.dicom_cases import small_study

    pkg_dir = tmp_path / "pkg"
    shutil.copytree(tiny_package["pkg"], pkg_dir)
    manifest = json.loads((pkg_dir / "manifest.json").read_text())
    for i, f in enumerate(manifest["findings"]):
        f["threshold"] = 1e-30  # every probability reaches it (the scorer clips at sigmoid(-60))
        f["assessed"] = i % 2 == 0
    (pkg_dir / "manifest.json").write_text(json.dumps(manifest))
    pkg = load_package(pkg_dir)
    model = ZeroShotModel(pkg, device="cpu")
    emb = np.random.default_rng(0).normal(size=(5, pkg.embedding_dim)).astype(np.float32)
    for f in model.decide(emb):
        assert list(f.present) == [i % 2 == 0 for i in range(len(f.ids))]
    from operators.sr import build_sr

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in small_study(tmp_path, "study")]
    sr = build_sr(headers, model.decide(emb[:1])[0], pkg)
    back = read_findings(write_sr(sr, tmp_path / "sr", "SR.dcm"))
    for i, fid in enumerate(pkg.catalogue.ids):
        assert back[fid]["assessed"] == (i % 2 == 0) and back[fid]["present"] == (i % 2 == 0)


def test_merlin_rule_probability_is_the_two_way_softmax():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(4, 8))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    prom = rng.normal(size=(5, 8))
    prom /= np.linalg.norm(prom, axis=1, keepdims=True)
    from operators.contract.prompts import FindingRows

    rows = [FindingRows((0, 2), (2, 5))]
    margins, probs = finding_scores(img, prom, rows, 12.5)
    sp, sn = (img @ prom[:2].T).mean(1), (img @ prom[2:].T).mean(1)
    soft = np.exp(12.5 * sp) / (np.exp(12.5 * sp) + np.exp(12.5 * sn))
    assert np.allclose(probs[:, 0], soft) and np.allclose(margins[:, 0], sp - sn)


def test_onnx_benchmark_smoke(tmp_path):
    """The benchmark command's structure, on a small architecture (the real run: python -m benchmarks.bench_onnx)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_onnx",
            "--out",
            str(tmp_path),
            "--runs",
            "2",
            "--arch",
            "resnet10_tiny",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "onnx_vs_torch.json").read_text())
    assert set(r["median_s"]) == {"onnxruntime", "torch_eager"} and all(len(v) == 2 for v in r["all_s"].values())
    assert r["parity_max_abs_diff"] < 1e-4 and r["speedup_torch_over_onnxruntime"] > 0
    assert "torch / ONNX Runtime" in (tmp_path / "onnx_vs_torch.md").read_text()
