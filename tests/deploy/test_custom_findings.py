"""Open-vocabulary findings: a site's findings file, checked, encoded once, scored and reported in the SR."""

import csv
import json
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from operators.contract.custom_findings import FindingsFileError, read_findings_file
from operators.contract.package import load_package
from operators.contract.scoring import ZeroShotModel, package_with_findings
from operators.pipeline import sr_filename, sr_uids
from operators.sr import read_findings
from tests.dicom_cases import small_study, study_uid
from tests.sr_validators import have_validators, validate_all

GOOD = """\
findings:
  - id: enlarged_liver
    display: Enlarged liver
    positive_prompts: ["the liver is enlarged", "enlarged liver"]
    negative_prompts: ["the liver is normal in size"]
    code: {scheme: SCT, value: "80515008", meaning: "Hepatomegaly"}
    site: Liver
  - id: violin_in_pelvis
    display: A violin in the pelvis
    positive_prompts: ["a violin in the pelvis"]
    negative_prompts: ["no violin in the pelvis"]
    threshold: 0.6
"""

BAD = {
    "no positive prompt": ("findings:\n  - id: a\n    negative_prompts: [x]\n", ":2: finding 'a': 'positive_prompts'"),
    "empty positive list": (
        "findings:\n  - id: a\n    positive_prompts: []\n    negative_prompts: [x]\n",
        ":2: finding 'a': 'positive_prompts' must list",
    ),
    "duplicate id": (
        "findings:\n  - {id: a, positive_prompts: [x], negative_prompts: [y]}\n"
        "  - {id: a, positive_prompts: [z], negative_prompts: [y]}\n",
        ":3: duplicate id 'a' (first on line 2)",
    ),
    "code without a scheme": (
        "findings:\n  - id: a\n    positive_prompts: [x]\n    negative_prompts: [y]\n"
        "    code: {value: '1', meaning: m}\n",
        "the code has no scheme",
    ),
    "bad id": ("findings:\n  - {id: 'Bad Id', positive_prompts: [x], negative_prompts: [y]}\n", ":2: 'id' must be"),
    "unknown key": (
        "findings:\n  - {id: a, positive_prompts: [x], negative_prompts: [y], colour: red}\n",
        ":2: unknown keys ['colour']",
    ),
    "threshold out of range": (
        "findings:\n  - {id: a, positive_prompts: [x], negative_prompts: [y], threshold: 1.5}\n",
        "'threshold' must be a probability in (0, 1)",
    ),
    "not YAML": ("findings: [a, b\n", "not valid YAML"),
    "no findings list": ("something: else\n", "expected a mapping with a non-empty list 'findings'"),
    "catalogue id in add mode": (
        "findings:\n  - {id: hepatomegaly, positive_prompts: [x], negative_prompts: [y]}\n",
        ":2: id 'hepatomegaly' is one of the model's findings",
    ),
    "backslash in display": (
        "findings:\n  - {id: a, display: 'a\\\\b', positive_prompts: [x], negative_prompts: [y]}\n",
        ":2: finding 'a': 'display' holds a backslash or a control character",
    ),
    "control character in a code meaning": (
        "findings:\n  - id: a\n    positive_prompts: [x]\n    negative_prompts: [y]\n"
        '    code: {scheme: SCT, value: "1", meaning: "m\\tx"}\n',
        ":2: finding 'a': the code holds a backslash or a control character",
    ),
    "id with a trailing newline": (
        'findings:\n  - {id: "a\\n", positive_prompts: [x], negative_prompts: [y]}\n',
        ":2: 'id' must be",
    ),
    "repeated key": (
        "findings:\n  - {id: a, id: b, positive_prompts: [x], negative_prompts: [y]}\n",
        "key 'id' given twice",
    ),
    "numeric code value": (
        "findings:\n  - id: a\n    positive_prompts: [x]\n    negative_prompts: [y]\n"
        "    code: {scheme: SCT, value: 0123, meaning: m}\n",
        "must be quoted text ('0123' keeps its 0)",
    ),
    "prompt longer than the encoder": (
        "findings:\n  - id: a\n    positive_prompts: ['" + "liver " * 200 + "']\n    negative_prompts: [y]\n",
        "tokens, more than the text encoder's",
    ),
}


def sr_values(ds) -> list[str]:
    """Every text value and code value in an SR's content tree."""
    out = []
    for item in ds.get("ContentSequence", []):
        out += [str(item.get("TextValue", "")), str(item.get("UID", ""))]
        for key in ("ConceptCodeSequence", "ConceptNameCodeSequence"):
            out += [str(c.CodeValue) for c in item.get(key, [])]
        out += sr_values(item)
    return [v for v in out if v]


