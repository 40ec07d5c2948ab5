"""Evaluation: the Frechet distance, the digits extractor and digits-FID."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from onestep.digits import digits_dataset
from onestep.eval import digits_features, digits_fid, frechet_distance


def _spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_equals_the_closed_form():
    rng = np.random.default_rng(0)
    # Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Full covariances: tr((S1 S2)^(1/2)) from scipy's matrix square root.
    from scipy.linalg import sqrtm

    s1, s2 = _spd(6, rng), _spd(6, rng)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm(s1 @ s2)).real
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)
    # A singular covariance (rank 2 in 4-D) stays finite and exact: against itself it is 0.
    v = rng.normal(size=(4, 2))
    assert frechet_distance(m1[:4], v @ v.T, m1[:4], v @ v.T) == pytest.approx(0.0, abs=1e-7)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_digits_features_input_conventions():
    x, _ = digits_dataset()
    x = x[:40]
    f = digits_features(x)
    assert f.shape == (40, 64) and f.dtype == np.float64 and np.isfinite(f).all()
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    assert np.array_equal(digits_features(u8), f)  # uint8 in 0..255 == float in [-1, 1]
    assert np.array_equal(digits_features(u8.repeat(1, 3, 1, 1)), f)  # grey RGB == grey
    assert np.array_equal(digits_features(x * 3), digits_features((x * 3).clamp(-1, 1)))  # floats are clamped
    np.testing.assert_allclose(digits_features(x, batch_size=7), f, rtol=0, atol=1e-4)


def test_shipped_digits_classifier_reads_the_real_digits():
    from onestep.eval import digits_logits

    x, y = digits_dataset()
    assert (digits_logits(x).argmax(1) == y).float().mean() > 0.99


def test_digits_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x, _ = digits_dataset()
    a = x[::4]
    assert digits_fid(a, a) == pytest.approx(0.0, abs=1e-6)
    fids = [digits_fid(torch.roll(a, s, dims=-1), a) for s in (0, 1, 2)]
    assert fids[0] < 1e-6 and fids[1] < fids[2]
    # The default reference is the whole real set; real digits are far closer to it than noise.
    assert digits_fid(a) < 0.2 * digits_fid(torch.rand_like(a) * 2 - 1)


def test_importing_onestep_eval_is_cheap():
    code = "import sys, onestep.eval; print('torch_fidelity' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
