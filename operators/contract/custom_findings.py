"""Open-vocabulary findings: a site adds (or replaces) findings by writing prompts in a YAML file.

```yaml
findings:
  - id: enlarged_liver
    display: Enlarged liver
    positive_prompts: ["the liver is enlarged", "enlarged liver"]
    negative_prompts: ["the liver is normal in size"]
    code: {scheme: SCT, value: "80515008", meaning: "Hepatomegaly"}   # optional
    site: Liver                     # optional: a pydicom SNOMED CT keyword, or {scheme, value, meaning}
    threshold: 0.5                  # optional (Merlin's rule: the positive prompts' mean is the higher)
```

``read_findings_file`` refuses a bad file with ``FILE:LINE: problem``. ``with_findings`` turns a loaded
model package into one whose catalogue and prompt table hold the custom findings (after the package's
own in ``add`` mode, alone in ``replace`` mode): the prompts are encoded once, by the package's ONNX
text encoder (or, on the training side, the torch text tower), and everything downstream (decisions,
SR, summaries) sees an ordinary package. A finding without a code gets a private one in the package's
private scheme (``CZS`` + 8 hex digits of its id's hash), which the SR declares. The package's identity
gains the findings' digest, so SRs scored with other wording never reuse an SR UID.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .findings import SECTIONS, Code, Finding, _site
from .manifest import FindingEntry, PromptTable
from .prompts import FindingRows, prompt_table
from .textnorm import normalize_text

MODES = ("add", "replace")
ID_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")  # matched whole (fullmatch): no trailing newline
MAX_PROMPTS = 32  # per side; more says the file is not what was meant
MAX_FINDINGS = 256  # per file
MAX_FILE_BYTES = 1 << 20
_NOT_IN_SR_TEXT = re.compile(r"[\\\x00-\x1f\x7f]")  # DICOM's value separator and control characters
KEYS = {"id", "display", "positive_prompts", "negative_prompts", "code", "site", "threshold", "section"}


class FindingsFileError(ValueError):
    """A findings file that cannot be used; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class CustomFinding:
    finding: Finding
    threshold: float
    line: int  # where the item starts in its file (1-based), for later refusals (prompt length)


@dataclass(frozen=True)
class FindingsFile:
    path: Path
    findings: tuple[CustomFinding, ...]

    @property
    def digest(self) -> str:
        """sha256 over what decides: ids, codes, normalised prompts and thresholds."""
        items = [
            [c.finding.id, dataclasses.astuple(c.finding.code), c.finding.positive_prompts, c.finding.negative_prompts]
            + [c.threshold]
            for c in self.findings
        ]
        return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()

    @property
    def ids(self) -> list[str]:
        return [c.finding.id for c in self.findings]


class _LineLoader(yaml.SafeLoader):
    """YAML mappings with the line they start on (``__line__``)."""


def _mapping_with_line(loader, node):
    keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
    repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
    if repeated:  # YAML would silently keep the last one
        raise yaml.constructor.ConstructorError(None, None, f"key {repeated[0]!r} given twice", node.start_mark)
    data = loader.construct_mapping(node, deep=True)
    data["__line__"] = node.start_mark.line + 1
    return data


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line)


def prompts_digest(f: Finding) -> str:
    """A short digest of one finding's normalised prompts (the SR's algorithm parameter)."""
    text = json.dumps([f.positive_prompts, f.negative_prompts])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def private_code(fid: str, scheme: str) -> Code:
    return Code(scheme, "CZS" + hashlib.sha256(fid.encode()).hexdigest()[:8].upper(), fid.replace("_", " "))


