"""SRs at the cost of their values: a package's SR content built once, then filled in per study.

highdicom builds and validates the ~1,400 content items of the 30 measurement groups for every study
(0.4-0.5 s on this CPU: deep copies, and a search of the tree for evidence) and pydicom encodes them
again (0.15 s), yet per study only four values per finding change: the tracking UID, the qualitative
value (present / absent / undetermined), the certainty and the raw score (a parameter of it).
``SRTemplate`` builds the content once per package with highdicom itself, with unique placeholders for
those values (``sr.Placeholders``), encodes it once with undefined lengths (so a value of another length
goes in without recomputing any enclosing length; both forms are standard DICOM, PS3.5 7.5), and per
study joins the constant bytes with the encoded values. The document around the content (patient and
study from the source, evidence, UIDs, predecessors, equipment) is still built by highdicom for every
study, from a report with one group whose content is then replaced by the filled one. ``sr.build_sr``
uses it unless told not to (``template=False``, the reference) or a template cannot be made;
``tests/deploy/test_sr_template.py`` checks that the two documents, read back, are equal element for
element.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import highdicom as hd
import numpy as np
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DS

from .contract.package import ModelPackage
from .contract.scoring import Findings
from .sr import (
    ABSENT,
    PRESENT,
    PROCEDURE_CT,
    SR_CHARSET,
    UNDETERMINED,
    Placeholders,
    _group,
    _groups,
    _observation_context,
    _tracking_uid,
    _value,
    group_order,
    measurement_report,
    score_parameter,
)

CONTENT_SEQUENCE = Tag(0x0040, 0xA730)
_SQ_HEADER, _SQ_DELIMITER = 12, 8  # explicit VR: tag, "SQ", reserved, length; the sequence delimiter


def _encode(ds: Dataset) -> bytes:
    """``ds``'s elements as they are encoded inside an SR (explicit VR little endian, the SR's charset)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds, parent_encoding=SR_CHARSET)
    return fp.getvalue()


def _undefined_lengths(ds: Dataset) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
                _undefined_lengths(item)


def _with_undefined_lengths(item: Dataset) -> Dataset:
    """A copy of a content item as the template encodes it (every sequence of undefined length)."""
    import copy

    holder = Dataset()
    holder.ContentSequence = [copy.deepcopy(item)]
    _undefined_lengths(holder)
    return holder.ContentSequence[0]


def _uid(uid: str) -> bytes:
    ds = Dataset()
    ds.UID = uid
    return _encode(ds)


def _text(value: str) -> bytes:
    ds = Dataset()
    ds.TextValue = value
    return _encode(ds)


def _number(value: float) -> bytes:
    """The measured value's two elements as highdicom's NumContentItem sets them (FD, then DS by tag)."""
    ds = Dataset()
    ds.FloatingPointValue = value
    ds.NumericValue = DS(value, auto_format=True)
    return _encode(ds)


