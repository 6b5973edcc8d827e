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

``load_package`` refuses anything it cannot vouch for (a missing or extra-large file, a file listed
outside the package or reached through a link, a file in the package that the manifest does not list (an
encoder's ONNX external data would carry weights outside the checksums), a checksum that does not match,
a malformed manifest
(``operators.contract.manifest`` names the field), a format version newer than this code reads) with a
``PackageError`` naming the package, the file and the problem. Nothing is repaired silently.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .files import write_atomic
from .findings import Catalogue
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    UNSTATED_USE,
    ImageEncoderRecord,
    Manifest,
    ManifestError,
    TextEncoderRecord,
)
from .preprocessing import PreprocessSpec
from .prompts import FindingRows

MANIFEST = "manifest.json"
DEMO_PACKAGE = "demo"  # operators/models/demo: the embedded default model
MAX_FILE_BYTES = 8 << 30  # no model file of this project comes near 8 GiB (Merlin's image tower: 0.5 GB)

__all__ = ["FORMAT", "FORMAT_VERSION", "FindingRows", "Manifest", "ModelPackage", "PackageError", "load_package"]


class PackageError(ValueError):
    """A model package that cannot be used; the message names the package and the problem."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(root: str | Path, manifest: Manifest) -> Manifest:
    """Record the sha256 of every file in ``root`` (except the manifest) and write ``manifest.json``.

    Used by the exporters; the manifest is written last, so a package interrupted mid-export has no
    manifest and is refused rather than half-loaded. Returns the manifest with its ``files``.
    """
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = manifest.with_files(
        {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}
    )
    write_atomic(root / MANIFEST, json.dumps(manifest.to_dict(), indent=1, sort_keys=False) + "\n")
    return manifest


def write_package_copy(
    source: str | Path,
    out: str | Path,
    manifest: dict,
    replace: dict[str, Path] | None = None,
    finish: Callable[[Path, dict], dict] | None = None,
) -> Path:
    """``source``'s files with ``manifest`` (a manifest document, changed from the source's) as a new package
    ``out``: written into ``out.partial``, verified by loading, then renamed, so ``out`` is never half
    written. ``replace``: package files (relative names) taken from other files; ``finish``: called with
    the staged folder and the manifest document before it is written (a UID from the new weights, say).
    Returns ``out``."""
    import shutil

    source, out = Path(source), Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    for name, path in (replace or {}).items():
        shutil.copyfile(path, tmp / name)
    if finish is not None:
        manifest = finish(tmp, manifest)
    write_manifest(tmp, Manifest.from_dict(manifest, origin=str(source / MANIFEST)))
    load_package(tmp)  # the written package loads and verifies before it takes its name
    tmp.rename(out)
    return out


@dataclass
class ModelPackage:
    """A loaded, verified model package: its typed manifest, preprocessing, catalogue, prompt table and
    per-finding decision (threshold; ``assessed`` false where validation showed the model cannot tell
    the finding apart, which is then never reported present)."""

    root: Path
    manifest: Manifest
    prompt_embeddings: np.ndarray  # (P, D) float32
    # Set on a view made by operators.contract.custom_findings.with_findings: the site's findings file, its mode
    # and digest (the package on disk is unchanged).
    custom_findings: Any = None

    @property
    def spec(self) -> PreprocessSpec:
        return self.manifest.preprocessing

    @property
    def catalogue(self) -> Catalogue:
        return self.manifest.catalogue

    @property
    def rows(self) -> tuple[FindingRows, ...]:
        return tuple(e.rows for e in self.manifest.findings)

    @property
    def thresholds(self) -> np.ndarray:
        """(n_findings,) probability thresholds."""
        return np.asarray([e.threshold for e in self.manifest.findings], dtype=np.float64)

    def certainties(self, probabilities: np.ndarray) -> np.ndarray:
        """(..., n_findings) calibrated probabilities of presence (``FindingEntry.calibrated``), NaN for a
        finding without a calibration (its SR states the score, marked uncalibrated)."""
        p = np.asarray(probabilities, dtype=np.float64)
        out = np.full(p.shape, np.nan)
        for j, entry in enumerate(self.manifest.findings):
            if entry.calibration is not None:
                out[..., j] = entry.calibrated(p[..., j])
        return out

    @property
    def assessed(self) -> np.ndarray:
        """(n_findings,) bool: findings the package may report present."""
        return np.asarray([e.assessed for e in self.manifest.findings], dtype=bool)

    @property
    def logit_scale(self) -> float:
        """The multiplier (exp of the stored log scale)."""
        return float(self.manifest.logit_scale or 0.0)

    @property
    def name(self) -> str:
        return self.manifest.model.name

    @property
    def version(self) -> str:
        return self.manifest.model.version

    @property
    def uid(self) -> str:
        """The model's UID (the SR's device UID; part of every SR's derived UIDs)."""
        return self.manifest.model.uid

    @property
    def intended_use(self) -> str:
        """What the model is for, as its package states it (every SR and summary repeats it)."""
        return self.manifest.model.intended_use or UNSTATED_USE

    @property
    def identity(self) -> str:
        """What SR UIDs derive from: the model UID, the weights' digest (``manifest.weights_digest``) and
        the decisions' (``decisions_digest``), so a package whose weights or thresholds changed under the
        same name, version and UID never reuses an SR UID of the original (the files are verified on
        load). Scored with a site's findings file, the file's digest too: other findings or other wording
        never reuse an SR UID."""
        base = f"{self.uid}/{self.manifest.weights_digest}/decisions {self.decisions_digest}"
        return base if self.custom_findings is None else f"{base}/findings {self.custom_findings.digest}"

    @property
    def decisions_digest(self) -> str:
        """sha256 (16 hex digits) of what turns scores into decisions: each finding's threshold, whether
        it is assessed and its calibration (where it has one). Part of ``identity``: the same weights
        re-exported with other thresholds decide differently, so their SRs must not reuse the first
        export's UIDs."""
        own = [e for e in self.manifest.findings if (e.threshold_selection or {}).get("method") != "custom"]
        rows = [  # a site's findings: its file's digest; a calibration changes the certainties an SR states
            f"{e.threshold!r}:{bool(e.assessed)}"
            + ("" if e.calibration is None else f":platt {e.calibration['a']!r} {e.calibration['b']!r}")
            for e in own
        ]
        return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]

    @property
    def embedding_dim(self) -> int:
        return self.manifest.embedding_dim

    @property
    def image_encoder(self) -> ImageEncoderRecord:
        return self.manifest.image_encoder

    @property
    def image_encoder_path(self) -> Path:
        return self.root / self.image_encoder.file

    @property
    def text_encoder(self) -> TextEncoderRecord | None:
        """The ONNX text encoder, or None (``manifest.text_encoder.absent_reason`` says why)."""
        te = self.manifest.text_encoder
        return te if te.file else None

    @property
    def threshold_method(self) -> str:
        return self.manifest.threshold_method


