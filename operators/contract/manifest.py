"""The model-package manifest as types, shared by the exporters (training side) and the loader.

``Manifest.to_dict`` is what ``manifest.json`` holds (the exporter writes nothing else);
``Manifest.from_dict`` is the only reader, and refuses a malformed document with ``ManifestError``
naming the file and the field (``manifest.json: field 'findings[3].threshold' must be a probability
in (0, 1), got 1.2``), in the manner of highdicom's constructors that refuse an invalid document
rather than write or read one. ``provenance``, ``parity`` and a finding's ``threshold_selection``
are free-form records for readers (humans, ``recipe``); nothing downstream decides on them.

The prompt table: ``prompt_embeddings.npy`` is (P, D) float32; finding i's positive prompts are the
rows ``[findings[i].rows.positive[0], findings[i].rows.positive[1])``, its negatives likewise.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Any

from .findings import Catalogue, Code, Finding, check_unique, finding_from_dict, finding_to_dict
from .preprocessing import PreprocessSpec
from .prompts import FindingRows  # the prompt table's layout
from .textnorm import KEEP_RULES
from .uids import is_valid_uid

FORMAT = "ct-zeroshot-model-package"
FORMAT_VERSION = 1
INTENDED_USE_MAX = 512  # it goes into the SR's Contribution Description (ST, at most 1024 characters)
UNSTATED_USE = "not stated by the model package: research use only, not for diagnostic use"


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and the field."""


_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "a non-empty string"),
    "int": ((int,), "an integer"),
    "num": ((int, float), "a finite number"),
    "bool": ((bool,), "true or false"),
    "dict": ((dict,), "an object"),
    "list": ((list,), "a list"),
}


