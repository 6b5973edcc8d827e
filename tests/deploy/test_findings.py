import json
from pathlib import Path

from operators.contract.findings import SECTIONS, load_catalogue
from operators.contract.textnorm import normalize_text

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "merlin_findings.json"


def test_thirty_findings_with_prompts_and_codes():
    cat = load_catalogue()
    assert len(cat) == 30
    assert len(set(cat.ids)) == 30
    schemes = {f.code.scheme for f in cat}
    assert schemes <= {"SCT", cat.private_scheme.scheme}
    for f in cat:
        assert f.section in SECTIONS or f.section == "multiple"
        assert f.positive_prompts and f.negative_prompts
        assert all(p == normalize_text(p) for p in f.positive_prompts + f.negative_prompts)
        assert f.code.value and f.code.meaning and f.display
        if f.code.scheme == "SCT":
            assert f.code.value.isdigit()
        assert len(f.code.value) <= 16  # DICOM SH


def test_private_scheme_is_declared():
    cat = load_catalogue()
    assert cat.private_scheme.scheme.startswith("99")  # DICOM private coding scheme designators
    assert any(f.code.scheme == cat.private_scheme.scheme for f in cat)


def test_matches_reference_order_and_prompts():
    if not REFERENCE.exists():
        import pytest

        pytest.skip("shared reference not present")
    ref = json.loads(REFERENCE.read_text())["findings"]
    cat = load_catalogue()
    assert cat.ids == [f["id"] for f in ref]
    for f, r in zip(cat, ref):
        assert list(f.positive_prompts) == list(dict.fromkeys(normalize_text(p) for p in r["positive"]))
        assert f.section == r["section"]
        if r["snomed"]:
            assert (f.code.scheme, f.code.value) == ("SCT", r["snomed"]["code"])
        else:
            assert f.code.scheme != "SCT"
