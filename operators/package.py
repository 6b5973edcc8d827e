"""The model package: the only contract between training and deployment.

A package is a directory::

    manifest.json           what the model is, how to feed it, what it detects, and sha256 of every file
    image_encoder.onnx      (B,1,X,Y,Z) float32 in [0,1] -> (B,D) L2-normalised
    text_encoder.onnx       token ids + attention mask -> (B,D) L2-normalised   (optional, see below)
    tokenizer.json          Hugging Face ``tokenizers`` file, truncation and padding configured
    prompt_embeddings.npy   (P,D) float32: every finding's prompts, rows listed per finding

The text encoder is optional: a package whose text tower does not export faithfully (Merlin's
Longformer) ships the prompt embeddings only and says so in ``text_encoder.absent_reason``; custom
prompts then need the torch path of the training side.

``load_package`` refuses anything it cannot vouch for (a missing or extra-large file, a checksum that
does not match, a malformed manifest, a format version newer than this code reads) with a
``PackageError`` naming the package, the file and the problem. Nothing is repaired silently.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .files import write_atomic
from .findings import Catalogue, catalogue_from_dicts
from .preprocessing import PreprocessSpec

FORMAT = "ct-zeroshot-model-package"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEMO_PACKAGE = "demo"  # operators/models/demo: the embedded default model


class PackageError(ValueError):
    """A model package that cannot be used; the message names the package and the problem."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(root: str | Path, manifest: dict) -> dict:
    """Record the sha256 of every file in ``root`` (except the manifest) and write ``manifest.json``.

    Used by the exporters; the manifest is written last, so a package interrupted mid-export has no
    manifest and is refused rather than half-loaded.
    """
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = dict(manifest)
    manifest["files"] = {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files
    }
    write_atomic(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return manifest


@dataclass(frozen=True)
class FindingRows:
    """Rows of ``prompt_embeddings.npy`` holding one finding's positive and negative prompts."""

    positive: tuple[int, int]
    negative: tuple[int, int]


@dataclass
class ModelPackage:
    """A loaded, verified model package: its manifest, preprocessing, catalogue, prompt table and
    per-finding decision (threshold; ``assessed`` false where validation showed the model cannot tell
    the finding apart, which is then never reported present)."""

    root: Path
    manifest: dict
    spec: PreprocessSpec
    catalogue: Catalogue
    rows: tuple[FindingRows, ...]
    thresholds: np.ndarray  # (n_findings,) probability thresholds
    prompt_embeddings: np.ndarray  # (P, D) float32
    logit_scale: float  # the multiplier (exp of the stored log scale)
    assessed: np.ndarray | None = None  # (n_findings,) bool; None: every finding assessed

    def __post_init__(self) -> None:
        if self.assessed is None:
            self.assessed = np.ones(len(self.thresholds), dtype=bool)

    @property
    def name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def version(self) -> str:
        return self.manifest["model"]["version"]

    @property
    def uid(self) -> str:
        """The model's UID (the SR's device UID; part of every SR's derived UIDs)."""
        return self.manifest["model"]["uid"]

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def image_encoder(self) -> dict:
        return self.manifest["image_encoder"]

    @property
    def image_encoder_path(self) -> Path:
        return self.root / self.image_encoder["file"]

    @property
    def text_encoder(self) -> dict | None:
        te = self.manifest.get("text_encoder") or {}
        return te if te.get("file") else None

    @property
    def threshold_method(self) -> str:
        return self.manifest["decision"]["threshold_method"]


def _fail(root: Path, problem: str) -> PackageError:
    return PackageError(f"model package {root}: {problem}")


def _need(d: dict, key: str, where: str, root: Path):
    if not isinstance(d, dict) or key not in d:
        raise _fail(root, f"manifest.json: missing {where}{key!r}")
    return d[key]


def read_manifest(root: str | Path) -> dict:
    """Parse ``manifest.json`` and check its format and version (not yet the files)."""
    root = Path(root)
    if not root.is_dir():
        raise _fail(root, "not a directory")
    path = root / MANIFEST
    if not path.is_file():
        raise _fail(root, "manifest.json is missing (an unfinished export, or not a model package)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(root, f"manifest.json is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(root, f"manifest.json: 'format' is not {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(root, f"manifest.json: 'format_version' must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise _fail(
            root,
            f"manifest.json: format version {version} is newer than this ct-zeroshot reads "
            f"(up to {FORMAT_VERSION}); upgrade ct-zeroshot to use this package",
        )
    return manifest


def verify_files(root: Path, manifest: dict) -> None:
    """Every listed file exists with its recorded size and sha256; the required ones are listed."""
    files = _need(manifest, "files", "", root)
    if not isinstance(files, dict) or not files:
        raise _fail(root, "manifest.json: 'files' must list the package's files")
    for rel, rec in files.items():
        p = root / rel
        if not p.is_file():
            raise _fail(root, f"{rel}: listed in the manifest but missing")
        if not isinstance(rec, dict) or "sha256" not in rec:
            raise _fail(root, f"manifest.json: no sha256 recorded for {rel}")
        if "bytes" in rec and p.stat().st_size != rec["bytes"]:
            raise _fail(
                root, f"{rel}: {p.stat().st_size} bytes, the manifest says {rec['bytes']} (truncated or modified)"
            )
        if sha256_file(p) != rec["sha256"]:
            raise _fail(root, f"{rel}: sha256 does not match the manifest (modified or corrupted)")
    required = [
        _need(manifest["image_encoder"], "file", "image_encoder.", root),
        _need(manifest["prompt_embeddings"], "file", "prompt_embeddings.", root),
    ]
    te = manifest.get("text_encoder") or {}
    if te.get("file"):
        required += [te["file"], _need(te, "tokenizer", "text_encoder.", root)]
    for rel in required:
        if rel not in files:
            raise _fail(root, f"{rel}: required by the manifest but not covered by its checksums")


def load_package(root: str | Path, verify: bool = True) -> ModelPackage:
    """Open and check a model package; see the module docstring for what is refused."""
    root = Path(root)
    manifest = read_manifest(root)
    for key in (
        "model",
        "preprocessing",
        "image_encoder",
        "prompt_embeddings",
        "embedding_dim",
        "logit_scale",
        "decision",
        "findings",
        "private_scheme",
    ):
        _need(manifest, key, "", root)
    if verify:
        verify_files(root, manifest)
    try:
        spec = PreprocessSpec.from_dict(manifest["preprocessing"])
    except (TypeError, ValueError, KeyError) as exc:
        raise _fail(root, f"manifest.json: bad preprocessing spec ({exc})") from exc
    try:
        catalogue = catalogue_from_dicts(manifest, origin=f"{root}/{MANIFEST}")
    except ValueError as exc:
        raise PackageError(str(exc)) from exc
    dim = manifest["embedding_dim"]
    pe_rec = manifest["prompt_embeddings"]
    try:
        emb = np.load(root / pe_rec["file"], allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _fail(root, f"{pe_rec['file']}: not a readable .npy array ({exc})") from exc
    if emb.ndim != 2 or emb.shape[1] != dim or emb.dtype != np.float32:
        raise _fail(root, f"{pe_rec['file']}: expected float32 (P, {dim}), got {emb.dtype} {emb.shape}")
    rows, thresholds, assessed = [], [], []
    for item in manifest["findings"]:
        fid = item.get("id")
        try:
            r = item["prompt_rows"]
            fr = FindingRows(tuple(r["positive"]), tuple(r["negative"]))
            thr = float(item["threshold"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail(root, f"manifest.json: finding {fid!r} lacks prompt_rows or threshold ({exc!r})") from exc
        for a, b in (fr.positive, fr.negative):
            if not (0 <= a < b <= emb.shape[0]):
                raise _fail(
                    root,
                    f"manifest.json: finding {fid!r} prompt rows [{a}, {b}) outside "
                    f"the {emb.shape[0]} prompt embeddings",
                )
        if not (0.0 < thr < 1.0):
            raise _fail(root, f"manifest.json: finding {fid!r} threshold {thr} is not a probability in (0, 1)")
        a = item.get("assessed", True)
        if not isinstance(a, bool):
            raise _fail(root, f"manifest.json: finding {fid!r} 'assessed' must be true or false, got {a!r}")
        rows.append(fr)
        thresholds.append(thr)
        assessed.append(a)
    scale = float(manifest["logit_scale"])
    if not math.isfinite(scale) or scale <= 0:
        raise _fail(root, f"manifest.json: logit_scale must be a positive number, got {scale}")
    return ModelPackage(
        root=root,
        manifest=manifest,
        spec=spec,
        catalogue=catalogue,
        rows=tuple(rows),
        thresholds=np.asarray(thresholds, dtype=np.float64),
        assessed=np.asarray(assessed, dtype=bool),
        prompt_embeddings=emb,
        logit_scale=scale,
    )


def default_package_dir() -> Path:
    """The embedded demo model (``operators/models/demo``), used when no model is given."""
    path = Path(str(resources.files(__package__).joinpath("models", DEMO_PACKAGE)))
    if not (path / MANIFEST).is_file():
        raise PackageError(
            f"the embedded demo model is missing from {path}; build it with `make demo-model` or pass a model package"
        )
    return path
