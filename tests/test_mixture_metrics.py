"""The exact 2-D mixture metrics of the quality benchmark, and that every shipped preset builds."""

from pathlib import Path

import pytest
import torch

from onestep.eval.mixture import held_by_mode, mixture_metrics, sample_mixture, sliced_w2
from onestep.teachers.gmm import gmm_mixture


def test_exact_samples_cover_every_mode_with_the_true_weights():
    mix = gmm_mixture("gmm-ring8-unbalanced")
    m = mixture_metrics(sample_mixture(mix, 20000, seed=5), mix)
    assert m["modes_covered"] == 8 and m["num_modes"] == 8
    assert m["tv"] < 0.02
    assert abs(m["within_3std"] - 0.989) < 0.005  # P(chi2_2 < 9) = 1 - exp(-4.5)
    assert m["sliced_w2"] < 0.1


def test_hand_made_samples():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    mix = (means, torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64))
    # 3 samples on mode 0, 1 on mode 1, 1 far from both.
    x = torch.tensor([[0.1, 0.0], [0.0, 2.9], [-1.0, 1.0], [10.0, 1.0], [5.0, 0.0]])
    torch.testing.assert_close(held_by_mode(x, mix), torch.tensor([0.6, 0.2], dtype=torch.float64))
    m = mixture_metrics(x, mix)
    assert m["within_3std"] == pytest.approx(0.8)
    assert m["mode_weights"] == [0.75, 0.25]
    assert m["tv"] == pytest.approx(0.25)  # 0.5 * (|0.75 - 0.5| + |0.25 - 0.5|)
    assert m["modes_covered"] == 1  # mode 1 holds 0.2 < 0.5 * 0.5


def test_dropping_modes_and_shifting_are_seen():
    mix = gmm_mixture("gmm-grid25")
    x = sample_mixture(mix, 5000, seed=1)
    full = mixture_metrics(x, mix)
    half = mixture_metrics(x[x[:, 0] > 1], mix)  # two columns of modes only
    assert half["modes_covered"] == 10 and half["tv"] > 0.5
    shifted = mixture_metrics(x + 0.5, mix)
    assert shifted["within_3std"] < 0.5 and shifted["sliced_w2"] > 3 * full["sliced_w2"]


def test_sliced_w2_of_a_translation_is_its_projected_length():
    a = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sliced_w2(a, a) == 0.0
    # W2 of a 1-D translation by c.u is |c.u|; averaged over random unit directions u: |c|^2 / 2 in 2-D.
    assert sliced_w2(a, a + torch.tensor([2.0, 0.0], dtype=torch.float64), num_directions=2000) == pytest.approx(2 / 2**0.5, rel=0.05)


def test_metrics_reject_bad_input():
    mix = gmm_mixture("gmm-ring8")
    with pytest.raises(ValueError, match="shape"):
        mixture_metrics(torch.zeros(5, 3), mix)
    with pytest.raises(ValueError, match="NaN"):
        mixture_metrics(torch.full((5, 2), float("nan")), mix)


PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_shipped_preset_builds_its_config(name):
    from onestep.trainers import load_config

    cfg = load_config(name)
    assert cfg.method and cfg.output_dir == str(Path("runs") / name)
