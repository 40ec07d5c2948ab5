"""Precision and recall (k-NN manifolds, Kynkäänniemi et al. 2019): hand-computed cases, identical
sets, a generator that covers one of two modes, the digits and the eval CLI."""

import json
import time

import numpy as np
import pytest
import torch

from onestep.errors import OnestepError
from onestep.eval.precision_recall import knn_precision_recall, precision_recall, torch_fidelity_precision_recall

IMPLEMENTATIONS = [knn_precision_recall, torch_fidelity_precision_recall]


def _all(fake, real, k):
    """(precision, recall) from each implementation and from the public function (arrays in, float64)."""
    f, r = torch.tensor(fake, dtype=torch.float32), torch.tensor(real, dtype=torch.float32)
    if f.ndim == 1:
        f, r = f[:, None], r[:, None]
    outs = [impl(f, r, k) for impl in IMPLEMENTATIONS]
    m = precision_recall(f.double().numpy(), r.double().numpy(), k=k)
    return outs + [(m["precision"], m["recall"])]


def test_hand_computed_one_dimensional_case():
    # real 0, 1, 3, 10: radii with k=1 (nearest other point): 1, 1, 2, 7.
    # fake 0.5, 1.5, 20, 22: radii 1, 1, 2, 2.
    # precision: 0.5 (|0.5-0| <= 1) and 1.5 (|1.5-1| <= 1) are inside; 20 and 22 (10 away from 10 > 7) are not: 2/4.
    # recall: 0 and 1 lie within 1 of 0.5; 3 is 1.5 from 1.5 (> 1) and 2.5 from 0.5 (> 1); 10 is 10 from 20 (> 2): 2/4.
    for p, r in _all([0.5, 1.5, 20, 22], [0, 1, 3, 10], k=1):
        assert (p, r) == (0.5, 0.5)
    # k=2 (second nearest): real radii 3, 2, 3, 9; fake radii 19.5, 18.5, 18.5, 20.5.
    # precision: 0.5, 1.5 inside; 20 is 10 from 10 (> 9), 22 is 12 away: 2/4. recall: every real point lies within
    # 18.5 of 1.5 (10 is 8.5 away): 4/4.
    for p, r in _all([0.5, 1.5, 20, 22], [0, 1, 3, 10], k=2):
        assert (p, r) == (0.5, 1.0)


def test_hand_computed_two_dimensional_case_counts_the_boundary_as_inside():
    # real (0,0), (3,4), (6,8): each one's nearest other point is 5 away: radii 5.
    # fake (3,0): 3 from (0,0) -> inside; (9,8): 3 from (6,8) -> inside; (6,13): exactly 5 from (6,8) -> inside (<=);
    # (20,20): 18.4 from (6,8) -> outside. precision 3/4.
    # fake radii (k=1): (3,0)->(9,8) 10; (9,8)->(6,13) 5.83; (6,13)->(9,8) 5.83; (20,20)->(6,13) 15.7.
    # recall: (0,0) is 3 from (3,0) <= 10; (3,4) is 4 from (3,0); (6,8) is 3 from (9,8) <= 5.83: 3/3.
    fake, real = [[3, 0], [9, 8], [6, 13], [20, 20]], [[0, 0], [3, 4], [6, 8]]
    for p, r in _all(fake, real, k=1):
        assert (p, r) == (0.75, 1.0)


def test_identical_feature_sets_give_precision_and_recall_one():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    for p, r in _all(x.numpy(), x.numpy(), k=3):
        assert (p, r) == (1.0, 1.0)
    m = precision_recall(x.double().numpy(), x.double().numpy())
    assert m["prc_neighborhood"] == 3 and "torch-fidelity" in m["prc_implementation"]


