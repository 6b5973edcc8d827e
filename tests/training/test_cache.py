import os

import numpy as np

from operators.contract.preprocessing import PreprocessSpec, preprocess
from training.cache import VolumeCache
from training.data import load_volume, read_merlin_release


def test_cache_matches_preprocessing_and_is_reused(corpus200, tmp_path):
    spec = PreprocessSpec.tiny()
    studies = read_merlin_release(corpus200)[:3]
    cache = VolumeCache(tmp_path / "cache", spec)
    cache.build(studies, workers=2, progress=False)
    assert all(cache.has(s) for s in studies)
    assert (cache.dir / "spec.json").exists()
    assert not list(cache.dir.glob(".*tmp*"))
    for s in studies:
        got = cache.get(s)
        ref = preprocess(load_volume(s), spec)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.abs(got - ref).max() <= 3e-4  # float16 storage
    path = cache.path(studies[0])
    mtime = path.stat().st_mtime_ns
    cache.build(studies, progress=False)
    assert path.stat().st_mtime_ns == mtime  # not rebuilt
    # Another spec gets its own folder.
    other = VolumeCache(tmp_path / "cache", PreprocessSpec(spacing=(6.0, 6.0, 6.0), spatial_size=(32, 32, 32)))
    assert other.dir != cache.dir


def test_cache_key_follows_the_source(corpus200, tmp_path):
    import shutil

    study = read_merlin_release(corpus200)[0]
    local = tmp_path / "img.nii.gz"
    shutil.copy(study.image, local)
    study.image = local
    cache = VolumeCache(tmp_path / "cache", PreprocessSpec.tiny())
    p1 = cache.path(study)
    os.utime(local, ns=(1, 1))
    assert cache.path(study) != p1  # a changed source is not served stale