def read_findings_file(path: str | Path, private_scheme: str = "99CTZS") -> FindingsFile:
    """Parse and check a findings file; ``FindingsFileError`` names the line and the problem."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise FindingsFileError(f"{path}: {path.stat().st_size} bytes; a findings file may have {MAX_FILE_BYTES}")
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)  # noqa: S506 - a SafeLoader
    except OSError as exc:
        raise FindingsFileError(f"{path}: cannot read the findings file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise FindingsFileError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise FindingsFileError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None

    def fail(line: int | None, problem: str) -> FindingsFileError:
        return FindingsFileError(f"{path}:{line}: {problem}" if line else f"{path}: {problem}")

    if not isinstance(data, dict) or not isinstance(data.get("findings"), list) or not data["findings"]:
        raise fail(None, "expected a mapping with a non-empty list 'findings'")
    extra = set(data) - {"findings", "__line__"}
    if extra:
        raise fail(data["__line__"], f"unknown top-level keys {sorted(extra)}")
    if len(data["findings"]) > MAX_FINDINGS:
        raise fail(None, f"{len(data['findings'])} findings; at most {MAX_FINDINGS} in one file")
    out: list[CustomFinding] = []
    seen: dict[str, int] = {}
    for item in data["findings"]:
        if not isinstance(item, dict):
            raise fail(None, f"each finding must be a mapping, got {str(item)[:60]!r}")
        line = item.pop("__line__")
        out.append(_one(item, line, fail, seen, private_scheme))
    return FindingsFile(path, tuple(out))


def _one(item: dict, line: int, fail, seen: dict[str, int], scheme: str) -> CustomFinding:
    unknown = set(item) - KEYS
    if unknown:
        raise fail(line, f"unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(KEYS))})")
    fid = item.get("id")
    if not isinstance(fid, str) or not ID_PATTERN.fullmatch(fid):
        raise fail(line, f"'id' must be lower-case letters, digits and _, starting with a letter, got {fid!r}")
    if fid in seen:
        raise fail(line, f"duplicate id {fid!r} (first on line {seen[fid]})")
    seen[fid] = line
    display = item.get("display", fid.replace("_", " ").capitalize())
    if not isinstance(display, str) or not display.strip() or len(display) > 64:
        raise fail(line, f"finding {fid!r}: 'display' must be text of at most 64 characters")
    if _NOT_IN_SR_TEXT.search(display):
        raise fail(line, f"finding {fid!r}: 'display' holds a backslash or a control character (not allowed in an SR)")
    prompts = {}
    for side in ("positive_prompts", "negative_prompts"):
        raw = item.get(side)
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw or not all(isinstance(p, str) and p.strip() for p in raw):
            raise fail(line, f"finding {fid!r}: '{side}' must list at least one non-empty prompt")
        if len(raw) > MAX_PROMPTS:
            raise fail(line, f"finding {fid!r}: {len(raw)} {side} (at most {MAX_PROMPTS})")
        prompts[side] = tuple(dict.fromkeys(normalize_text(p) for p in raw))
    if set(prompts["positive_prompts"]) & set(prompts["negative_prompts"]):
        raise fail(line, f"finding {fid!r}: a prompt is both positive and negative")
    code = item.get("code")
    if code is None:
        code_ = private_code(fid, scheme)
    else:
        if not isinstance(code, dict) or set(code) - {"scheme", "value", "meaning", "__line__"}:
            raise fail(line, f"finding {fid!r}: 'code' must be a mapping of scheme, value and meaning")
        missing = [k for k in ("scheme", "value", "meaning") if not str(code.get(k) or "").strip()]
        if missing:
            raise fail(code.get("__line__", line), f"finding {fid!r}: the code has no {' or '.join(missing)}")
        if not all(isinstance(code[k], str) for k in ("scheme", "value", "meaning")):
            raise fail(
                line, f"finding {fid!r}: code scheme, value and meaning must be quoted text ('0123' keeps its 0)"
            )
        value, scheme_ = str(code["value"]), str(code["scheme"])
        if len(scheme_) > 16 or len(value) > 16 or len(str(code["meaning"])) > 64:
            raise fail(line, f"finding {fid!r}: code scheme and value at most 16 characters, meaning at most 64")
        if any(_NOT_IN_SR_TEXT.search(str(code[k])) for k in ("scheme", "value", "meaning")):
            raise fail(
                line, f"finding {fid!r}: the code holds a backslash or a control character (not allowed in an SR)"
            )
        code_ = Code(scheme_, value, str(code["meaning"]))
    site = item.get("site")
    if isinstance(site, dict):
        site = {k: v for k, v in site.items() if k != "__line__"}
        if set(site) != {"scheme", "value", "meaning"}:
            raise fail(line, f"finding {fid!r}: 'site' as a code needs scheme, value and meaning")
    try:
        site_code = _site(site, fid)
    except ValueError as exc:
        raise fail(line, str(exc)) from None
    section = item.get("section", "multiple")
    if section not in SECTIONS and section != "multiple":
        raise fail(line, f"finding {fid!r}: unknown section {section!r} (one of {', '.join(SECTIONS)}, or multiple)")
    threshold = item.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise fail(line, f"finding {fid!r}: 'threshold' must be a probability in (0, 1), got {threshold!r}")
    finding = Finding(
        id=fid,
        display=display.strip(),
        section=section,
        code=code_,
        positive_prompts=prompts["positive_prompts"],
        negative_prompts=prompts["negative_prompts"],
        site=site_code,
    )
    return CustomFinding(finding, float(threshold), line)


def check_against(ff: FindingsFile, catalogue_ids: list[str], mode: str) -> None:
    """In ``add`` mode a custom id must not name one of the package's findings."""
    if mode not in MODES:
        raise FindingsFileError(f"findings mode must be one of {MODES}, got {mode!r}")
    if mode == "add":
        for c in ff.findings:
            if c.finding.id in catalogue_ids:
                raise FindingsFileError(
                    f"{ff.path}:{c.line}: id {c.finding.id!r} is one of the model's findings; "
                    "choose another id, or use --findings-mode replace"
                )


