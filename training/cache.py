"""On-disk cache of preprocessed volumes, so DICOM and NIfTI are decoded once, never in the training loop.

One folder per preprocessing spec (named by the spec's hash, with ``spec.json`` inside); one
``.npy`` per study, float16 (values in [0, 1]: at most 2.5e-4 rounding error, half the disk
and read bandwidth of float32), read back memory-mapped. Entries are keyed by the source's
path, size and modification time, written to a temporary name and renamed, so a killed build
leaves no half-written entry. MONAI's ``PersistentDataset`` pickles whole tensors per item;
a plain memory-mappable array per study is what a data loader wants here, hence this module.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from operators.contract.files import atomic_path
from operators.contract.preprocessing import PreprocessSpec, build_transform, preprocess

from .config import TrainConfig
from .data import Study, load_studies, load_volume


def spec_hash(spec: PreprocessSpec) -> str:
    return hashlib.sha1(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _source_key(image: Path) -> str:
    image = image.resolve()
    if image.is_dir():
        files = sorted(p for p in image.rglob("*") if p.is_file())
        ident = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    else:
        st = image.stat()
        ident = [(str(image), st.st_size, st.st_mtime_ns)]
    return hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:16]


class VolumeCache:
    def __init__(self, root: str | Path, spec: PreprocessSpec):
        self.spec = spec
        self.dir = Path(root) / spec_hash(spec)
        self.dir.mkdir(parents=True, exist_ok=True)
        spec_file = self.dir / "spec.json"
        if not spec_file.exists():
            spec_file.write_text(json.dumps(spec.to_dict(), indent=1))

    def path(self, study: Study) -> Path:
        return self.dir / f"{study.study_id}-{_source_key(study.image)}.npy"

    def has(self, study: Study) -> bool:
        return self.path(study).exists()

    def put(self, study: Study, transform=None) -> Path:
        path = self.path(study)
        if path.exists():
            return path
        arr = preprocess(load_volume(study), self.spec, transform)
        with atomic_path(path, suffix=".npy") as tmp:
            np.save(tmp, arr.astype(np.float16))
        return path

    def get(self, study: Study) -> np.ndarray:
        """float32 (1, X, Y, Z); preprocesses and stores the study first if needed."""
        return np.asarray(np.load(self.put(study), mmap_mode="r"), dtype=np.float32)

    def build(
        self, studies: Sequence[Study], workers: int = 1, progress: bool = True, failures: dict | None = None
    ) -> None:
        """Preprocess every study not yet cached, with a progress bar. With ``failures`` (a dict), a study
        whose image cannot be read or preprocessed is recorded there (study id -> reason) instead of
        stopping the build."""
        from tqdm import tqdm

        todo = [s for s in studies if not self.has(s)]
        bar = tqdm(total=len(todo), desc="preprocess", unit="vol", disable=not progress or not todo)
        keep_going = failures is not None
        if workers > 1 and len(todo) > 1:
            # spawn, not fork: forking a process whose torch/OpenMP threads are running deadlocks.
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as ex:
                jobs = [(str(self.dir.parent), self.spec, s, keep_going) for s in todo]
                for s, error in zip(todo, ex.map(_put_one, jobs, chunksize=4)):
                    if error is not None:
                        failures[s.study_id] = error  # type: ignore[index]
                    bar.update()
        else:
            transform = build_transform(self.spec)
            for s in todo:
                error = _put(self, s, transform, keep_going)
                if error is not None:
                    failures[s.study_id] = error  # type: ignore[index]
                bar.update()
        bar.close()


def _put(cache: VolumeCache, study: Study, transform, keep_going: bool) -> str | None:
    """Cache one study; with ``keep_going``, an unreadable image is returned as its reason."""
    from operators.contract.volume import VolumeError

    try:
        cache.put(study, transform)
    except (VolumeError, OSError, ValueError) as exc:
        if not keep_going:
            raise
        return f"image {study.image} cannot be read: {exc}"
    return None


def _put_one(args) -> str | None:
    root, spec, study, keep_going = args
    return _put(VolumeCache(root, spec), study, None, keep_going)


class CachedVolumes:
    """Sequence view of preprocessed volumes for a list of studies."""

    def __init__(self, cache: VolumeCache, studies: list[Study]):
        self.cache, self.studies = cache, studies

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.cache.get(self.studies[i])


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ct-zeroshot" / "volumes"


def volume_cache(spec, cache_dir: str | Path | None) -> VolumeCache:
    return VolumeCache(cache_dir or default_cache_dir(), spec)


def build_cache(cache: VolumeCache, studies: list[Study], progress: bool, failures: dict | None = None) -> None:
    cache.build(studies, workers=min(os.cpu_count() or 1, 8), progress=progress, failures=failures)


def split_volumes(
    cfg: TrainConfig,
    data: str | Path,
    split: str,
    *,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    labelled: bool = False,
    studies: list[Study] | None = None,
) -> tuple[list[Study], CachedVolumes]:
    """The studies of one split (the first ``limit``), their volumes cached under ``cfg``'s spec.

    ``labelled``: refuse a split with studies lacking finding labels. ``studies``: already loaded."""
    chosen = [s for s in (studies if studies is not None else load_studies(data)) if s.split == split]
    if not chosen:
        raise ValueError(f"{data}: no studies in split {split!r}")
    if labelled and any(s.labels is None for s in chosen):
        raise ValueError(f"{data}: split {split!r} has studies without finding labels")
    if limit:
        chosen = chosen[:limit]
    cache = volume_cache(cfg.spec, cache_dir)
    build_cache(cache, chosen, progress)
    return chosen, CachedVolumes(cache, chosen)
