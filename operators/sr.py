"""DICOM SR for zero-shot findings: Comprehensive 3D SR, TID 1500 (Measurement Report), via highdicom.

Written with highdicom rather than the App SDK's ``DICOMTextSRWriterOperator``, which makes a Basic
Text SR with one free-text item (no coded findings; see ``shared/reference/deploy.md``). The document
follows IHE AI Results:

- observer: a device (the model: name, version, the package UID as device UID);
- procedure reported: the study's own Procedure Code Sequence, else a configured code
  (``$CTZS_PROCEDURE``), else LOINC 25045-6 "CT unspecified body region";
- one *Measurements and Qualitative Evaluations* group per finding (those with a map's peak first, then
  the others, each in catalogue order: ``group_order``): tracking
  identifier (the finding id and a UID derived from the SR's SOP Instance UID and the id, so the same
  study and model give the same document), finding type (the finding's code), finding site where the
  catalogue gives one, algorithm identification (name, version, threshold and rule as parameters), a
  qualitative evaluation (finding code = Present SCT 52101004 / Absent SCT 272519000, or Undetermined
  SCT 373068000 for a finding the package marks not assessed) and the
  measurement "Certainty of Finding" (DCM 111012) = the calibrated probability of presence in % (Platt
  scaling fitted on validation at export or by ``ct-zeroshot-train calibrate``; the raw score and the
  method are the measurement's algorithm parameters; a finding without a calibration states its raw
  score, marked uncalibrated);
- for a present finding with a localisation map (``operators.localisation``): the group's source images are
  the frames of its segment in the study's map SEG, and the certainty is INFERRED FROM the map's peak, a
  SCOORD3D POINT in the CT's frame of reference (TID 1501 has no segment reference, and a TID 1411 group
  beside it fails PixelMed's TID 1500 rules);
- the algorithm also in Contributing Equipment (purpose 99IHE "Processing Algorithm"), whose
  Contribution Description states the model's intended use (``ModelPackage.intended_use``);
- the source series in the evidence (current requested procedure evidence), not in an image library;
- patient and study attributes copied from the source by highdicom, new series and instance UIDs,
  UTF-8 (ISO_IR 192), marked complete; the private coding scheme declared when used.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from . import __version__
from .contract.files import atomic_path
from .contract.findings import Code as FindingCode
from .contract.package import ModelPackage, is_embedded_demo
from .contract.scoring import Findings
from .contract.uids import derived_uid

PROCEDURE_CT = hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region")
PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
UNDETERMINED = codes.SCT.Undetermined  # a finding the package cannot assess (validation AUROC below its floor)
SR_SERIES_NUMBER = 9100
SR_SERIES_DESCRIPTION = "ct-zeroshot AI findings"
SR_CHARSET = "ISO_IR 192"  # UTF-8


@dataclass(frozen=True)
class Location:
    """Where a present finding is (``operators.localisation``): its segment in the study's map SEG and the
    map's peak in patient coordinates (LPS mm, the CT's frame of reference)."""

    seg: Dataset
    segment_number: int
    peak_lps: tuple[float, float, float]

    @property
    def frames(self) -> list[int]:
        """The SEG's frame numbers (1-based) that hold this segment."""
        shared = self.seg.SharedFunctionalGroupsSequence[0]
        frames = self.seg.PerFrameFunctionalGroupsSequence
        if "SegmentIdentificationSequence" in shared:  # one segment: identified once for every frame
            return list(range(1, len(frames) + 1))
        return [
            n
            for n, item in enumerate(frames, start=1)
            if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == self.segment_number
        ]


