"""The typed model-package manifest: one writer and one reader, refusing with the file and the field."""

import copy
import json
import os
import shutil

import pytest

from operators.contract.manifest import Manifest, ManifestError
from operators.contract.package import MANIFEST, PackageError, default_package_dir, load_package, write_manifest
from operators.contract.prompts import prompt_table


@pytest.fixture(scope="module")
def demo_dict():
    return json.loads((default_package_dir() / MANIFEST).read_text())


def test_the_demo_manifest_round_trips_byte_for_byte(demo_dict):
    m = Manifest.from_dict(demo_dict)
    assert m.to_dict() == demo_dict
    assert json.dumps(m.to_dict(), indent=1) + "\n" == (default_package_dir() / MANIFEST).read_text()
    assert [e.rows for e in m.findings] == prompt_table(m.catalogue)[1]  # the table's layout
    older = copy.deepcopy(demo_dict)
    del older["model"]["intended_use"]  # packages written before it was stated still read back as written
    assert Manifest.from_dict(older).to_dict() == older


def test_a_package_that_states_no_intended_use_says_so(demo_copy):
    assert "not for diagnostic use" in load_package(demo_copy).intended_use
    m = json.loads((demo_copy / MANIFEST).read_text())
    del m["model"]["intended_use"]
    (demo_copy / MANIFEST).write_text(json.dumps(m))
    assert load_package(demo_copy).intended_use.startswith("not stated by the model package")