def cli(*args, **kw):
    cmd = [sys.executable, "-m", "operators.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def test_a_findings_file_is_read_with_codes_sites_and_private_codes(tmp_path):
    (tmp_path / "f.yaml").write_text(GOOD)
    ff = read_findings_file(tmp_path / "f.yaml")
    liver, violin = (c.finding for c in ff.findings)
    assert (liver.code.scheme, liver.code.value, liver.site.value) == ("SCT", "80515008", "10200004")
    assert violin.code.scheme == "99CTZS" and violin.code.value.startswith("CZS") and len(violin.code.value) <= 16
    assert violin.positive_prompts == ("a violin in the pelvis",) and ff.findings[1].threshold == 0.6
    (tmp_path / "g.yaml").write_text(GOOD.replace('enlarged liver"]', 'enlarged liver", "big liver"]'))
    assert read_findings_file(tmp_path / "g.yaml").digest != ff.digest  # the wording is in the digest


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_findings_file_is_refused_with_its_line_and_nothing_written(case, tmp_path, tiny_package, capsys):
    """The command line's own entry point, in this process (a subprocess per case costs seconds of imports)."""
    from operators.cli import main

    text, expected = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["findings", "check", str(path), "--model", str(tiny_package["pkg"])]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and expected in err, err
    if case == "not YAML":  # the others fail the same way before anything is written
        out = tmp_path / "out"
        argv = ["infer", str(tmp_path), "--out", str(out), "--model", str(tiny_package["pkg"]), "--findings", str(path)]
        assert main([*argv, "--quiet"]) == 2
        assert "not valid YAML" in capsys.readouterr().err and not out.exists()


def test_custom_findings_are_scored_reported_and_change_the_sr_identity(tmp_path, tiny_package):
    """Added after the package's findings (same scores for those), encoded once per process, in the SR with
    their codes and the prompts' digest, in summary.csv, under another SR UID; replace mode keeps only them."""
    (tmp_path / "f.yaml").write_text(GOOD)
    pkg = load_package(tiny_package["pkg"])
    plain = ZeroShotModel(pkg, device="cpu")
    custom = ZeroShotModel(pkg, device="cpu", findings=tmp_path / "f.yaml")
    n = len(pkg.catalogue)
    assert custom.package.catalogue.ids == pkg.catalogue.ids + ["enlarged_liver", "violin_in_pelvis"]
    assert custom.package.identity != pkg.identity and custom.package.identity.startswith(pkg.identity)
    x = np.random.default_rng(0).random((2, *[1, *pkg.spec.spatial_size]), dtype=np.float32)
    emb = plain.embed_images(x)
    a, b = plain.decide(emb), custom.decide(emb)
    assert np.array_equal(a[0].probabilities, b[0].probabilities[:n])
    direct = plain.embed_texts(["the liver is enlarged", "enlarged liver", "the liver is normal in size"])
    sim = emb @ direct.T
    assert np.allclose(b[1].margins[n], sim[1, :2].mean() - sim[1, 2], atol=1e-5)
    replaced = package_with_findings(pkg, tmp_path / "f.yaml", "replace")
    assert replaced.catalogue.ids == ["enlarged_liver", "violin_in_pelvis"] and len(replaced.prompt_embeddings) == 5
    with pytest.raises(FindingsFileError, match="one of the model's findings"):
        (tmp_path / "clash.yaml").write_text(GOOD.replace("id: enlarged_liver", "id: hepatomegaly"))
        package_with_findings(pkg, tmp_path / "clash.yaml", "add")

    # Through ct-zeroshot infer: SR and summary carry them.
    files = small_study(tmp_path / "in", "CUSTOM1", n=10, shape=(20, 20))
    uid = study_uid(files[0])
    out = tmp_path / "out"
    findings = ["--findings", tmp_path / "f.yaml"]
    proc = cli("infer", tmp_path / "in", "--out", out, "--model", tiny_package["pkg"], *findings)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sr = out / "sr" / sr_filename(uid)
    found = read_findings(sr)
    assert list(found)[-2:] == ["enlarged_liver", "violin_in_pelvis"] and len(found) == n + 2
    values = sr_values(pydicom.dcmread(sr))
    assert sum(v.startswith("custom prompts sha256=") for v in values) == 4  # 2 findings x (finding, certainty)
    assert "80515008" in values and "violin_in_pelvis" in values
    header = next(csv.reader((out / "summary.csv").open()))
    assert "violin_in_pelvis.probability" in header and "enlarged_liver.present" in header
    meta = json.loads((out / "summary.json").read_text())["model"]
    assert meta["custom_findings"]["ids"] == ["enlarged_liver", "violin_in_pelvis"]
    written = pydicom.dcmread(sr)
    series = written.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID
    assert written.SOPInstanceUID == sr_uids(uid, series, custom.package.identity)[1]
    assert written.SOPInstanceUID != sr_uids(uid, series, pkg.identity)[1]  # other findings, another SR UID
    if have_validators():
        assert validate_all([sr], pixelmed_files=1) == {}
    report = cli("report", sr)
    assert report.returncode == 0 and "violin_in_pelvis" in report.stdout


def test_findings_check_prints_margins_over_studies(tmp_path, tiny_package):
    (tmp_path / "f.yaml").write_text(GOOD)
    for name in ("CHECK1", "CHECK02", "CHECK003"):  # other names, other noise
        small_study(tmp_path / "in", name, n=10, shape=(20, 20))
    proc = cli("findings", "check", tmp_path / "f.yaml", "--model", tiny_package["pkg"], "--studies", tmp_path / "in")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "margins (s+ - s-) over 3 studies" in proc.stdout and "violin_in_pelvis" in proc.stdout
    assert "follow most closely" in proc.stdout


def test_the_wording_check_runs_and_writes_its_comparisons(tmp_path, tiny_package):
    """Smoke test of ``python -m benchmarks.wording`` (docs/custom-findings.md: "Does the wording work?")."""
    (tmp_path / "f.yaml").write_text(GOOD)
    out = tmp_path / "wording.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.wording",
        "--package",
        tiny_package["pkg"],
        "--findings",
        tmp_path / "f.yaml",
    ]
    cmd += ["--data", tiny_package["data"], "--cache", tiny_package["cache"], "--out", out, "--quiet"]
    cmd += ["--against", "enlarged_liver=hepatomegaly", "--against", "violin_in_pelvis=*"]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    liver, violin = result["comparisons"]
    assert liver["against"] == "hepatomegaly" and "auroc_catalogue" in liver
    assert 0.0 <= violin["auroc_min"] <= violin["auroc_mean"] <= violin["auroc_max"] <= 1.0
    assert result["studies"] > 0 and result["split"] == "test"