def _coded(code: FindingCode) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def build_sr(
    source: Sequence[Dataset],
    findings: Findings,
    package: ModelPackage,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    predecessors: Sequence[Dataset] = (),
    template: bool = True,
    device: str | None = None,
    locations: dict[int, Location] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for one study. ``source``: the headers of the series the model saw (pixel data not needed).
    ``predecessors``: earlier SRs of the study this one corrects (Predecessor Documents Sequence).
    ``template``: the content from the package's ``sr_template.SRTemplate`` (the same document, a tenth
    of the time); False builds all of it with highdicom (the reference the template is tested against).
    ``device``: where the image encoder ran (``cpu`` or ``cuda``), stated in the document.
    ``locations``: finding index -> where it is: the finding's group names the SEG's frames of its segment as
    its source images, and its certainty is inferred from the map's peak (SCOORD3D POINT in the CT's frame of
    reference). The SEG joins the evidence."""
    from .sr_template import fill, template_for

    if not source:
        raise ValueError("an SR needs the source series' headers")
    # Every UID inside the document derives from its SOP Instance UID (itself derived from the study,
    # the series and the model by the pipeline), so the same input and model give the same content.
    sop_instance_uid = sop_instance_uid or derived_uid(uuid.uuid4().hex)
    locations = locations or {}
    segs = {loc.seg.SOPInstanceUID: loc.seg for loc in locations.values()}
    evidence = [*source, *segs.values()]
    procedure = procedure_reported(source)
    tpl = template_for(package, findings) if template else None
    if tpl is not None:
        sr = _document(evidence, tpl.stub, package, series_instance_uid, sop_instance_uid, predecessors, device)
        if fill(sr, tpl, findings, sop_instance_uid, locations, procedure):
            return sr
    context = _observation_context(package)
    groups = _groups(package, findings, sop_instance_uid, locations=locations)
    report = measurement_report(context, groups, procedure)
    return _document(evidence, report, package, series_instance_uid, sop_instance_uid, predecessors, device)


class Placeholders:
    """Values that stand, in an ``SRTemplate``'s content, for what changes per study; each is unique in
    the encoded content, so the template can find and replace it (``operators.sr_template``)."""

    SCHEME = "99CTZSPH"

    def uid(self, j: int) -> str:
        return f"2.25.{10**30 + 7919 * (j + 1)}"

    def code(self, j: int) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(f"PH{j:06d}", self.SCHEME, f"placeholder {j}")

    def number(self, j: int) -> float:
        return 98765.4321 - j / 8  # exact in binary, so its DS and FD encodings are stable

    def text(self, j: int) -> str:
        return f"score=placeholder-{j:06d}"

    def procedure(self) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept("PHPROCEDURE", self.SCHEME, "placeholder procedure")


def _observation_context(package: ModelPackage) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=package.uid,
        name="ct-zeroshot",
        manufacturer_name="ct-zeroshot",
        model_name=f"{package.name} {package.version}",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )


def _value(findings: Findings, j: int) -> Code:  # pydicom's Code
    if not findings.assessed[j]:
        return UNDETERMINED
    return PRESENT if bool(findings.present[j]) else ABSENT


def _tracking_uid(sop_instance_uid: str, finding_id: str) -> str:
    return derived_uid(sop_instance_uid, "tracking", finding_id)


def measurement_report(
    context: hd.sr.ObservationContext, groups: list, procedure: hd.sr.CodedConcept = PROCEDURE_CT
) -> hd.sr.MeasurementReport:
    return hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=procedure, imaging_measurements=groups
    )


PROCEDURE_ENV = "CTZS_PROCEDURE"  # a site's procedure code, SCHEME^VALUE^MEANING, where a study has none


def procedure_reported(source: Sequence[Dataset]) -> hd.sr.CodedConcept:
    """ "Procedure reported": the study's own Procedure Code Sequence (0008,1032) where its first item is a
    usable code, else the configured one (``$CTZS_PROCEDURE``), else LOINC 25045-6 "CT unspecified body
    region". A code from a header is checked (value <= 16 characters, scheme and meaning present) before use."""
    for item in (source[0].get("ProcedureCodeSequence") or [])[:1] if source else []:
        value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "")).strip()
        scheme, meaning = (str(item.get(k, "")).strip() for k in ("CodingSchemeDesignator", "CodeMeaning"))
        if value and len(value) <= 16 and scheme and len(scheme) <= 16 and meaning and len(meaning) <= 64:
            return hd.sr.CodedConcept(value, scheme, meaning)
    configured = os.environ.get(PROCEDURE_ENV)
    return parse_procedure(configured) if configured else PROCEDURE_CT


def use_site_codes(uid_root: str | None, procedure: str | None, names=("uid_root", "procedure")) -> None:
    """A site's UID root and procedure code, checked (``names``: what the user wrote them as), for this
    process and the workers it starts: ``$CTZS_UID_ROOT`` and ``$CTZS_PROCEDURE``."""
    from .contract.uids import UID_ROOT_ENV, check_uid_root

    if uid_root:
        os.environ[UID_ROOT_ENV] = check_uid_root(uid_root, names[0])
    if procedure:
        parse_procedure(procedure, names[1])
        os.environ[PROCEDURE_ENV] = procedure


def parse_procedure(text: str, where: str = PROCEDURE_ENV) -> hd.sr.CodedConcept:
    """``SCHEME^VALUE^MEANING`` (e.g. ``LN^36813-4^CT Abdomen and Pelvis``) as a coded concept."""
    parts = [p.strip() for p in str(text).split("^")]
    if len(parts) != 3 or not all(parts) or len(parts[1]) > 16 or len(parts[0]) > 16 or len(parts[2]) > 64:
        raise ValueError(f"{where}: {text!r} is not SCHEME^VALUE^MEANING (value and scheme <= 16, meaning <= 64)")
    return hd.sr.CodedConcept(parts[1], parts[0], parts[2])


