"""The SR template (operators.sr_template) writes the document highdicom builds (operators.sr.build_sr).

The validators run on the pipeline's SRs, which come from the template (tests/deploy/test_app.py,
test_custom_findings.py), so they are not run again here."""

import dataclasses

import numpy as np
import pydicom
import pytest

from operators.contract.dicom_series import scan_tree
from operators.contract.package import default_package_dir, load_package
from operators.contract.scoring import ZeroShotModel
from operators.sr import build_sr, read_findings, write_sr
from operators.sr_template import CONTENT_SEQUENCE, template_for
from tests.dicom_cases import small_study, without_stamps


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr-template")
    small_study(root / "in", "TPL", n=20, shape=(16, 16))
    ((_, series),) = scan_tree(root / "in").studies().items()
    pkg = load_package(default_package_dir())
    model = ZeroShotModel(pkg, device="cpu")
    emb = np.random.default_rng(0).normal(size=(3, pkg.embedding_dim)).astype(np.float32)
    return root, series[0].headers, pkg, model.decide(emb)


@pytest.mark.parametrize("pattern", ["as-scored", "all-present", "all-absent"])
def test_fast_sr_equals_highdicom_sr(case, pattern):
    root, headers, pkg, scored = case
    findings = scored[0]
    if pattern != "as-scored":  # every assessed finding present, or none (undetermined stay undetermined)
        present = findings.assessed & (pattern == "all-present")
        findings = dataclasses.replace(findings, present=present)
    earlier = pydicom.dcmread(write_sr(build_sr(headers, scored[1], pkg, template=False), root / "earlier", "SR.dcm"))
    uids = ("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2")
    reference = build_sr(headers, findings, pkg, *uids, predecessors=[earlier], template=False)
    ref = write_sr(reference, root / f"ref-{pattern}", "SR.dcm")
    built = build_sr(headers, findings, pkg, *uids, predecessors=[earlier])
    assert built.get_item(CONTENT_SEQUENCE).is_raw  # the template's bytes, not a highdicom tree
    fast = write_sr(built, root / f"fast-{pattern}", "SR.dcm")
    a, b = (without_stamps(pydicom.dcmread(p)) for p in (ref, fast))
    assert a == b  # every element, the 30 groups' ~1,400 content items included
    assert read_findings(fast) == read_findings(ref)
    values = {v["present"] for k, v in read_findings(fast).items() if v["assessed"]}
    assert values == {"as-scored": {True, False}, "all-present": {True}, "all-absent": {False}}[pattern]


def test_one_template_per_package_and_decision_rule(case):
    _, _, pkg, scored = case
    assert template_for(pkg, scored[0]) is not None
    assert template_for(pkg, scored[0]) is template_for(pkg, scored[1])
    other = dataclasses.replace(scored[0], thresholds=scored[0].thresholds + 0.01)
    assert template_for(pkg, other) is not template_for(pkg, scored[0])


def test_groups_with_maps_go_into_the_template_whole(case):
    """Findings with a localisation map get their highdicom-built group inside the template's document: the
    same SR element for element as highdicom's own, it reads back with the map's frames and peak, and their
    groups come first (a viewer opens an SR at its first measurement)."""
    from operators.contract.dicom_series import series_geometry
    from operators.localisation import FindingMap, StudyMaps, build_seg
    from operators.sr import Location

    root, headers, pkg, scored = case
    findings = dataclasses.replace(scored[0], present=scored[0].assessed.copy())
    affine, order = series_geometry(headers, [f"instance {n}" for n in range(len(headers))])
    shape = (int(headers[0].Columns), int(headers[0].Rows), len(headers))
    mapped = [int(j) for j in np.flatnonzero(findings.present)[-2:]]  # not the first groups of the catalogue
    region = np.zeros(shape, dtype=bool)
    region[2:9, 3:12, 4:15] = True
    maps = StudyMaps(
        [FindingMap(j, findings.ids[j], region if k else ~region, (1.5, -2.0, 30.0 + k)) for k, j in enumerate(mapped)],
        affine,
    )
    seg, segments = build_seg(headers, maps, pkg, "1.2.826.0.1.3680043.8.498.3", "1.2.826.0.1.3680043.8.498.4")
    locations = {j: Location(seg, n, maps.maps[k].peak_lps) for k, (j, n) in enumerate(segments.items())}
    uids = ("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2")
    ref = write_sr(
        build_sr(headers, findings, pkg, *uids, template=False, locations=locations), root / "ref-maps", "SR.dcm"
    )
    built = build_sr(headers, findings, pkg, *uids, locations=locations)
    assert built.get_item(CONTENT_SEQUENCE).is_raw
    fast = write_sr(built, root / "fast-maps", "SR.dcm")
    assert without_stamps(pydicom.dcmread(ref)) == without_stamps(pydicom.dcmread(fast))
    back = read_findings(fast)
    for j in mapped:
        entry = back[findings.ids[j]]
        assert entry["map"]["seg"] == seg.SOPInstanceUID and entry["map"]["frames"] == locations[j].frames
        assert entry["peak_lps"] == pytest.approx(locations[j].peak_lps)
    assert all("map" not in v for fid, v in back.items() if fid not in {findings.ids[j] for j in mapped})
    others = [f for j, f in enumerate(findings.ids) if j not in mapped]
    assert list(back) == [findings.ids[j] for j in mapped] + others


