"""Report text: Merlin's organ-system sections and the normal / abnormal call per section.

A findings text ("FINDINGS: Lower thorax: ... Liver and biliary tree: ... IMPRESSION: 1. ...")
is split at its headers into Merlin's 13 systems (header spellings in ``HEADER_TO_SYSTEM``;
several headers may feed one system, e.g. "Bladder" and "Prostate and seminal vesicles" both
feed "pelvic"). Unknown headers end the previous section without starting one; the impression
is kept apart. A section is *normal* when no sentence of it states a finding: denials ("No
hydronephrosis.") and normal descriptions ("The heart is normal in size.") state none. That is the
rule the balanced samplers use (``sampler.section_rule``); the early-training study's rule, normal
only when every sentence is a stock phrase ("Normal.", "Unremarkable."), stays as ``stock``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from operators.contract.findings import SECTIONS
from operators.contract.textnorm import NORMAL_STATEMENTS, normalize_text, states_finding
from operators.contract.textnorm import keep_sentences as keep_sentences  # re-exported for the training side


class ReportError(ValueError):
    """A report cannot be used; the message names the study and the problem."""


# Header spelling (lowercase, single spaces) -> system. From Merlin's mapping, plus common variants.
HEADER_TO_SYSTEM: dict[str, str] = {
    **{h: "lower thorax" for h in ["lower thorax", "lower chest", "lung bases", "thorax", "chest", "lungs"]},
    **{
        h: "liver"
        for h in [
            "liver",
            "liver and biliary tree",
            "biliary system",
            "liver/biliary tree",
            "liver and biliary system",
            "hepatobiliary",
            "biliary tree",
            "liver & biliary tree",
        ]
    },
    **{h: "gallbladder" for h in ["gallbladder", "gall bladder"]},
    "spleen": "spleen",
    "pancreas": "pancreas",
    **{h: "adrenal glands" for h in ["adrenal glands", "adrenals", "adrenal gland", "adrenal"]},
    **{
        h: "kidneys"
        for h in [
            "kidneys",
            "kidneys and ureters",
            "gu",
            "kidneys/ureters",
            "kidney",
            "kidneys, ureters",
            "genitourinary",
            "urinary tract",
        ]
    },
    **{
        h: "bowel"
        for h in [
            "gastrointestinal tract",
            "gi",
            "gi tract",
            "bowel",
            "bowel/mesentery",
            "bowel and mesentery",
            "stomach and bowel",
            "gastrointestinal",
        ]
    },
    **{
        h: "peritoneum"
        for h in [
            "peritoneal space",
            "peritoneal cavity",
            "peritoneum",
            "abdominal wall",
            "peritoneum/retroperitoneum",
            "retroperitoneum",
        ]
    },
    **{
        h: "pelvic"
        for h in [
            "pelvic organs",
            "bladder",
            "prostate and seminal vesicles",
            "pelvis",
            "uterus and ovaries",
            "prostate",
            "reproductive organs",
            "urinary bladder",
            "uterus and adnexa",
        ]
    },
    **{h: "circulatory" for h in ["vasculature", "vessels", "vascular", "vascular structures"]},
    **{h: "lymph nodes" for h in ["lymph nodes", "lymphatics", "lymph node", "nodes"]},
    **{
        h: "musculoskeletal"
        for h in [
            "musculoskeletal",
            "bones",
            "osseous structures",
            "bones and soft tissues",
            "bones/soft tissues",
            "skeleton",
            "osseous",
        ]
    },
}
assert set(HEADER_TO_SYSTEM.values()) == set(SECTIONS)

# A header: at the start of the text or of a line, or after a sentence end; 1-6 words; then ':'.
_HEADER = re.compile(r"(?:^|(?<=[.;\n]))[ \t]*\n?[ \t]*([A-Za-z][A-Za-z/&,\- ]{0,60}?)[ \t]*:", re.M)
_FINDINGS = re.compile(r"\bfindings\s*:", re.I)
_IMPRESSION = re.compile(r"\b(?:impression|conclusion|summary)\s*:", re.I)


@dataclass
class ParsedReport:
    findings: str  # the findings text without the "FINDINGS:" marker and without the impression
    sections: dict[str, str] = field(default_factory=dict)  # system -> body text (original case)
    impression: str = ""
    unknown_headers: list[str] = field(default_factory=list)


def _header_key(h: str) -> str:
    return " ".join(h.lower().replace(" / ", "/").split())


def parse_report(text: str, source: str = "<report>") -> ParsedReport:
    """Split a Merlin-style report into findings, sections and impression.

    Raises ``ReportError`` when the text has no FINDINGS section (after an optional preamble).
    """
    if not isinstance(text, str) or not text.strip():
        raise ReportError(f"{source}: empty report text")
    m = _FINDINGS.search(text)
    if m is None:
        raise ReportError(f"{source}: report has no 'FINDINGS:' section")
    rest = text[m.end() :]
    imp = _IMPRESSION.search(rest)
    findings = rest[: imp.start()] if imp else rest
    impression = rest[imp.end() :].strip() if imp else ""
    out = ParsedReport(findings=" ".join(findings.split()), impression=" ".join(impression.split()))
    bodies: dict[str, list[str]] = {}
    heads = []
    for h in _HEADER.finditer(findings):
        words = h.group(1).split()
        if 1 <= len(words) <= 6:
            heads.append(h)
    for i, h in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(findings)
        body = " ".join(findings[h.end() : end].split())
        key = _header_key(h.group(1))
        system = HEADER_TO_SYSTEM.get(key)
        if system is None:
            out.unknown_headers.append(h.group(1).strip())
            continue
        if body:
            bodies.setdefault(system, []).append(body)
    out.sections = {s: " ".join(bodies[s]) for s in SECTIONS if s in bodies}
    return out


def _sentences(body: str) -> list[str]:
    return [s for s in (normalize_text(p) for p in re.split(r"[.;\n]+", body)) if s]


SECTION_RULES = ("finding", "stock")


def is_normal_section(body: str, rule: str = "finding") -> bool:
    """True when the section states no finding. ``rule="finding"``: no sentence states a finding
    (denials such as "No hydronephrosis." are normal); ``rule="stock"``: every sentence is a stock
    normal phrase ("Normal.", "Unremarkable."), the rule of the early-training study, under which a
    section that only denies findings counted as abnormal."""
    sents = [s.strip(" ,:-") for s in _sentences(body)]
    sents = [s for s in sents if s]
    if rule == "stock":
        return bool(sents) and all(s in NORMAL_STATEMENTS for s in sents)
    if rule != "finding":
        raise ValueError(f"section rule must be one of {SECTION_RULES}, got {rule!r}")
    return bool(sents) and not any(states_finding(s) for s in sents)


def section_status(report: ParsedReport, rule: str = "finding") -> dict[str, str]:
    """system -> "normal" | "abnormal" for every section present in the report."""
    return {s: ("normal" if is_normal_section(b, rule) else "abnormal") for s, b in report.sections.items()}