def check_lengths(ff: FindingsFile, count_tokens: Callable[[str], int], limit: int) -> None:
    """Every prompt within the text encoder's sequence length (a longer one would be cut silently)."""
    for c in ff.findings:
        for p in (*c.finding.positive_prompts, *c.finding.negative_prompts):
            n = count_tokens(p)
            if n > limit:
                raise FindingsFileError(
                    f"{ff.path}:{c.line}: finding {c.finding.id!r}: prompt {p[:60]!r} is {n} tokens, "
                    f"more than the text encoder's {limit}"
                )


def with_findings(package, ff: FindingsFile, mode: str, encode: Callable[[list[str]], np.ndarray]):
    """A copy of ``package`` (an ``operators.contract.package.ModelPackage``) whose catalogue and prompt table hold
    the custom findings; ``encode`` maps prompts to L2-normalised embeddings (N, D)."""
    from .package import ModelPackage

    manifest = package.manifest
    check_against(ff, manifest.catalogue.ids, mode)
    kept = list(manifest.findings) if mode == "add" else []
    custom = [c.finding for c in ff.findings]
    prompts, rows = prompt_table(custom)  # type: ignore[arg-type]
    emb = np.asarray(encode(prompts), dtype=np.float32)
    if emb.shape != (len(prompts), manifest.embedding_dim):
        raise ValueError(f"prompt encoder returned {emb.shape}, expected ({len(prompts)}, {manifest.embedding_dim})")
    base = package.prompt_embeddings if mode == "add" else np.zeros((0, manifest.embedding_dim), np.float32)
    offset = len(base)
    entries = kept + [
        FindingEntry(
            c.finding,
            FindingRows(
                (r.positive[0] + offset, r.positive[1] + offset), (r.negative[0] + offset, r.negative[1] + offset)
            ),
            c.threshold,
            True,
            {"method": "custom", "prompts_digest": prompts_digest(c.finding)},
        )
        for c, r in zip(ff.findings, rows)
    ]
    table = np.concatenate([base, emb]).astype(np.float32)
    new = dataclasses.replace(
        manifest,
        findings=tuple(entries),
        prompt_embeddings=PromptTable(manifest.prompt_embeddings.file, (len(table), manifest.embedding_dim)),
    )
    return ModelPackage(
        root=package.root,
        manifest=new,
        prompt_embeddings=table,
        custom_findings=CustomFindingsRecord(str(ff.path.name), mode, ff.digest, tuple(ff.ids)),
    )


@dataclass(frozen=True)
class CustomFindingsRecord:
    """What a package view scored with custom findings says about them (summary, logs, identity)."""

    file: str
    mode: str
    digest: str
    ids: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"file": self.file, "mode": self.mode, "digest": self.digest, "ids": list(self.ids)}