def _procedure(sr: pydicom.Dataset) -> tuple[str, str, str]:
    (item,) = [e for e in sr.ContentSequence if e.ConceptNameCodeSequence[0].CodeValue == "121058"]
    code = item.ConceptCodeSequence[0]
    return code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning


def test_procedure_reported_from_the_study_else_the_site_else_loinc_and_the_site_uid_root(case, monkeypatch, capsys):
    """ "Procedure reported": the study's Procedure Code Sequence where usable, else ``$CTZS_PROCEDURE``, else
    LOINC 25045-6; the template writes what highdicom writes. ``$CTZS_UID_ROOT``: every derived UID under it."""
    from operators.cli import main
    from operators.pipeline import sr_uids

    root, headers, pkg, scored = case
    monkeypatch.delenv("CTZS_PROCEDURE", raising=False)
    assert _procedure(build_sr(headers, scored[0], pkg)) == ("LN", "25045-6", "CT unspecified body region")
    monkeypatch.setenv("CTZS_PROCEDURE", "LN^36813-4^CT Abdomen and Pelvis")
    assert _procedure(build_sr(headers, scored[0], pkg)) == ("LN", "36813-4", "CT Abdomen and Pelvis")
    own = [pydicom.Dataset() for _ in headers]
    for h, copy in zip(headers, own):
        copy.update(h)
        item = pydicom.Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "RPID16", "RADLEX", "CT ABD PELVIS W CONTRAST"
        copy.ProcedureCodeSequence = [item]
    uids = ("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2")
    fast = build_sr(own, scored[0], pkg, *uids)
    ref = build_sr(own, scored[0], pkg, *uids, template=False)
    assert _procedure(fast) == _procedure(ref) == ("RADLEX", "RPID16", "CT ABD PELVIS W CONTRAST")
    own[0].ProcedureCodeSequence[0].CodeValue = "X" * 40  # not a usable code: the site's instead
    assert _procedure(build_sr(own, scored[0], pkg))[1] == "36813-4"
    monkeypatch.setenv("CTZS_UID_ROOT", "1.2.840.99999.7")
    series, sop = sr_uids("1.2.3", "1.2.4", pkg.identity)
    assert series.startswith("1.2.840.99999.7.") and sop.startswith("1.2.840.99999.7.") and len(sop) <= 64
    sr = build_sr(headers, scored[0], pkg, series, sop)
    tracking = [str(e.value) for e in sr.iterall() if e.keyword == "UID" and str(e.value) != pkg.uid]
    assert len(tracking) == 30 and all(u.startswith("1.2.840.99999.7.") for u in tracking)  # the device: the model's
    for bad in ("1.02.3", "x", "1." + "2" * 60):
        assert main(["infer", str(root / "in"), "--out", str(root / "o"), "--uid-root", bad]) == 2
        assert "--uid-root" in capsys.readouterr().err
    assert main(["infer", str(root / "in"), "--out", str(root / "o"), "--procedure", "LN^x"]) == 2
    assert "SCHEME^VALUE^MEANING" in capsys.readouterr().err