def _fail(root: Path, problem: str) -> PackageError:
    return PackageError(f"model package {root}: {problem}")


def _inside(root: Path, rel: str) -> Path:
    """``root / rel`` for a manifest-listed relative path that stays inside the package (no absolute
    path, no ``..``, no symlink leading out)."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel or "\\" in rel:
        raise _fail(root, f"manifest.json: file {rel!r} is not a relative path inside the package")
    full = root / p
    if full.is_symlink() or not full.resolve().is_relative_to(root.resolve()):
        raise _fail(root, f"{rel}: a link or a path leading out of the package")
    return full


def read_manifest(root: str | Path) -> Manifest:
    """Parse ``manifest.json`` into a ``Manifest`` (format, version and fields; not yet the files)."""
    root = Path(root)
    if not root.exists():
        raise _fail(root, "does not exist")
    if not root.is_dir():
        raise _fail(root, "not a directory")
    path = root / MANIFEST
    if not path.is_file():
        raise _fail(root, "manifest.json is missing (an unfinished export, or not a model package)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(root, f"manifest.json is not valid JSON ({exc})") from exc
    try:
        return Manifest.from_dict(data, origin=MANIFEST)
    except ManifestError as exc:
        raise _fail(root, str(exc)) from None


def verify_files(root: Path, manifest: Manifest) -> None:
    """Every listed file lies inside the package with its recorded size and sha256; the required ones
    are listed; nothing else is in the package folder."""
    files = manifest.files
    if not files:
        raise _fail(root, "manifest.json: 'files' must list the package's files")
    for rel, rec in files.items():
        p = _inside(root, rel)
        if not p.is_file():
            raise _fail(root, f"{rel}: listed in the manifest but missing")
        if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str):
            raise _fail(root, f"manifest.json: no sha256 recorded for {rel}")
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise _fail(root, f"{rel}: {size} bytes, over the {MAX_FILE_BYTES} a package file may have")
        if "bytes" in rec and size != rec["bytes"]:
            raise _fail(root, f"{rel}: {size} bytes, the manifest says {rec['bytes']} (truncated or modified)")
        if sha256_file(p) != rec["sha256"]:
            raise _fail(root, f"{rel}: sha256 does not match the manifest (modified or corrupted)")
    for rel in manifest.required_files:
        if rel not in files:
            raise _fail(root, f"{rel}: required by the manifest but not covered by its checksums")
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir() and not p.is_symlink():
            continue
        if rel != MANIFEST and rel not in files:
            # ONNX Runtime reads an encoder's external data from beside it: a file outside the checksums
            # could change the weights under the same manifest.
            raise _fail(root, f"{rel}: in the package but not listed in the manifest (no checksum covers it)")


def load_package(root: str | Path, verify: bool = True) -> ModelPackage:
    """Open and check a model package; see the module docstring for what is refused."""
    root = Path(root)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    for rel in manifest.required_files:
        _inside(root, rel)
    pe = manifest.prompt_embeddings
    try:
        emb = np.load(root / pe.file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _fail(root, f"{pe.file}: not a readable .npy array ({exc})") from exc
    if emb.dtype != np.float32 or emb.shape != tuple(pe.shape):
        raise _fail(
            root, f"{pe.file}: expected float32 {tuple(pe.shape)} as the manifest says, got {emb.dtype} {emb.shape}"
        )
    return ModelPackage(root=root, manifest=manifest, prompt_embeddings=emb)


def default_package_dir() -> Path:
    """The embedded demo model (``operators/models/demo``), used only when no model is named at all: a
    named model that is missing or does not load is an error, never a reason to fall back to this one."""
    path = Path(str(resources.files("operators").joinpath("models", DEMO_PACKAGE)))
    if not (path / MANIFEST).is_file():
        raise PackageError(f"the embedded demo model is missing from {path}; name a model package")
    return path


def named_or_demo(model: str | Path | None) -> Path:
    """The model named (as given: ``load_package`` refuses it if it is missing), or, only when none is
    named, the embedded demo model, with a warning (it knows synthetic phantoms, not patients)."""
    if model:
        return Path(model)
    logging.getLogger("ct-zeroshot").warning(
        "no model named: using the embedded demo model (trained on synthetic phantoms only)"
    )
    return default_package_dir()


def is_embedded_demo(package: ModelPackage) -> bool:
    """Whether ``package`` is the embedded demo model (by its model UID: also when a copy of it is named, as
    the container names it), so the log and every SR can say that a phantom-trained model decided."""
    return package.uid == _embedded_demo_uid()


@functools.cache
def _embedded_demo_uid() -> str | None:
    try:
        return read_manifest(default_package_dir()).model.uid
    except PackageError:
        return None