def _groups(
    package: ModelPackage,
    findings: Findings,
    sop_instance_uid: str,
    placeholders: Placeholders | None = None,
    locations: dict[int, Location] | None = None,
) -> list:
    """TID 1500's measurement groups, one per finding (``group_order``). ``placeholders`` (``SRTemplate``) stand
    in for the values that change from study to study: tracking UIDs, qualitative values and certainties.
    ``locations``: the findings whose group references their map (``build_sr``)."""
    locations = locations or {}
    return [
        _group(package, findings, j, sop_instance_uid, placeholders, locations.get(j))
        for j in group_order(len(package.catalogue), locations)
    ]


def group_order(n: int, located) -> list[int]:
    """The findings' groups in the SR: those with a location (a map's peak) first, then the others, each in
    catalogue order. A viewer that steps through an SR's measurements opens at its first (OHIF's SR viewport
    shows nothing while that one has no place on the images)."""
    return sorted(located) + [j for j in range(n) if j not in located]


def _group(
    package: ModelPackage,
    findings: Findings,
    j: int,
    sop_instance_uid: str,
    placeholders: Placeholders | None = None,
    loc: Location | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Finding ``j``'s measurement group (``_groups``)."""
    algorithm = f"{package.name}"
    f, entry = package.catalogue.findings[j], package.manifest.findings[j]
    code = _coded(f.code)
    selection = entry.threshold_selection or {}
    parameters = (
        [f"threshold={float(findings.thresholds[j]):.4f}", "rule=merlin-prompt-mean-softmax"]
        + ([] if findings.assessed[j] else ["assessed=false (validation AUROC below the package's floor)"])
        # a site's own finding: which wording decided (sha256 of its normalised prompts, 16 hex digits)
        + ([f"custom prompts sha256={selection['prompts_digest']}"] if selection.get("method") == "custom" else [])
    )
    algo = hd.sr.AlgorithmIdentification(name=algorithm, version=package.version, parameters=parameters)
    value: Code | hd.sr.CodedConcept
    if placeholders is None:
        value, tracking = _value(findings, j), _tracking_uid(sop_instance_uid, f.id)
        certainty, score = round(findings.certainty(j)[0] * 100.0, 4), score_parameter(findings, j)
    else:
        value, certainty, tracking = placeholders.code(j), placeholders.number(j), placeholders.uid(j)
        score = placeholders.text(j)
    # The certainty's own algorithm parameters: how it was made from the score, and the study's raw score.
    measured = hd.sr.AlgorithmIdentification(
        name=algorithm, version=package.version, parameters=[*parameters, certainty_method(entry), score]
    )
    peak, sources = None, None
    if loc is not None:
        # where: the certainty inferred from the map's peak, and the SEG's frames of this finding's segment as
        # the group's source images (TID 1501 has no segment reference; a TID 1411 group of the same finding
        # beside it fails PixelMed's TID 1500 rules)
        peak = [
            hd.sr.CoordinatesForMeasurement3D(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.asarray([loc.peak_lps], dtype=np.float64),
                frame_of_reference_uid=loc.seg.FrameOfReferenceUID,
            )
        ]
        sources = [
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=loc.seg.SOPClassUID,
                referenced_sop_instance_uid=loc.seg.SOPInstanceUID,
                referenced_frame_numbers=list(loc.frames),
            )
        ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking, identifier=f.id),
        finding_type=code,
        algorithm_id=algo,
        finding_sites=[hd.sr.FindingSite(_coded(f.site))] if f.site is not None else None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=code, value=value)],
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.CertaintyOfFinding,
                value=certainty,
                unit=codes.UCUM.Percent,
                algorithm_id=measured,
                referenced_coordinates=peak,
            )
        ],
        source_images=sources,
    )


def score_parameter(findings: Findings, j: int) -> str:
    """The study's raw score of finding ``j`` (the prompt-softmax probability the threshold applies to)."""
    return f"score={float(findings.probabilities[j]):.8f}"


def certainty_method(entry) -> str:
    """How the stated certainty was made: calibrated (Platt scaling on the labelled studies it was fitted on,
    with the certainty at the finding's threshold, its operating point), or the raw score."""
    cal = entry.calibration
    if cal is None:
        return "certainty=uncalibrated score (the package has no calibration for this finding)"
    point = float(entry.calibrated(entry.threshold)) * 100.0
    return (
        f"certainty=calibrated probability (Platt scaling, {cal.get('n', '?')} labelled studies); "
        f"operating point {point:.1f}%"
    )