class _Reader:
    """Typed access to one JSON object of the manifest; every refusal names the file and field path."""

    def __init__(self, origin: str, data: Any, path: str = ""):
        self.origin, self.data, self.path = origin, data, path
        if not isinstance(data, dict):
            raise self.error(path or "(top level)", f"must be an object, got {type(data).__name__}")

    def error(self, where: str, problem: str) -> ManifestError:
        return ManifestError(f"{self.origin}: field {where!r} {problem}")

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: str, optional: bool = False) -> Any:
        value = self.data.get(key)
        if value is None:
            if optional:
                return None
            raise self.error(self.where(key), "is missing")
        types, desc = _KINDS[kind]
        bad = not isinstance(value, types) or (isinstance(value, bool) and kind not in ("bool",))
        bad = bad or (kind == "str" and not value.strip()) or (kind == "num" and not math.isfinite(value))
        if bad:
            raise self.error(self.where(key), f"must be {desc}, got {str(value)[:80]!r}")
        return value

    def sub(self, key: str) -> _Reader:
        return _Reader(self.origin, self.get(key, "dict"), self.where(key))

    def span(self, key: str, limit: int) -> tuple[int, int]:
        """A half-open row range [a, b) inside a table of ``limit`` rows."""
        v = self.get(key, "list")
        if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v) or not 0 <= v[0] < v[1]:
            raise self.error(self.where(key), f"must be a row range [a, b) with 0 <= a < b, got {v!r}")
        if v[1] > limit:
            raise self.error(self.where(key), f"rows [{v[0]}, {v[1]}) lie outside the {limit} prompt embeddings")
        return (v[0], v[1])


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
    def read(cls, r: _Reader) -> ModelIdentity:
        uid = r.get("uid", "str")
        if not is_valid_uid(uid):
            raise r.error(r.where("uid"), f"must be a valid DICOM UID (digits and dots, <= 64 chars), got {uid!r}")
        use = r.get("intended_use", "str", optional=True)
        if use is not None and not 0 < len(use) <= INTENDED_USE_MAX:
            raise r.error(r.where("intended_use"), f"must be 1 to {INTENDED_USE_MAX} characters, got {len(use)}")
        evaluation = r.get("evaluation", "dict", optional=True)
        return cls(r.get("name", "str"), r.get("version", "str"), uid, r.get("created", "str"), use, evaluation)

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
    def read(cls, r: _Reader) -> ImageEncoderRecord:
        return cls(
            r.get("file", "str"),
            r.get("input", "str"),
            r.get("output", "str"),
            tuple(r.get("input_shape", "list")),
            r.get("dtype", "str"),
            r.get("opset", "int"),
            r.get("dynamic_spatial", "bool"),
            r.get("l2_normalised", "bool"),
            r.get("localisation", "str", optional=True),
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
    def read(cls, r: _Reader) -> TextEncoderRecord:
        file = r.get("file", "str", optional=True)
        if file is None:
            return cls(None, r.get("absent_reason", "str", optional=True) or "not exported")
        inputs = r.get("inputs", "list")
        if not all(isinstance(x, str) for x in inputs):
            raise r.error(r.where("inputs"), f"must list input names, got {inputs!r}")
        keep = r.get("keep_sentences", "str", optional=True) or "all"
        if keep not in KEEP_RULES:  # a rule this deploy does not know would fail at the first prompt
            raise r.error(r.where("keep_sentences"), f"must be one of {', '.join(KEEP_RULES)}, got {keep!r}")
        return cls(
            file,
            None,
            tuple(inputs),
            r.get("output", "str"),
            r.get("tokenizer", "str"),
            keep,
            r.get("pad_token_id", "int"),
            r.get("max_length", "int"),
            r.get("sequence_length", "int", optional=True),
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
    def read(cls, r: _Reader) -> PromptTable:
        shape = r.get("shape", "list")
        if len(shape) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape):
            raise r.error(r.where("shape"), f"must be [rows, dim] of positive integers, got {shape!r}")
        dtype = r.get("dtype", "str")
        if dtype != "float32":
            raise r.error(r.where("dtype"), f"must be 'float32', got {dtype!r}")
        return cls(r.get("file", "str"), (shape[0], shape[1]), dtype, r.get("computed_with", "str"))

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
    def read(cls, r: _Reader, n_rows: int) -> FindingEntry:
        for key, kind in (("id", "str"), ("display", "str"), ("section", "str"), ("code", "dict")):
            r.get(key, kind)
        for key in ("positive_prompts", "negative_prompts"):
            if not r.get(key, "list") or not all(isinstance(p, str) for p in r.data[key]):
                raise r.error(r.where(key), "must list at least one prompt (strings)")
        try:
            finding = finding_from_dict(r.data, f"{r.origin}: {r.path}")
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
        rows = r.sub("prompt_rows")
        thr = r.get("threshold", "num")
        if not 0.0 < thr < 1.0:
            raise r.error(r.where("threshold"), f"must be a probability in (0, 1), got {thr}")
        sel = r.get("threshold_selection", "dict", optional=True)
        cal = r.get("calibration", "dict", optional=True)
        if cal is not None:
            where = r.where("calibration")
            if cal.get("method") != "platt":
                raise r.error(where, f"method must be 'platt', got {cal.get('method')!r}")
            for key in ("a", "b"):
                value = cal.get(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise r.error(where, f"{key} must be a finite number, got {value!r}")
            if cal["a"] < 0:
                raise r.error(where, f"a must be >= 0 (a certainty that falls as the score rises), got {cal['a']}")
        return cls(
            finding,
            FindingRows(rows.span("positive", n_rows), rows.span("negative", n_rows)),
            float(thr),
            r.get("assessed", "bool", optional=True) is not False,
            sel,
            cal,
        )

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
        r = _Reader(origin, data)
        if data.get("format") != FORMAT:
            raise r.error("format", f"must be {FORMAT!r}, got {data.get('format')!r}")
        version = r.get("format_version", "int")
        if version < 1:
            raise r.error("format_version", f"must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ManifestError(
                f"{origin}: format version {version} is newer than this ct-zeroshot reads "
                f"(up to {FORMAT_VERSION}); upgrade ct-zeroshot to use this package"
            )
        try:
            spec = PreprocessSpec.from_dict(r.get("preprocessing", "dict"))
        except (TypeError, ValueError) as exc:
            raise r.error("preprocessing", f"is not a valid preprocessing spec ({exc})") from exc
        dim = r.get("embedding_dim", "int")
        table = PromptTable.read(r.sub("prompt_embeddings"))
        if table.shape[1] != dim:
            raise r.error("prompt_embeddings.shape", f"has width {table.shape[1]}, embedding_dim is {dim}")
        log_scale = r.get("log_logit_scale", "num", optional=True)
        scale = r.get("logit_scale", "num")
        if scale <= 0:
            raise r.error("logit_scale", f"must be a positive number, got {scale}")
        items = r.get("findings", "list")
        if not items:
            raise r.error("findings", "must list at least one finding")
        entries = tuple(
            FindingEntry.read(_Reader(origin, it, f"findings[{i}]"), table.shape[0]) for i, it in enumerate(items)
        )
        try:
            check_unique([e.finding for e in entries], origin)
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
        ps, decision = r.sub("private_scheme"), r.sub("decision")
        files = r.get("files", "dict", optional=True) or {}
        return cls(
            model=ModelIdentity.read(r.sub("model")),
            preprocessing=spec,
            image_encoder=ImageEncoderRecord.read(r.sub("image_encoder")),
            text_encoder=TextEncoderRecord.read(r.sub("text_encoder")),
            embedding_dim=dim,
            log_logit_scale=float(math.log(scale) if log_scale is None else log_scale),
            prompt_embeddings=table,
            decision_rule=decision.get("rule", "str"),
            threshold_method=decision.get("threshold_method", "str"),
            private_scheme=Code(ps.get("designator", "str"), ps.get("version", "str"), ps.get("name", "str")),
            findings=entries,
            provenance=r.get("provenance", "dict", optional=True) or {},
            parity=r.get("parity", "dict", optional=True) or {},
            text_normalisation=r.get("text_normalisation", "str", optional=True) or cls.text_normalisation,
            logit_scale=float(scale),
            files=files,
            format_version=version,
        )