def test_a_generator_covering_one_of_two_modes_has_high_precision_and_half_recall():
    # In 2D, 300 points' 3-NN balls cover a Gaussian well (in many dimensions even a perfect sample's
    # precision drops below 1: 0.87 in 8D here), so the two numbers are read without that effect.
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g) + 20  # two clusters, far apart
    real = torch.cat([a, b])
    fake = torch.randn(300, 2, generator=g)  # new draws of the first cluster only
    results = _all(fake.numpy(), real.numpy(), k=3)
    for p, r in results:
        assert p > 0.95 and 0.45 < r <= 0.5  # at most the 300 real points of the first cluster are covered
    assert results[0] == pytest.approx(results[1], abs=1e-6)  # onestep's and torch-fidelity's implementations agree (it averages in float32)
    # Both modes covered: recall near 1, the same precision.
    fake2 = torch.cat([fake[:150], torch.randn(150, 2, generator=g) + 20])
    p2, r2 = knn_precision_recall(fake2, real, 3)
    assert p2 > 0.95 and r2 > 0.9


def test_digits_that_miss_half_the_classes_show_as_low_recall():
    from onestep.digits import digits_dataset
    from onestep.eval import digits_features

    x, y = digits_dataset()
    f = torch.from_numpy(digits_features(x))
    ref, held = f[::2], f[1::2]  # two disjoint halves of the real digits
    y_held = y[1::2]
    full = precision_recall(held, ref)
    half = precision_recall(held[y_held < 5], ref)
    assert full["precision"] > 0.85 and full["recall"] > 0.85
    assert half["precision"] > 0.85 and 0.35 < half["recall"] < 0.65


def test_bad_inputs_are_clear_errors():
    with pytest.raises(OnestepError, match="at least 4 images a side"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(OnestepError, match="of one width"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(OnestepError, match="at least 1"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 2)), k=0)


def test_cost_is_small_at_the_sample_counts_used():
    """The digits evaluations: up to a few thousand samples against the 1797 real digits (64 features)."""
    g = torch.Generator().manual_seed(2)
    fake, real = torch.randn(3000, 64, generator=g).numpy(), torch.randn(1797, 64, generator=g).numpy()
    start = time.perf_counter()
    m = precision_recall(fake, real)
    assert time.perf_counter() - start < 10.0 and 0 < m["precision"] <= 1 and 0 < m["recall"] <= 1


def test_fid_kid_from_features_adds_precision_and_recall():
    from onestep.eval.frechet import feature_statistics
    from onestep.eval.metrics import fid_kid_from_features

    g = torch.Generator().manual_seed(3)
    real = torch.randn(100, 8, generator=g).double().numpy()
    mu, sigma = feature_statistics(real)
    m = fid_kid_from_features(real, {"mu": mu, "sigma": sigma, "features": real}, kid_subset_size=50)
    assert m["precision"] == m["recall"] == 1.0 and m["prc_neighborhood"] == 3
    m = fid_kid_from_features(real, {"mu": mu, "sigma": sigma, "features": None})  # a foreign statistics file
    assert m["precision"] is None and "no features" in m["prc_note"]
    m = fid_kid_from_features(real[:3], {"mu": mu, "sigma": sigma, "features": real}, kid=False)
    assert m["recall"] is None and "fewer than 4" in m["prc_note"]
    assert "precision" not in fid_kid_from_features(real, {"mu": mu, "sigma": sigma, "features": real}, prc=False)


def test_eval_fid_cli_reports_precision_and_recall(tmp_path, capsys):
    from PIL import Image

    from onestep.cli import main
    from onestep.digits import digits_dataset
    from onestep.viz import to_uint8

    x, y = digits_dataset()
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, im in enumerate(to_uint8(x[y < 5][:200])):  # half the classes
        Image.fromarray(im[..., 0]).save(imgs / f"{i:04d}.png")
    argv = ["eval", "fid", "--images", str(imgs), "--no-kid", "--no-progress", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "ev")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "precision" in printed and "recall" in printed
    rec = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert rec["metrics"]["precision"] > 0.9 and rec["metrics"]["recall"] < 0.6 and rec["prc_neighborhood"] == 3
    assert main(argv + ["--no-prc"]) == 0
    rec = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "precision" not in rec["metrics"]