@pytest.mark.parametrize(
    "edit, field, problem",
    [
        (lambda d: d["model"].pop("uid"), "model.uid", "is missing"),
        (lambda d: d["model"].__setitem__("uid", "../../etc"), "model.uid", "valid DICOM UID"),
        (lambda d: d["model"].__setitem__("uid", "1." + "2" * 70), "model.uid", "valid DICOM UID"),
        (lambda d: d["model"].__setitem__("intended_use", "x" * 600), "model.intended_use", "1 to 512 characters"),
        (lambda d: d["model"].__setitem__("intended_use", 3), "model.intended_use", "must be"),
        (lambda d: d["model"].__setitem__("evaluation", "0.9"), "model.evaluation", "must be an object"),
        (lambda d: d.__setitem__("embedding_dim", "128"), "embedding_dim", "must be an integer"),
        (lambda d: d.__setitem__("embedding_dim", True), "embedding_dim", "must be an integer"),
        (lambda d: d.__setitem__("logit_scale", -1.0), "logit_scale", "positive"),
        (lambda d: d["prompt_embeddings"].__setitem__("shape", [376, 64]), "prompt_embeddings.shape", "width 64"),
        (lambda d: d["findings"][3].__setitem__("threshold", 1.2), "findings[3].threshold", "probability"),
        (lambda d: d["findings"][3].__setitem__("assessed", "yes"), "findings[3].assessed", "true or false"),
        (
            lambda d: d["findings"][2]["prompt_rows"].__setitem__("negative", [5, 2]),
            "findings[2].prompt_rows.negative",
            "row range",
        ),
        (
            lambda d: d["findings"][0].__setitem__("positive_prompts", []),
            "findings[0].positive_prompts",
            "at least one",
        ),
        (lambda d: d["findings"][1].pop("code"), "findings[1].code", "is missing"),
        (lambda d: d["image_encoder"].__setitem__("opset", "17"), "image_encoder.opset", "integer"),
        (lambda d: d.__setitem__("findings", []), "findings", "at least one"),
        (lambda d: d.__setitem__("format", "something-else"), "format", "ct-zeroshot-model-package"),
        (lambda d: d["text_encoder"].pop("inputs"), "text_encoder.inputs", "is missing"),
        (lambda d: d["findings"].__setitem__(2, "hepatomegaly"), "findings[2]", "must be an object"),
        (lambda d: d.__setitem__("logit_scale", float("nan")), "logit_scale", "finite number"),
        (lambda d: d["prompt_embeddings"].__setitem__("dtype", "float16"), "prompt_embeddings.dtype", "'float32'"),
        (
            lambda d: d["findings"][4].__setitem__("calibration", {"method": "platt", "a": -1.0, "b": 0.0}),
            "findings[4].calibration",
            "a must be >= 0",
        ),
        (lambda d: d["model"].__setitem__("name", "  "), "model.name", "non-empty string"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_the_field(demo_dict, edit, field, problem):
    d = copy.deepcopy(demo_dict)
    edit(d)
    with pytest.raises(ManifestError, match=problem) as err:
        Manifest.from_dict(d, origin="pkg/manifest.json")
    assert str(err.value).startswith(f"pkg/manifest.json: field {field!r}")


def test_a_manifest_of_a_newer_format_is_named_as_such(demo_dict):
    d = copy.deepcopy(demo_dict)
    d["format_version"] = 99
    d["findings"] = "a newer layout"
    with pytest.raises(ManifestError, match="format version 99 is newer than this ct-zeroshot reads"):
        Manifest.from_dict(d)


def test_a_duplicate_finding_id_is_refused(demo_dict):
    d = copy.deepcopy(demo_dict)
    d["findings"][1]["id"] = d["findings"][0]["id"]
    with pytest.raises(ManifestError, match="duplicate finding ids"):
        Manifest.from_dict(d)


@pytest.fixture
def demo_copy(tmp_path):
    dst = tmp_path / "pkg"
    shutil.copytree(default_package_dir(), dst)
    return dst


def test_files_listed_outside_the_package_are_refused(demo_copy, tmp_path):
    (tmp_path / "outside").mkdir()
    shutil.copy(demo_copy / "image_encoder.onnx", tmp_path / "outside" / "x.onnx")
    m = json.loads((demo_copy / MANIFEST).read_text())
    rec = m["files"].pop("image_encoder.onnx")
    m["files"]["../outside/x.onnx"] = rec
    m["image_encoder"]["file"] = "../outside/x.onnx"
    (demo_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(PackageError, match=r"'\.\./outside/x\.onnx' is not a relative path inside the package"):
        load_package(demo_copy)


def test_a_symlink_out_of_the_package_is_refused(demo_copy, tmp_path):
    target = tmp_path / "elsewhere.onnx"
    shutil.move(demo_copy / "image_encoder.onnx", target)
    os.symlink(target, demo_copy / "image_encoder.onnx")
    with pytest.raises(PackageError, match="image_encoder.onnx: a link or a path leading out of the package"):
        load_package(demo_copy)


def test_the_writer_records_every_file_and_the_loader_reads_it_back(demo_copy):
    pkg = load_package(demo_copy)
    (demo_copy / MANIFEST).unlink()
    written = write_manifest(demo_copy, pkg.manifest.with_files({}))
    assert written.files == pkg.manifest.files
    assert load_package(demo_copy).manifest == pkg.manifest


def test_changed_weights_under_the_same_uid_change_the_sr_identity(demo_copy):
    import numpy as np

    from operators.pipeline import sr_uids

    before = load_package(demo_copy)
    emb = np.load(demo_copy / "prompt_embeddings.npy")
    emb[0, 0] += 0.01
    np.save(demo_copy / "prompt_embeddings.npy", emb)
    write_manifest(demo_copy, before.manifest.with_files({}))  # re-hashed, same name, version and UID
    after = load_package(demo_copy)
    assert after.uid == before.uid and after.identity != before.identity
    assert sr_uids("1.2.3", "1.2.4", after.identity) != sr_uids("1.2.3", "1.2.4", before.identity)
    assert load_package(default_package_dir()).identity == load_package(default_package_dir()).identity


def test_other_thresholds_for_the_same_weights_change_the_sr_identity(demo_copy):
    import dataclasses

    before = load_package(demo_copy)
    findings = list(before.manifest.findings)
    findings[0] = dataclasses.replace(findings[0], threshold=findings[0].threshold / 2)
    write_manifest(demo_copy, dataclasses.replace(before.manifest, findings=tuple(findings)).with_files({}))
    after = load_package(demo_copy)
    assert after.uid == before.uid and after.manifest.weights_digest == before.manifest.weights_digest
    assert after.decisions_digest != before.decisions_digest and after.identity != before.identity
