import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.voxel_signal import voxel_aurocs


def test_voxel_aurocs_match_sklearn_ties_included():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    x = np.stack(
        [
            y + 0.1 * rng.standard_normal(300),  # separates
            -y + 0.1 * rng.standard_normal(300),  # separates, darker in positives
            rng.standard_normal(300),  # noise
            np.round(rng.standard_normal(300) + 0.5 * y),  # ties
        ],
        axis=1,
    )
    got = voxel_aurocs(x, y)
    want = [roc_auc_score(y, x[:, j]) for j in range(x.shape[1])]
    assert np.allclose(got, want)
    assert got[0] > 0.99 and got[1] < 0.01 and abs(got[2] - 0.5) < 0.1
