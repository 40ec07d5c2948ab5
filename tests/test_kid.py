"""KID computed once per kernel entry (onestep.eval.metrics.kid_from_features) equals torch-fidelity's
``kid_features_to_metric`` for the same features, subsets and seed."""

import numpy as np
import pytest
import torch

from onestep.errors import OnestepError
from onestep.eval import metrics
from onestep.eval.metrics import fid_kid_from_features, kid_from_features


def _torch_fidelity_kid(a, b, subsets, size, seed):
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    k = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=subsets, kid_subset_size=size,
                               rng_seed=seed, verbose=False)
    return k[KEY_METRIC_KID_MEAN], k[KEY_METRIC_KID_STD]


def _features(n1, n2, d, seed=0):
    r = np.random.default_rng(seed)
    return np.maximum(r.normal(size=(n1, d)), 0), np.maximum(r.normal(0.1, 1.0, size=(n2, d)), 0)


@pytest.mark.parametrize("n1, n2, d, subsets, size, seed", [
    (60, 60, 64, 10, 60, 0),     # every subset is the whole set (N = size, as at the defaults)
    (80, 120, 16, 7, 30, 3),     # unequal sides, subsets of a part
    (400, 300, 8, 3, 20, 1),     # few rows of many: the per-subset branch
    (50, 50, 2048, 4, 25, 5),    # Inception's width
])
def test_kid_equals_torch_fidelity(n1, n2, d, subsets, size, seed):
    a, b = _features(n1, n2, d, seed)
    mean, std = kid_from_features(a, b, kid_subsets=subsets, kid_subset_size=size, seed=seed)
    ref_mean, ref_std = _torch_fidelity_kid(a, b, subsets, size, seed)
    assert mean == pytest.approx(ref_mean, rel=1e-9, abs=1e-12)
    assert std == pytest.approx(ref_std, rel=1e-6, abs=1e-12)


def test_kid_is_the_same_whatever_the_kernel_block(monkeypatch):
    a, b = _features(90, 70, 12)
    whole = kid_from_features(a, b, kid_subsets=6, kid_subset_size=40, seed=2)
    monkeypatch.setattr(metrics, "_KID_BLOCK_BYTES", 8 * 7 * 90)  # 7-row blocks, ragged last block
    assert kid_from_features(a, b, kid_subsets=6, kid_subset_size=40, seed=2) == pytest.approx(whole, rel=1e-12, abs=1e-15)


def test_float32_kid_is_close_and_one_distribution_gives_a_small_kid():
    a, b = _features(200, 200, 64)
    m64, _ = kid_from_features(a, b, kid_subsets=5, kid_subset_size=200)
    m32, _ = kid_from_features(a, b, kid_subsets=5, kid_subset_size=200, dtype=torch.float32)
    assert m32 == pytest.approx(m64, rel=1e-3)
    same, _ = kid_from_features(a, _features(200, 1, 64, seed=1)[0], kid_subsets=5, kid_subset_size=200)
    assert abs(same) < 0.5 * m64  # sampling noise at 200 rows is a fifth of this shift's KID


def test_fid_kid_from_features_reports_torch_fidelity_kid():
    from onestep.eval.frechet import feature_statistics

    a, b = _features(120, 150, 32)
    mu, sigma = feature_statistics(b)
    out = fid_kid_from_features(a, {"mu": mu, "sigma": sigma, "features": b}, kid_subsets=20, kid_subset_size=1000, seed=4, prc=False)
    ref_mean, ref_std = _torch_fidelity_kid(a, b, 20, 120, 4)
    assert out["kid_subset_size"] == 120 and out["kid_subsets"] == 20
    assert out["kid"] == pytest.approx(ref_mean, rel=1e-9) and out["kid_std"] == pytest.approx(ref_std, rel=1e-6)


def test_kid_refuses_too_few_rows():
    a, b = _features(10, 30, 4)
    with pytest.raises(OnestepError, match="KID needs"):
        kid_from_features(a, b, kid_subsets=2, kid_subset_size=20)
