"""Preprocessed phantoms seeded apart from any corpus: model inputs when no data set is at hand."""

from __future__ import annotations

import numpy as np

from operators.contract.preprocessing import PreprocessSpec


def synthetic_inputs(spec: PreprocessSpec, n: int = 4, seed: int = 20261128) -> np.ndarray:
    """``n`` procedural phantoms (tiny profile) preprocessed with ``spec``: parity inputs when no data
    set is given (e.g. converting the Merlin checkpoint). Seeded apart from any corpus."""
    from operators.contract.preprocessing import build_transform, preprocess
    from operators.contract.volume import Volume

    from .corpus import make_grid
    from .patient import sample_patient
    from .phantom import build_phantom

    transform = build_transform(spec)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        patient = sample_patient(rng, i)
        grid, noise, blur = make_grid("tiny", patient, rng)
        hu, _ = build_phantom(patient, grid, rng, noise_sd=noise, blur_vox=blur)
        out.append(preprocess(Volume(hu, grid.affine_ras()), spec, transform))
    return np.stack(out).astype(np.float32)