def test_the_application_takes_the_findings_file_from_the_map_variables(tmp_path, tiny_package):
    """``python -m operators`` as a MAP runs it: CT_ZEROSHOT_FINDINGS / _MODE instead of options."""
    from tests.deploy.test_app import run_app

    (tmp_path / "f.yaml").write_text(GOOD)
    uid = study_uid(small_study(tmp_path / "in", "MAPVARS", n=10, shape=(20, 20))[0])
    env = {"CT_ZEROSHOT_FINDINGS": str(tmp_path / "f.yaml"), "CT_ZEROSHOT_FINDINGS_MODE": "replace"}
    proc = run_app("-i", tmp_path / "in", "-o", tmp_path / "out", "-m", tiny_package["pkg"], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(read_findings(tmp_path / "out" / sr_filename(uid))) == ["enlarged_liver", "violin_in_pelvis"]


def test_the_embedded_demo_model_encodes_a_sites_findings(tmp_path):
    """``ct-zeroshot infer --findings FILE`` with no model named: the embedded demo model carries its text
    encoder (int8), so a site's findings are encoded, scored and reported beside the 30."""
    import json
    import subprocess
    import sys

    from operators.contract.package import default_package_dir, load_package
    from operators.sr import read_findings
    from training.synth.corpus import SynthConfig, generate_corpus

    pkg = load_package(default_package_dir())
    assert pkg.text_encoder is not None
    quant = json.loads((default_package_dir() / "manifest.json").read_text())["provenance"]["text_encoder"]
    assert quant["quantization"]["decisions"]["changed_fraction"] <= 0.01
    generate_corpus(SynthConfig(out=str(tmp_path / "c"), studies=2, seed=7, dicom=True, version=3), progress=False)
    (tmp_path / "site.yaml").write_text(GOOD)
    proc = subprocess.run(
        [sys.executable, "-m", "operators.cli", "infer", str(tmp_path / "c" / "dicom"), "--out", str(tmp_path / "o")]
        + ["--findings", str(tmp_path / "site.yaml"), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    srs = sorted((tmp_path / "o" / "sr").glob("SR_*.dcm"))
    assert len(srs) == 2
    for sr in srs:
        back = read_findings(sr)
        assert len(back) == 32 and {"enlarged_liver", "violin_in_pelvis"} <= set(back)
        assert back["enlarged_liver"]["code"] == ("SCT", "80515008", "Hepatomegaly")
        assert 0 <= back["violin_in_pelvis"]["score"] <= 1