class SRTemplate:
    """The encoded content of one package's SR with a slot per study-dependent value."""

    def __init__(self, package: ModelPackage, findings: Findings):
        ph = Placeholders()
        context = _observation_context(package)
        groups = _groups(package, findings, "1.2.3", ph)  # placeholders replace every derived UID
        root = Dataset()
        report = measurement_report(context, groups, ph.procedure())
        root.ContentSequence = report[0].ContentSequence
        _undefined_lengths(root)
        encoded = _encode(root)
        body = encoded[_SQ_HEADER:-_SQ_DELIMITER]
        slots: list[tuple[int, int, int, str]] = []  # (start, end, finding, kind)
        n = len(package.catalogue)
        for j in range(n):
            for kind, needle in (
                ("uid", _uid(ph.uid(j))),
                ("code", _encode(ph.code(j))),
                ("number", _number(ph.number(j))),
                ("score", _text(ph.text(j))),
            ):
                at = body.find(needle)
                if at < 0 or body.find(needle, at + 1) >= 0:
                    raise ValueError(f"SR template: placeholder {kind} of finding {j} not found exactly once")
                slots.append((at, at + len(needle), j, kind))
        needle = _encode(ph.procedure())  # "procedure reported": the study's own code where it has one
        at = body.find(needle)
        if at < 0 or body.find(needle, at + 1) >= 0:
            raise ValueError("SR template: the procedure placeholder not found exactly once")
        slots.append((at, at + len(needle), -1, "procedure"))
        slots.sort()
        self.body = body
        self.slot_ranges = slots
        # each finding's group, as a byte range of the body: a study's group that references a map (which only
        # that study has) replaces it whole, and the slots inside it are not filled
        self.group_ranges: list[tuple[int, int]] = []
        for j, group in enumerate(groups):
            needle = _encode(_with_undefined_lengths(group[0]))
            at = body.find(needle)
            if at < 0 or body.find(needle, at + 1) >= 0:
                raise ValueError(f"SR template: the group of finding {j} not found exactly once")
            self.group_ranges.append((at, at + len(needle)))
        # a study's groups are moved into their SR order whole, so each value is inside its own group's range
        # (the procedure outside every group)
        for start, end, j, kind in slots:
            inside = [k for k, (gs, ge) in enumerate(self.group_ranges) if gs <= start and end <= ge]
            if inside != ([j] if j >= 0 else []):
                raise ValueError(f"SR template: the {kind} slot of finding {j} is not inside its group alone")
        self.package = package
        # The three qualitative values as highdicom encodes them in a CODE item's concept code.
        self.codes = {
            code: _encode(hd.sr.QualitativeEvaluation(name=code, value=code)[0].ConceptCodeSequence[0])
            for code in (PRESENT, ABSENT, UNDETERMINED)
        }
        # The document is built around a report with one group; its content is then replaced.
        self.stub = measurement_report(context, groups[:1])
        self.ids = [f.id for f in package.catalogue]

    def content(
        self, findings: Findings, sop_instance_uid: str, locations: dict | None = None, procedure=PROCEDURE_CT
    ) -> RawDataElement:
        """The Content Sequence of the study's SR, encoded. ``locations`` (``sr.Location`` by finding): those
        findings' groups are built by highdicom for this study and put in whole."""
        locations = locations or {}
        filled: dict[int, bytes] = {}  # each group's content, filled in
        for j, loc in locations.items():
            group = _group(self.package, findings, j, sop_instance_uid, None, loc)
            filled[j] = _encode(_with_undefined_lengths(group[0]))
        edits: dict[int, list[tuple[int, int, bytes]]] = {}  # by group (-1: outside the groups)
        for start, end, j, kind in self.slot_ranges:
            if j in locations:
                continue
            if kind == "procedure":
                value = _encode(procedure)
            elif kind == "uid":
                value = _uid(_tracking_uid(sop_instance_uid, self.ids[j]))
            elif kind == "code":
                value = self.codes[_value(findings, j)]
            elif kind == "score":
                value = _text(score_parameter(findings, j))
            else:
                value = _number(round(findings.certainty(j)[0] * 100.0, 4))
            edits.setdefault(j, []).append((start, end, value))
        for j, (start, end) in enumerate(self.group_ranges):
            if j not in filled:
                filled[j] = _joined(self.body, start, end, edits.get(j, []))
        # The groups' items are alike around their content (undefined lengths), so the groups go in their SR
        # order (``group_order``) by filling the items in turn; the rest of the content is filled in place.
        order = group_order(len(self.group_ranges), locations)
        outside = list(edits.get(-1, []))
        outside += [(start, end, filled[order[k]]) for k, (start, end) in enumerate(self.group_ranges)]
        body = _joined(self.body, 0, len(self.body), outside)
        return RawDataElement(CONTENT_SEQUENCE, "SQ", 0xFFFFFFFF, body, 0, False, True, True, False)


def _joined(body: bytes, start: int, end: int, edits: list[tuple[int, int, bytes]]) -> bytes:
    """``body[start:end]`` with each edit's range (inside it, not overlapping) replaced by its value."""
    parts, pos = [], start
    for s, e, value in sorted(edits):
        parts += [body[pos:s], value]
        pos = e
    parts.append(body[pos:end])
    return b"".join(parts)


_TEMPLATES: OrderedDict[tuple, SRTemplate | None] = OrderedDict()
_LOCK = threading.Lock()
_KEEP = 8  # packages (or findings-file views) whose templates are kept


def template_for(package: ModelPackage, findings: Findings) -> SRTemplate | None:
    """The package's template (made on first use; None where one cannot be made)."""
    key = (
        package.identity,
        package.name,
        package.version,
        tuple(f.id for f in package.catalogue),
        np.asarray(findings.thresholds, dtype=np.float64).tobytes(),
        np.asarray(findings.assessed, dtype=bool).tobytes(),
    )
    with _LOCK:
        if key not in _TEMPLATES:
            try:
                _TEMPLATES[key] = SRTemplate(package, findings)
            except ValueError:
                _TEMPLATES[key] = None
            while len(_TEMPLATES) > _KEEP:
                _TEMPLATES.popitem(last=False)
        _TEMPLATES.move_to_end(key)
        return _TEMPLATES[key]


def fill(
    sr: Dataset,
    template: SRTemplate,
    findings: Findings,
    sop_instance_uid: str,
    locations: dict | None = None,
    procedure=PROCEDURE_CT,
) -> bool:
    """Put the study's content into ``sr`` (built around ``template.stub``); False, leaving ``sr`` as it
    is, where the document is not encoded as the template is (explicit VR little endian, UTF-8)."""
    if sr.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian or sr.SpecificCharacterSet != SR_CHARSET:
        return False
    sr[CONTENT_SEQUENCE] = template.content(findings, sop_instance_uid, locations, procedure)
    # Declared as already in the file's encoding, so pydicom writes the content's bytes as they are
    # (otherwise it parses every raw element to re-encode it).
    sr.set_original_encoding(False, True, convert_encodings(SR_CHARSET))
    return True