def _document(
    source: Sequence[Dataset],
    report: hd.sr.MeasurementReport,
    package: ModelPackage,
    series_instance_uid: str | None,
    sop_instance_uid: str,
    predecessors: Sequence[Dataset],
    device: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The document around the report: patient and study from the source, evidence, equipment, UIDs."""
    schemes = [CodingSchemeIdentificationItem(designator="99IHE", name="IHE Radiology temporary codes")]
    uses_private = any(f.code.scheme == package.catalogue.private_scheme.scheme for f in package.catalogue)
    if uses_private:
        ps = package.catalogue.private_scheme
        schemes.append(CodingSchemeIdentificationItem(designator=ps.scheme, name=ps.meaning, version=ps.value))
    # highdicom only accepts purposes from CID 7005; IHE AI Results asks for its "Processing Algorithm"
    # (CID 7005 is extensible), so the equipment is built as processing equipment and the purpose replaced.
    equipment = hd.ContributingEquipment(
        manufacturer="ct-zeroshot",
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"{package.name} {package.version}",
        software_versions=f"ct-zeroshot {__version__}",
        contribution_description=contribution_description(package, device),
    )
    equipment.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    return hd.sr.Comprehensive3DSR(
        evidence=list(source),
        content=report,
        series_instance_uid=series_instance_uid or derived_uid(uuid.uuid4().hex),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer="ct-zeroshot",
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[equipment],
        previous_versions=list(predecessors) or None,
        coding_schemes=schemes,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=f"{package.name} {package.version}",
        software_versions=f"ct-zeroshot {__version__}",
        specific_character_set=SR_CHARSET,
    )


def contribution_description(package: ModelPackage, device: str | None = None) -> str:
    """The algorithm's contribution, where it ran, whether the embedded demo model decided, and the model's
    intended use as the package states it (ST: <= 1024)."""
    text = "zero-shot finding detection (image-text dual encoder, prompt similarities)"
    if device:
        text += f", image encoder on {DEVICE_NAMES.get(device, device)}"
    if is_embedded_demo(package):
        text += ", by the embedded demo model (trained on synthetic phantoms only)"
    return f"{text}. Intended use: {package.intended_use}"[:1024]


DEVICE_NAMES = {"cpu": "the CPU", "cuda": "a CUDA GPU"}


def read_intended_use(sr: Dataset) -> str | None:
    """The intended use an SR of this module states (from its Contributing Equipment)."""
    for item in sr.get("ContributingEquipmentSequence", []):
        desc = str(item.get("ContributionDescription", ""))
        if "Intended use: " in desc:
            return desc.split("Intended use: ", 1)[1]
    return None


def write_sr(sr: Dataset, out_dir: str | Path, name: str) -> Path:
    """Write atomically: a reader never sees a half-written SR under its final name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    with atomic_path(final) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return final


def _parameter(item: Dataset, prefix: str, default: float) -> float:
    """A numeric algorithm parameter of a content item (``score=0.877012``); ``default`` where absent (an SR
    written before the raw score was stated, whose certainty was the score)."""
    for child in item.get("ContentSequence", []):
        text = str(child.get("TextValue", ""))
        if text.startswith(prefix):
            return float(text[len(prefix) :])
    return default


def read_findings(path: str | Path) -> dict[str, dict]:
    """Read an SR back with highdicom: {tracking identifier (finding id): {code, present, certainty %, score (the
    raw score the threshold applies to), ...}}."""
    sr = hd.sr.srread(path)
    report = hd.sr.MeasurementReport.from_sequence([sr], is_root=True)
    out: dict[str, dict] = {}
    for g in report.get_image_measurement_groups():
        finding = g.finding_type
        if finding is None:
            raise ValueError("SR measurement group without a finding code")
        qual = g.get_qualitative_evaluations()[0]
        meas = g.get_measurements()[0]
        entry = {
            "code": (finding.scheme_designator, finding.value, finding.meaning),
            "present": qual.value == PRESENT,
            "assessed": qual.value != UNDETERMINED,
            "certainty": float(meas.value),
            "score": _parameter(meas[0], "score=", float(meas.value) / 100.0),
            "site": [s.value.value for s in g.finding_sites],
        }
        if meas.referenced_coordinates:  # the map's peak (a finding with a map)
            point = meas.referenced_coordinates[0]
            entry["peak_lps"] = tuple(float(v) for v in point.value[0])
            entry["frame_of_reference"] = str(point.ReferencedFrameOfReferenceUID)
        for src in g.source_images:  # the map: the SEG's frames of this finding's segment
            ref = src.ReferencedSOPSequence[0]
            frames = ref.get("ReferencedFrameNumber", [])
            frames = [int(frames)] if isinstance(frames, int) else [int(f) for f in frames]
            entry["map"] = {"seg": str(ref.ReferencedSOPInstanceUID), "frames": frames}
        out[str(g.tracking_identifier)] = entry
    return out
