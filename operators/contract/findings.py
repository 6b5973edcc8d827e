"""The catalogue of the 30 findings of Merlin's zero-shot protocol.

The data lives in ``findings.json`` beside this module (project data written from the
reference facts); this module gives it types. Prompts are returned normalised with
Merlin's text normalisation, as the protocol scores them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from .textnorm import normalize_text

SECTIONS: tuple[str, ...] = (
    "lower thorax",
    "liver",
    "gallbladder",
    "spleen",
    "pancreas",
    "adrenal glands",
    "kidneys",
    "bowel",
    "peritoneum",
    "pelvic",
    "circulatory",
    "lymph nodes",
    "musculoskeletal",
)


@dataclass(frozen=True)
class Code:
    """A coded concept: (coding scheme designator, code value, code meaning)."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Finding:
    id: str
    display: str
    section: str  # one of SECTIONS, or "multiple" for findings that live in several systems
    code: Code
    positive_prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    site: Code | None = None  # anatomic site (SNOMED CT, from pydicom's DICOM code dictionary)


def _site(keyword: str | dict | None, fid: str) -> Code | None:
    """A site given as a pydicom code-dictionary keyword (the catalogue) or as a code (a manifest)."""
    if not keyword:
        return None
    if isinstance(keyword, dict):
        return Code(str(keyword["scheme"]), str(keyword["value"]), str(keyword["meaning"]))
    from pydicom.sr.codedict import codes

    try:
        c = getattr(codes.SCT, keyword)
    except AttributeError:
        raise ValueError(
            f"finding {fid!r}: site {keyword!r} is not a SNOMED CT keyword of pydicom's code dictionary"
        ) from None
    return Code(c.scheme_designator, c.value, c.meaning)


@dataclass(frozen=True)
class Catalogue:
    findings: tuple[Finding, ...]
    private_scheme: Code  # (designator, version, name) of the private coding scheme

    @property
    def ids(self) -> list[str]:
        return [f.id for f in self.findings]

    def __len__(self) -> int:
        return len(self.findings)

    def __iter__(self):
        return iter(self.findings)

    def by_id(self, finding_id: str) -> Finding:
        for f in self.findings:
            if f.id == finding_id:
                return f
        raise KeyError(f"unknown finding id {finding_id!r}; known: {', '.join(self.ids)}")


def finding_from_dict(item: dict, origin: str) -> Finding:
    """One finding of a catalogue or manifest; prompts normalised, duplicates dropped in order."""
    try:
        section = item["section"]
        if section not in SECTIONS and section != "multiple":
            raise ValueError(f"{origin}: finding {item['id']!r} has unknown section {section!r}")
        pos = tuple(dict.fromkeys(normalize_text(p) for p in item["positive_prompts"]))
        neg = tuple(dict.fromkeys(normalize_text(p) for p in item["negative_prompts"]))
        if not pos or not neg:
            raise ValueError(f"{origin}: finding {item['id']!r} needs positive and negative prompts")
        return Finding(
            id=item["id"],
            display=item["display"],
            section=section,
            code=Code(**item["code"]),
            positive_prompts=pos,
            negative_prompts=neg,
            site=_site(item.get("site"), item["id"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{origin}: malformed finding catalogue ({exc!r})") from exc


def finding_to_dict(f: Finding) -> dict:
    """A finding as a model package manifest records it (site as a code, prompts normalised)."""
    return {
        "id": f.id,
        "display": f.display,
        "section": f.section,
        "site": None if f.site is None else {"scheme": f.site.scheme, "value": f.site.value, "meaning": f.site.meaning},
        "code": {"scheme": f.code.scheme, "value": f.code.value, "meaning": f.code.meaning},
        "positive_prompts": list(f.positive_prompts),
        "negative_prompts": list(f.negative_prompts),
    }


def check_unique(findings, origin: str) -> None:
    ids = [f.id for f in findings]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{origin}: duplicate finding ids")


def _parse(data: dict, origin: str) -> Catalogue:
    try:
        ps = data["private_scheme"]
        findings = [finding_from_dict(item, origin) for item in data["findings"]]
        scheme = Code(ps["designator"], ps["version"], ps["name"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{origin}: malformed finding catalogue ({exc!r})") from exc
    check_unique(findings, origin)
    return Catalogue(tuple(findings), scheme)


@lru_cache(maxsize=1)
def load_catalogue() -> Catalogue:
    """The project's catalogue of Merlin's 30 findings, in label-column order."""
    text = resources.files(__package__).joinpath("findings.json").read_text(encoding="utf-8")
    return _parse(json.loads(text), "operators/contract/findings.json")
