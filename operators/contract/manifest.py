"""The model-package manifest as types, shared by the exporters (training side) and the loader.

``Manifest.to_dict`` is what ``manifest.json`` holds (the exporter writes nothing else);
``Manifest.from_dict`` is the only reader: it validates the document against pydantic models of
its shape (strict types, ranges, cross-field checks) and refuses a malformed one with ``ManifestError``
naming the file, the field and the value (``manifest.json: field 'findings[3].threshold' must be a
probability in (0, 1), got 1.2``), in the manner of highdicom's constructors that refuse an invalid
document rather than write or read one. ``provenance``, ``parity`` and a finding's ``threshold_selection``
are free-form records for readers (humans, ``recipe``); nothing downstream decides on them.

The prompt table: ``prompt_embeddings.npy`` is (P, D) float32; finding i's positive prompts are the
rows ``[findings[i].rows.positive[0], findings[i].rows.positive[1])``, its negatives likewise.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator

from .findings import Catalogue, Code, Finding, check_unique, finding_from_dict, finding_to_dict
from .preprocessing import PreprocessSpec
from .prompts import FindingRows  # the prompt table's layout
from .textnorm import KEEP_RULES
from .uids import is_valid_uid
from .validation import field_path

FORMAT = "ct-zeroshot-model-package"
FORMAT_VERSION = 1
INTENDED_USE_MAX = 512  # it goes into the SR's Contribution Description (ST, at most 1024 characters)
UNSTATED_USE = "not stated by the model package: research use only, not for diagnostic use"


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and the field."""


# ---- The document as pydantic models (strict: JSON's "17" is not the integer 17, true is not 1). They
# check the shape, types and ranges of what manifest.json holds; the dataclasses below are what the code
# uses. Unknown keys are ignored (a newer writer's additions); ``ManifestError`` words each refusal.


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    return value


