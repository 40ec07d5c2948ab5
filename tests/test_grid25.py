"""gmm-grid25 students in the blobs: the Fourier-feature MLP, the grid's student network, the
regression warm start's own learning rate and the grid preset (benchmarks/grid25.py has the figures)."""

from __future__ import annotations

import pytest
import torch

from onestep.errors import ConfigError
from onestep.teachers import load_teacher
from onestep.teachers.gmm import GMM_STUDENT_CONFIGS, MLPDenoiser, gmm_student
from onestep.trainers import load_config, make_trainer


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_fourier_features_widen_the_input_and_leave_the_default_alone():
    torch.manual_seed(0)
    plain = MLPDenoiser(hidden_dim=32, num_layers=2)
    torch.manual_seed(0)
    also_plain = MLPDenoiser(hidden_dim=32, num_layers=2, fourier_features=0)
    assert plain.fourier_freqs is None and plain.input_proj.in_features == 2
    for a, b in zip(plain.state_dict().values(), also_plain.state_dict().values()):
        assert torch.equal(a, b)  # the default network is the old one, parameter for parameter
    ff = MLPDenoiser(hidden_dim=32, num_layers=2, fourier_features=8, fourier_scale=3.0)
    assert ff.input_proj.in_features == 2 + 2 * 8
    assert ff.fourier_freqs.shape == (2, 8)
    # fixed frequencies (own seed), scaled by fourier_scale, and not part of the saved weights
    again = MLPDenoiser(hidden_dim=32, num_layers=2, fourier_features=8, fourier_scale=1.0)
    torch.testing.assert_close(ff.fourier_freqs, 3.0 * again.fourier_freqs)
    assert "fourier_freqs" not in ff.state_dict()


def test_fourier_frequencies_do_not_depend_on_the_global_seed():
    torch.manual_seed(1)
    a = MLPDenoiser(hidden_dim=16, num_layers=1, fourier_features=4)
    torch.manual_seed(2)
    b = MLPDenoiser(hidden_dim=16, num_layers=1, fourier_features=4)
    assert torch.equal(a.fourier_freqs, b.fourier_freqs)  # rebuilt identically from the config on load
    assert not torch.equal(a.input_proj.weight, b.input_proj.weight)  # the weights do follow the global seed


def test_fourier_mlp_roundtrip(tmp_path):
    model = MLPDenoiser(hidden_dim=32, num_layers=2, fourier_features=8, fourier_scale=2.0)
    _perturb(model)
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = MLPDenoiser.from_pretrained(tmp_path)
    assert loaded.config.fourier_features == 8 and loaded.config.fourier_scale == 2.0
    x, t = torch.randn(5, 2), torch.tensor([0, 10, 500, 900, 999])
    assert torch.equal(model(x, t).sample, loaded(x, t).sample)


#: The 1-D noise -> sample map of five equal modes at -4, -2, 0, 2, 4 (one coordinate of gmm-grid25,
#: whose mixture is a product of two such): a staircase with a jump at each fifth quantile of N(0, 1).
_QUANTILES = torch.tensor([-0.8416, -0.2533, 0.2533, 0.8416])


def _fit_staircase(model: MLPDenoiser, steps: int = 150) -> float:
    """Training MSE after fitting the grid's staircase map from 512 noise draws."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 2, generator=g)
    y = 2.0 * (torch.bucketize(z, _QUANTILES).float() - 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t = torch.full((512,), 999)
    for _ in range(steps):
        loss = (model(z, t).sample - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_fourier_features_fit_the_grid_staircase_better():
    for seed in (0,):
        torch.manual_seed(seed)
        plain = _fit_staircase(MLPDenoiser(hidden_dim=32, num_layers=2))
        torch.manual_seed(seed)
        fourier = _fit_staircase(MLPDenoiser(hidden_dim=32, num_layers=2, fourier_features=16, fourier_scale=2.0))
        assert fourier < 0.92 * plain, (seed, fourier, plain)


def test_grid_teacher_builds_fourier_students_and_the_rings_do_not():
    grid = load_teacher("gmm-grid25").new_backbone()
    assert grid.config.fourier_features == GMM_STUDENT_CONFIGS["gmm-grid25"]["fourier_features"] > 0
    assert grid.input_proj.in_features == 2 + 2 * grid.config.fourier_features
    for name in ("gmm-ring8", "gmm-ring8-unbalanced"):
        ring = load_teacher(name).new_backbone()
        assert ring.config.fourier_features == 0 and ring.input_proj.in_features == 2
        assert gmm_student(name).config.fourier_features == 0


def _tiny(tmp_path, **overrides):
    values = {
        "log_with": "none", "export": False, "checkpoint_every": 0, "preview_every": 0, "batch_size": 8,
        "regression_pairs": 16, "regression_ode_steps": 2, "max_steps": 6,
    }
    values.update(overrides)
    return make_trainer(load_config("gmm_dmd2", values, output_dir=str(tmp_path)))


def test_lr_regression_sets_the_warm_start_rate_then_lr_generator(tmp_path):
    tr = _tiny(tmp_path, regression_warmup_steps=3, lr_regression=1e-2, lr_generator=1e-4, fake_updates_per_generator=1)
    lrs = []
    for _ in range(5):
        lrs.append(tr.opt_g.param_groups[0]["lr"])
        tr.train_step()
    assert lrs[:3] == [1e-2] * 3
    assert lrs[3:] == [1e-4] * 2


def test_lr_regression_unset_keeps_lr_generator(tmp_path):
    tr = _tiny(tmp_path, regression_warmup_steps=2, lr_generator=1e-4, fake_updates_per_generator=1)
    assert tr.config.lr_regression is None
    lrs = []
    for _ in range(4):
        lrs.append(tr.opt_g.param_groups[0]["lr"])
        tr.train_step()
    assert lrs == [1e-4] * 4


def test_lr_regression_must_be_positive(tmp_path):
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ConfigError, match="lr_regression"):
            load_config("gmm_dmd2", {"lr_regression": bad}, output_dir=str(tmp_path))


def test_grid_preset():
    c = load_config("gmm_dmd2_grid25", {}, output_dir="/tmp/unused")
    assert c.teacher == "gmm-grid25" and c.method == "dmd2"
    assert c.regression_warmup_steps > 0 and c.lr_regression > c.lr_generator
    assert c.loss_t_range[1] <= 0.5
    # the ring preset is untouched: no warm-start rate of its own
    assert load_config("gmm_dmd2", {}, output_dir="/tmp/unused").lr_regression is None
