"""Radiology reports in Merlin's style, and the 1 / 0 / -1 labels that go with them.

"FINDINGS:" is followed by organ-system sections ("Header: text.") whose headers vary in
spelling between reports (all spellings are ones ``training.reports`` maps to Merlin's 13
systems), then a numbered "IMPRESSION:". Present findings are described with severity and
laterality in varied phrasing; some absent findings are explicitly negated ("No
hydronephrosis."); quiet sections get a normal statement ("Unremarkable."). Labels follow the
text, as Merlin's do: 1 where the report states the finding, 0 where it negates it, -1 where it
does not mention it.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import yaml

from operators.contract.findings import SECTIONS, load_catalogue

from .patient import Patient

# The phrase tables are data (report_phrases.yaml, package data): headers by organ system, what a quiet
# section says, where each finding's sentence goes, the sentences that state and deny each finding,
# label-neutral filler and the impression's order.
_PHRASES = yaml.safe_load(resources.files("training.synth").joinpath("report_phrases.yaml").read_text())
HEADERS: dict[str, list[str]] = _PHRASES["headers"]
PELVIC_SPLIT: dict[str, list[str]] = _PHRASES["pelvic_split"]
NORMAL_STATEMENTS: list[str] = _PHRASES["normal_statements"]
REPORT_SECTION: dict[str, str] = _PHRASES["report_section"]
SIZE: dict[str, str] = _PHRASES["size"]
POSITIVE: dict[str, list[str]] = _PHRASES["positive"]
NEGATIVE: dict[str, list[str]] = _PHRASES["negative"]
FILLER: dict[str, list[str]] = _PHRASES["filler"]
IMPRESSION_ORDER: list[str] = _PHRASES["impression_order"]

# Merlin's 13 organ systems in report order, with the abdominal wall written after the peritoneum.
_AFTER_PERITONEUM = SECTIONS.index("peritoneum") + 1
ORDER = [*SECTIONS[:_AFTER_PERITONEUM], "abdominal wall", *SECTIONS[_AFTER_PERITONEUM:]]


def _fill(template: str, f, rng: np.random.Generator) -> str:
    sev, side = f.severity, f.side or "bilateral"
    mm = {"mild": rng.integers(12, 25), "moderate": rng.integers(25, 40), "severe": rng.integers(40, 65)}[sev]
    text = template.format(
        sev=sev,
        Sev=sev.capitalize(),
        size=SIZE[sev],
        Size=SIZE[sev].capitalize(),
        side=side,
        Side=side.capitalize(),
        mm=int(mm),
        pct={"mild": 35, "moderate": 50, "severe": 65}[sev],
    )
    if "{mm}" in template:  # the size the report states: corpus version 4 paints the lesion at it
        f.details["report_mm"] = int(mm)
    return text[0].upper() + text[1:]


def write_report(
    patient: Patient,
    rng: np.random.Generator,
    negation_rate: float = 0.45,
    quiet_rate: float = 0.5,
    omit_section_rate: float = 0.04,
) -> tuple[str, dict[str, int]]:
    """Return (findings text, labels {finding id: 1 / 0 / -1}) for ``patient``."""
    ids = load_catalogue().ids
    labels = {fid: -1 for fid in ids}
    body: dict[str, list[str]] = {s: [] for s in ORDER}
    for fid, f in patient.findings.items():
        if not f.reported:
            continue
        body[REPORT_SECTION[fid]].append(_fill(str(rng.choice(POSITIVE[fid])), f, rng))
        labels[fid] = 1
    # Sections without positives are either a bare normal statement ("Unremarkable.") or a list of
    # negations; only the latter set 0 labels.
    quiet = {sec for sec in ORDER if not body[sec] and rng.random() < quiet_rate}
    negated: list[str] = []
    for fid in ids:
        if fid in patient.findings or REPORT_SECTION[fid] in quiet:
            continue
        if fid == "prostatomegaly" and patient.sex == "F":
            continue
        if fid == "gallstones" and "surgically_absent_gallbladder" in patient.findings:
            continue
        if rng.random() < negation_rate:
            negated.append(fid)
    rng.shuffle(negated)
    for fid in negated:
        if fid == "metastatic_disease" and rng.random() < 0.5:
            continue  # said in the impression instead, below
        body[REPORT_SECTION[fid]].append(str(rng.choice(NEGATIVE[fid])))
        labels[fid] = 0
    parts = ["FINDINGS:"]
    for sec in ORDER:
        sentences = body[sec]
        if not sentences and sec in ("abdominal wall",) and rng.random() < 0.6:
            continue
        if not sentences and rng.random() < omit_section_rate:
            continue  # a missing section, as happens in real reports
        if not sentences:
            sentences = [str(rng.choice(NORMAL_STATEMENTS))]
            if sec in FILLER and rng.random() < 0.15:
                sentences = [str(rng.choice(FILLER[sec]))]
        elif sec in FILLER and rng.random() < 0.2:
            sentences.append(str(rng.choice(FILLER[sec])))
        if sec == "pelvic" and rng.random() < 0.5:
            b_hdr, o_hdr = PELVIC_SPLIT[patient.sex]
            organ = [s for s in sentences if "prostat" in s.lower()]
            rest = [s for s in sentences if s not in organ] or ["Unremarkable."]
            parts.append(f"{b_hdr}: {' '.join(rest)}")
            parts.append(f"{o_hdr}: {' '.join(organ) if organ else str(rng.choice(NORMAL_STATEMENTS))}")
            continue
        parts.append(f"{rng.choice(HEADERS[sec])}: {' '.join(sentences)}")
    impression = []
    for fid in IMPRESSION_ORDER:
        f = patient.findings.get(fid)
        if f is not None and f.reported and len(impression) < 5:
            impression.append(_fill(str(rng.choice(POSITIVE[fid])), f, rng))
    if "metastatic_disease" in negated and labels["metastatic_disease"] == -1:
        impression.append("No evidence of metastatic disease.")
        labels["metastatic_disease"] = 0
    if not impression:
        impression = [
            str(
                rng.choice(
                    ["No acute abnormality in the abdomen or pelvis.", "No acute intra-abdominal or pelvic process."]
                )
            )
        ]
    parts.append("IMPRESSION: " + " ".join(f"{i}. {s}" for i, s in enumerate(impression, 1)))
    sep = "\n" if rng.random() < 0.5 else " "
    return sep.join(parts), labels