Text = Annotated[str, AfterValidator(_non_blank)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


def _int_pair(value: list) -> bool:
    """Two integers (JSON's true and false are not integers)."""
    return len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def _span(value: list) -> list:
    if not _int_pair(value) or not 0 <= value[0] < value[1]:
        raise ValueError(f"must be a row range [a, b) with 0 <= a < b, got {value!r}")
    return value


Span = Annotated[list, AfterValidator(_span)]


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class _Header(_Wire):
    format: Any = None
    format_version: int

    @field_validator("format")
    @classmethod
    def _format(cls, value: Any) -> Any:
        if value != FORMAT:
            raise ValueError(f"must be {FORMAT!r}, got {value!r}")
        return value

    @field_validator("format_version")
    @classmethod
    def _version(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive integer, got {value!r}")
        return value


class _ModelWire(_Wire):
    name: Text
    version: Text
    uid: Text
    created: Text
    intended_use: Text | None = None
    evaluation: dict | None = None

    @field_validator("uid")
    @classmethod
    def _uid(cls, value: str) -> str:
        if not is_valid_uid(value):
            raise ValueError(f"must be a valid DICOM UID (digits and dots, <= 64 chars), got {value!r}")
        return value

    @field_validator("intended_use")
    @classmethod
    def _use(cls, value: str | None) -> str | None:
        if value is not None and len(value) > INTENDED_USE_MAX:
            raise ValueError(f"must be 1 to {INTENDED_USE_MAX} characters, got {len(value)}")
        return value


class _ImageEncoderWire(_Wire):
    file: Text
    input: Text
    output: Text
    input_shape: list
    dtype: Text
    opset: int
    dynamic_spatial: bool
    l2_normalised: bool
    localisation: Text | None = None


class _TextAbsentWire(_Wire):
    file: None = None
    absent_reason: Text | None = None


class _TextEncoderWire(_Wire):
    file: Text
    inputs: list[str]
    output: Text
    tokenizer: Text
    keep_sentences: str | None = None
    pad_token_id: int
    max_length: int
    sequence_length: int | None = None

    @field_validator("keep_sentences")
    @classmethod
    def _keep(cls, value: str | None) -> str | None:
        if value is not None and value not in KEEP_RULES:  # a rule this deploy does not know fails at the 1st prompt
            raise ValueError(f"must be one of {', '.join(KEEP_RULES)}, got {value!r}")
        return value


def _text_kind(value: Any) -> str:
    return "absent" if isinstance(value, dict) and value.get("file") is None else "present"


class _PromptTableWire(_Wire):
    file: Text
    shape: list
    dtype: str
    computed_with: Text

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: list) -> list:
        if not _int_pair(value) or min(value) <= 0:
            raise ValueError(f"must be [rows, dim] of positive integers, got {value!r}")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value != "float32":
            raise ValueError(f"must be 'float32', got {value!r}")
        return value


class _RowsWire(_Wire):
    positive: Span
    negative: Span


def _prompts(value: list) -> list:
    if not value or not all(isinstance(p, str) for p in value):
        raise ValueError("must list at least one prompt (strings)")
    return value


Prompts = Annotated[list, AfterValidator(_prompts)]


def _calibration(value: dict | None) -> dict | None:
    if value is None:
        return None
    if value.get("method") != "platt":
        raise ValueError(f"method must be 'platt', got {value.get('method')!r}")
    for key in ("a", "b"):
        v = value.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{key} must be a finite number, got {v!r}")
    if value["a"] < 0:
        raise ValueError(f"a must be >= 0 (a certainty that falls as the score rises), got {value['a']}")
    return value


class _FindingWire(_Wire):
    id: Text
    display: Text
    section: Text
    code: dict
    positive_prompts: Prompts
    negative_prompts: Prompts
    prompt_rows: _RowsWire
    threshold: Finite
    assessed: bool | None = None
    threshold_selection: dict | None = None
    calibration: Annotated[dict | None, AfterValidator(_calibration)] = None

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(f"must be a probability in (0, 1), got {value}")
        return value


class _DecisionWire(_Wire):
    rule: Text
    threshold_method: Text


class _SchemeWire(_Wire):
    designator: Text
    version: Text
    name: Text


class _ManifestWire(_Header):
    model: _ModelWire
    preprocessing: dict
    image_encoder: _ImageEncoderWire
    text_encoder: Annotated[
        Annotated[_TextAbsentWire, Tag("absent")] | Annotated[_TextEncoderWire, Tag("present")],
        Discriminator(_text_kind),
    ]
    embedding_dim: int
    log_logit_scale: Finite | None = None
    logit_scale: Finite
    text_normalisation: Text | None = None
    prompt_embeddings: _PromptTableWire
    decision: _DecisionWire
    private_scheme: _SchemeWire
    findings: list[_FindingWire] = Field(min_length=1)
    provenance: dict | None = None
    parity: dict | None = None
    files: dict | None = None

    @field_validator("logit_scale")
    @classmethod
    def _scale(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"must be a positive number, got {value}")
        return value


_EXPECTED = {
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "string_type": "must be a non-empty string",
    "float_type": "must be a finite number",
    "finite_number": "must be a finite number",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "list_type": "must be a list",
    "none_required": "must be null",
}


def _refusal(origin: str, exc: ValidationError) -> ManifestError:
    """pydantic's errors in the house's words: ``origin: field 'a.b[3].c' what it must be, got value``."""
    parts = []
    for err in exc.errors(include_url=False):
        where = field_path(err["loc"], tags=("absent", "present"))  # the text encoder's union tags
        kind, value = err["type"], err.get("input")
        if kind == "missing":
            problem = "is missing"
        elif kind == "too_short" and where == "findings":
            problem = "must list at least one finding"
        elif kind in _EXPECTED:
            problem = f"{_EXPECTED[kind]}, got {str(value)[:80]!r}"
        else:  # the validators' own words
            problem = err["msg"].removeprefix("Value error, ")
        parts.append(f"field {where or '(top level)'!r} {problem}")
    more = f"; and {len(parts) - 3} more" if len(parts) > 3 else ""
    return ManifestError(f"{origin}: {'; '.join(parts[:3])}{more}")


def _validated(wire: type[_Wire], data: Any, origin: str) -> Any:
    try:
        return wire.model_validate(data)
    except ValidationError as exc:
        raise _refusal(origin, exc) from None


def weights_digest(sha256_by_file: dict[str, str]) -> str:
    """sha256 over the deciding files' names and sha256: an exported package's model UID derives from it,
    and SR UIDs from the UID and it, so changed weights never reuse an SR UID."""
    h = hashlib.sha256()
    for rel in sorted(sha256_by_file):
        h.update(f"{rel}:{sha256_by_file[rel]}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    uid: str  # a DICOM UID: the SR's device UID and part of every SR's derived UIDs
    created: str
    intended_use: str | None = None  # stated in every SR and summary; optional (older packages lack it)
    evaluation: dict | None = None  # the held-out figures (``ct-zeroshot-train heldout``); optional

    @classmethod
    def from_wire(cls, w: _ModelWire) -> ModelIdentity:
        return cls(w.name, w.version, w.uid, w.created, w.intended_use, w.evaluation)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        for key in ("intended_use", "evaluation"):
            if d[key] is None:
                del d[key]  # a package that states none reads back byte for byte
        return d


@dataclass(frozen=True)
class ImageEncoderRecord:
    file: str
    input: str = "image"
    output: str = "embedding"
    input_shape: tuple = ("batch", 1, "x", "y", "z")
    dtype: str = "float32"
    opset: int = 17
    dynamic_spatial: bool = True
    l2_normalised: bool = True
    # The output (B, D, x, y, z) whose spatial mean is the embedding: each location's joint-space features
    # (``training.onnx_export.localisation_features``), the localisation maps' source. Optional: packages of
    # towers without one (and older packages) lack it, and maps are then not available.
    localisation: str | None = None

    @classmethod
    def from_wire(cls, w: _ImageEncoderWire) -> ImageEncoderRecord:
        return cls(
            w.file,
            w.input,
            w.output,
            tuple(w.input_shape),
            w.dtype,
            w.opset,
            w.dynamic_spatial,
            w.l2_normalised,
            w.localisation,
        )

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["input_shape"] = list(self.input_shape)
        if d["localisation"] is None:
            del d["localisation"]  # a package without maps reads back byte for byte
        return d


@dataclass(frozen=True)
class TextEncoderRecord:
    """The ONNX text encoder and its tokenizer, or (``file`` None) why the package has none."""

    file: str | None
    absent_reason: str | None = None
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    output: str = "embedding"
    tokenizer: str | None = None
    keep_sentences: str = "all"  # the text rule the tower was trained with (operators.contract.textnorm)
    pad_token_id: int = 0
    max_length: int = 0
    sequence_length: int | None = None  # fixed traced length (Longformer), None: dynamic

    @classmethod
    def from_wire(cls, w: _TextAbsentWire | _TextEncoderWire) -> TextEncoderRecord:
        if isinstance(w, _TextAbsentWire):
            return cls(None, w.absent_reason or "not exported")
        return cls(
            w.file,
            None,
            tuple(w.inputs),
            w.output,
            w.tokenizer,
            w.keep_sentences or "all",
            w.pad_token_id,
            w.max_length,
            w.sequence_length,
        )

    @property
    def files(self) -> list[str]:
        """The encoder and its tokenizer, or nothing when the package has no text encoder."""
        return [self.file, self.tokenizer] if self.file is not None and self.tokenizer is not None else []

    def to_dict(self) -> dict:
        if self.file is None:
            return {"file": None, "absent_reason": self.absent_reason}
        d = dict(self.__dict__)
        del d["absent_reason"]
        d["inputs"] = list(self.inputs)
        return d


@dataclass(frozen=True)
class PromptTable:
    file: str
    shape: tuple[int, int]
    dtype: str = "float32"
    computed_with: str = "torch reference model"

    @classmethod
    def from_wire(cls, w: _PromptTableWire) -> PromptTable:
        return cls(w.file, (w.shape[0], w.shape[1]), w.dtype, w.computed_with)

    def to_dict(self) -> dict:
        return {**self.__dict__, "shape": list(self.shape)}


@dataclass(frozen=True)
class FindingEntry:
    """A finding, its rows in the prompt table and its decision (threshold; ``assessed`` false where
    validation showed the model cannot tell it apart: then never reported present)."""

    finding: Finding
    rows: FindingRows
    threshold: float = 0.5
    assessed: bool = True
    threshold_selection: dict | None = None
    # How a score becomes the certainty an SR states (``calibrated``): Platt scaling fitted on labelled
    # validation studies, {"method": "platt", "a": >= 0, "b", "n", "positives", ...}; None: uncalibrated.
    calibration: dict | None = None

    def calibrated(self, probability):
        """The calibrated probability that the finding is present: sigmoid(a * logit(p) + b) (monotone in p,
        so a finding called absent never states more certainty than its threshold's); None without a
        calibration."""
        import numpy as np

        if self.calibration is None:
            return None
        p = np.clip(np.asarray(probability, dtype=np.float64), 1e-9, 1 - 1e-9)
        z = self.calibration["a"] * np.log(p / (1 - p)) + self.calibration["b"]
        return 1.0 / (1.0 + np.exp(-z))

    @classmethod
    def from_wire(cls, w: _FindingWire, raw: dict, where: str, n_rows: int, origin: str) -> FindingEntry:
        """``raw``: the finding's object as written (the catalogue's reader takes its codes and prompts)."""
        try:
            finding = finding_from_dict(raw, f"{origin}: {where}")
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
        for key in ("positive", "negative"):
            span = getattr(w.prompt_rows, key)
            if span[1] > n_rows:
                raise ManifestError(
                    f"{origin}: field '{where}.prompt_rows.{key}' rows [{span[0]}, {span[1]}) lie outside the "
                    f"{n_rows} prompt embeddings"
                )
        rows = FindingRows(tuple(w.prompt_rows.positive), tuple(w.prompt_rows.negative))
        return cls(finding, rows, float(w.threshold), w.assessed is not False, w.threshold_selection, w.calibration)

    def to_dict(self) -> dict:
        d = finding_to_dict(self.finding)
        d["prompt_rows"] = {"positive": list(self.rows.positive), "negative": list(self.rows.negative)}
        d["threshold"] = float(self.threshold)
        d["assessed"] = bool(self.assessed)
        if self.threshold_selection is not None:
            d["threshold_selection"] = self.threshold_selection
        if self.calibration is not None:
            d["calibration"] = self.calibration
        return d


@dataclass(frozen=True)
class Manifest:
    model: ModelIdentity
    preprocessing: PreprocessSpec
    image_encoder: ImageEncoderRecord
    text_encoder: TextEncoderRecord
    embedding_dim: int
    log_logit_scale: float
    prompt_embeddings: PromptTable
    decision_rule: str
    threshold_method: str
    private_scheme: Code  # (designator, version, name)
    findings: tuple[FindingEntry, ...]
    provenance: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    text_normalisation: str = (
        "merlin: lowercase, NLTK wordpunct tokens joined by single spaces "
        "(operators.contract.textnorm.normalize_text); applied to prompts and custom text"
    )
    logit_scale: float | None = None  # exp(log_logit_scale) unless given
    files: dict = field(default_factory=dict)  # relative path -> {"sha256", "bytes"}; set when written
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.logit_scale is None:
            object.__setattr__(self, "logit_scale", math.exp(self.log_logit_scale))

    @property
    def catalogue(self) -> Catalogue:
        return Catalogue(tuple(e.finding for e in self.findings), self.private_scheme)

    @property
    def required_files(self) -> list[str]:
        """The files that decide: encoders, tokenizer, prompt table."""
        return [self.image_encoder.file, self.prompt_embeddings.file, *self.text_encoder.files]

    @property
    def weights_digest(self) -> str:
        """``weights_digest`` of the required files as recorded (the loader verifies the records)."""
        return weights_digest({rel: self.files.get(rel, {}).get("sha256", "") for rel in self.required_files})

    def with_files(self, files: dict) -> Manifest:
        return replace(self, files=files)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "format": FORMAT,
            "format_version": self.format_version,
            "model": self.model.to_dict(),
            "provenance": self.provenance,
            "preprocessing": self.preprocessing.to_dict(),
            "image_encoder": self.image_encoder.to_dict(),
            "text_encoder": self.text_encoder.to_dict(),
            "embedding_dim": self.embedding_dim,
            "logit_scale": self.logit_scale,
            "log_logit_scale": self.log_logit_scale,
            "text_normalisation": self.text_normalisation,
            "prompt_embeddings": self.prompt_embeddings.to_dict(),
            "decision": {"rule": self.decision_rule, "threshold_method": self.threshold_method},
            "private_scheme": {
                "designator": self.private_scheme.scheme,
                "version": self.private_scheme.value,
                "name": self.private_scheme.meaning,
            },
            "findings": [e.to_dict() for e in self.findings],
            "parity": self.parity,
        }
        if self.files:
            d["files"] = self.files
        return d

    @classmethod
    def from_dict(cls, data: Any, origin: str = "manifest.json") -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError(f"{origin}: field '(top level)' must be an object, got {type(data).__name__}")
        header = _validated(_Header, data, origin)  # a newer format is named as such, not as its fields
        if header.format_version > FORMAT_VERSION:
            raise ManifestError(
                f"{origin}: format version {header.format_version} is newer than this ct-zeroshot reads "
                f"(up to {FORMAT_VERSION}); upgrade ct-zeroshot to use this package"
            )
        w = _validated(_ManifestWire, data, origin)
        try:
            spec = PreprocessSpec.from_dict(w.preprocessing)
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"{origin}: field 'preprocessing' is not a valid preprocessing spec ({exc})") from None
        table = PromptTable.from_wire(w.prompt_embeddings)
        if table.shape[1] != w.embedding_dim:
            raise ManifestError(
                f"{origin}: field 'prompt_embeddings.shape' has width {table.shape[1]}, "
                f"embedding_dim is {w.embedding_dim}"
            )
        entries = tuple(
            FindingEntry.from_wire(f, data["findings"][i], f"findings[{i}]", table.shape[0], origin)
            for i, f in enumerate(w.findings)
        )
        try:
            check_unique([e.finding for e in entries], origin)
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
        return cls(
            model=ModelIdentity.from_wire(w.model),
            preprocessing=spec,
            image_encoder=ImageEncoderRecord.from_wire(w.image_encoder),
            text_encoder=TextEncoderRecord.from_wire(w.text_encoder),
            embedding_dim=w.embedding_dim,
            log_logit_scale=float(math.log(w.logit_scale) if w.log_logit_scale is None else w.log_logit_scale),
            prompt_embeddings=table,
            decision_rule=w.decision.rule,
            threshold_method=w.decision.threshold_method,
            private_scheme=Code(w.private_scheme.designator, w.private_scheme.version, w.private_scheme.name),
            findings=entries,
            provenance=w.provenance or {},
            parity=w.parity or {},
            text_normalisation=w.text_normalisation or cls.text_normalisation,
            logit_scale=float(w.logit_scale),
            files=w.files or {},
            format_version=w.format_version,
        )
