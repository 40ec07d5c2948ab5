"""Analytic Gaussian-mixture teachers and the MLP denoiser used to distil them."""

from __future__ import annotations

import pytest
import torch

from onestep.denoiser import Denoiser
from onestep.errors import TeacherError
from onestep.schedule import NoiseSchedule
from onestep.teachers.gmm import (
    GMM_PRESETS,
    GMM_SCHEDULER_CONFIG,
    GaussianMixtureScore,
    MLPDenoiser,
    MLPDenoiserOutput,
    gmm_mixture,
)

PRESETS = sorted(GMM_PRESETS)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(GMM_SCHEDULER_CONFIG)


def teacher(name: str, schedule: NoiseSchedule) -> GaussianMixtureScore:
    return GaussianMixtureScore(*gmm_mixture(name), schedule.alphas_cumprod)


# ------------------------------------------------------------------ analytic score
@pytest.mark.parametrize("name", PRESETS)
def test_score_is_gradient_of_log_prob(name, schedule):
    model = teacher(name, schedule)
    g = torch.Generator().manual_seed(0)
    for t_val in (0, 10, 250, 500, 999):
        x = (5 * torch.randn(64, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
        t = torch.full((64,), t_val, dtype=torch.long)
        (grad,) = torch.autograd.grad(model.log_prob(x, t).sum(), x)
        score = model.score(x.detach(), t)
        assert score.dtype == torch.float64
        torch.testing.assert_close(score, grad, rtol=1e-9, atol=1e-9)


def test_log_prob_is_normalised_at_t0(schedule):
    model = teacher("gmm-ring8", schedule)
    lin = torch.linspace(-7, 7, 561, dtype=torch.float64)
    gx, gy = torch.meshgrid(lin, lin, indexing="ij")
    x = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    p = model.log_prob(x, torch.zeros(len(x), dtype=torch.long)).exp()
    mass = float(p.sum() * (lin[1] - lin[0]) ** 2)
    assert mass == pytest.approx(1.0, abs=1e-3)


def test_score_is_stable_far_from_modes(schedule):
    model = teacher("gmm-grid25", schedule)
    x = torch.tensor([[1e3, -1e3], [50.0, 0.0]], dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.long)
    score = model.score(x, t)
    assert torch.isfinite(score).all() and torch.isfinite(model.log_prob(x, t)).all()
    # Far away, the nearest centre dominates: score = -(x - a mu) / var of that component.
    a2 = schedule.alphas_cumprod[0]
    var = a2 * 0.2**2 + (1 - a2)
    expected = -(x - a2.sqrt() * torch.tensor([[4.0, -4.0], [4.0, 0.0]], dtype=torch.float64)) / var
    torch.testing.assert_close(score, expected)


# ---------------------------------------------------------------- denoiser (x0)
def test_denoiser_at_t0_returns_nearest_centre(schedule):
    model = teacher("gmm-ring8", schedule)
    den = Denoiser(model, schedule, "epsilon")
    means = model.means.float()
    g = torch.Generator().manual_seed(1)
    x_t = means + 0.01 * torch.randn(8, 2, generator=g)
    x0 = den(x_t, torch.zeros(8, dtype=torch.long))
    assert x0.dtype == torch.float32 and x0.shape == (8, 2)
    nearest = torch.cdist(x0, means).argmin(1)
    assert torch.equal(nearest, torch.arange(8))
    assert (x0 - means).norm(dim=1).max() < 0.03
    # Exact posterior mean of the (dominant) component: mu + a sig^2 / (a^2 sig^2 + s^2) (x_t - a mu).
    a, s = (v.double() for v in schedule.alpha_sigma(torch.zeros(1, dtype=torch.long)))
    shrink = a * 0.09 / (a**2 * 0.09 + s**2)
    expected = model.means + shrink * (x_t.double() - a * model.means)
    torch.testing.assert_close(x0.double(), expected, rtol=0, atol=1e-5)


def test_denoiser_at_t999_returns_mixture_mean(schedule):
    model = teacher("gmm-ring8-unbalanced", schedule)
    den = Denoiser(model, schedule, "epsilon")
    x0 = den(torch.zeros(4, 2), torch.full((4,), 999, dtype=torch.long))
    mixture_mean = (model.weights[:, None] * model.means).sum(0).float()
    torch.testing.assert_close(x0, mixture_mean.expand(4, 2), rtol=0, atol=1e-3)
    assert mixture_mean.norm() > 0.5  # unbalanced: the mean is not the origin


@pytest.mark.parametrize("name", PRESETS)
def test_denoiser_matches_tweedie(name, schedule):
    model = teacher(name, schedule)
    den = Denoiser(model, schedule, "epsilon")
    g = torch.Generator().manual_seed(2)
    for t_val in (0, 100, 500, 999):
        x_t = 3 * torch.randn(32, 2, generator=g)
        t = torch.full((32,), t_val, dtype=torch.long)
        x0 = den(x_t, t).double()
        a, s = (v.double()[:, None] for v in schedule.alpha_sigma(t))
        tweedie = (x_t.double() + s**2 * model.score(x_t, t)) / a
        torch.testing.assert_close(x0, tweedie, rtol=1e-4, atol=2e-3 if t_val == 999 else 1e-4)


def test_forward_timestep_forms_and_output(schedule):
    model = teacher("gmm-grid25", schedule)
    x = torch.randn(5, 2)
    ref = model(x, torch.full((5,), 300, dtype=torch.long))
    assert ref.dtype == torch.float32 and ref.shape == (5, 2)
    torch.testing.assert_close(model(x, 300), ref)
    torch.testing.assert_close(model(x, torch.tensor(300)), ref)
    _, s = schedule.alpha_sigma(torch.tensor([300]))
    expected = -s.double() * model.score(x, torch.full((5,), 300))
    torch.testing.assert_close(ref, expected.float())
    assert list(model.parameters()) == []
    assert {n for n, _ in model.named_buffers()} == {"means", "stds", "weights", "alphas_cumprod"}
    assert all(b.dtype == torch.float64 for b in model.buffers())


# ---------------------------------------------------------------- preset facts
def test_ring8_preset():
    means, stds, weights = gmm_mixture("gmm-ring8")
    assert means.dtype == stds.dtype == weights.dtype == torch.float64
    assert means.shape == (8, 2)
    torch.testing.assert_close(weights, torch.full((8,), 1 / 8, dtype=torch.float64))
    torch.testing.assert_close(means.norm(dim=1), torch.full((8,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(stds, torch.full((8,), 0.3, dtype=torch.float64))
    torch.testing.assert_close(means[2], torch.tensor([0.0, 4.0], dtype=torch.float64))


def test_ring8_unbalanced_preset():
    means, _, weights = gmm_mixture("gmm-ring8-unbalanced")
    torch.testing.assert_close(means, gmm_mixture("gmm-ring8")[0])
    assert float(weights.sum()) == pytest.approx(1.0)
    assert float(weights[-1] / weights[0]) == pytest.approx(8.0)
    torch.testing.assert_close(weights, torch.arange(1, 9, dtype=torch.float64) / 36)


def test_grid25_preset():
    means, stds, weights = gmm_mixture("gmm-grid25")
    assert means.shape == (25, 2)
    assert len({tuple(m.tolist()) for m in means}) == 25
    assert set(means.flatten().tolist()) == {-4.0, -2.0, 0.0, 2.0, 4.0}
    torch.testing.assert_close(stds, torch.full((25,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(weights, torch.full((25,), 1 / 25, dtype=torch.float64))


def test_gmm_mixture_returns_copies():
    gmm_mixture("gmm-ring8")[0].mul_(0)
    assert gmm_mixture("gmm-ring8")[0].norm(dim=1).min() == pytest.approx(4.0)


@pytest.mark.parametrize("name", PRESETS)
def test_sample_matches_weights(name, schedule):
    model = teacher(name, schedule)
    x0, k = model.sample(20000, generator=torch.Generator().manual_seed(3))
    assert x0.shape == (20000, 2) and x0.dtype == torch.float32 and k.shape == (20000,)
    freq = torch.bincount(k, minlength=len(model.weights)).double() / 20000
    assert (freq - model.weights).abs().max() < 0.02
    # Each draw lies near its own component's centre.
    dist = (x0.double() - model.means[k]).norm(dim=1)
    assert float(dist.max()) < 6 * float(model.stds.max())


def test_sample_is_reproducible(schedule):
    model = teacher("gmm-ring8", schedule)
    a, ka = model.sample(100, generator=torch.Generator().manual_seed(7))
    b, kb = model.sample(100, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(ka, kb)


def test_unknown_preset_raises():
    with pytest.raises(TeacherError, match="gmm-ring8-unbalanced"):
        gmm_mixture("gmm-ring9")


# ---------------------------------------------------------------- MLP denoiser
def small_mlp(**kw) -> MLPDenoiser:
    return MLPDenoiser(hidden_dim=32, num_layers=3, time_embed_dim=16, **kw)


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_mlp_fresh_predicts_zero_and_shapes():
    model = small_mlp()
    x = torch.randn(6, 2)
    out = model(x, torch.arange(6) * 100)
    assert isinstance(out, MLPDenoiserOutput)
    assert out.sample.shape == (6, 2)
    assert torch.equal(out.sample, torch.zeros(6, 2))
    perturb(model)
    y = model(x, torch.arange(6) * 100).sample
    assert y.abs().max() > 0
    torch.testing.assert_close(model(x, 500, return_dict=False)[0], model(x, torch.tensor(500)).sample)
    torch.testing.assert_close(model(x, 500).sample, model(x, torch.full((6,), 500)).sample)
    assert not torch.allclose(model(x, 0).sample, model(x, 999).sample)


def test_mlp_save_and_load_roundtrip(tmp_path):
    model = small_mlp(num_class_embeds=3)
    perturb(model)
    model.save_pretrained(tmp_path, safe_serialization=True)
    files = [p.name for p in tmp_path.iterdir()]
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith(".bin") for f in files)
    loaded = MLPDenoiser.from_pretrained(tmp_path)
    assert loaded.config.hidden_dim == 32 and loaded.config.num_class_embeds == 3
    x, t, c = torch.randn(4, 2), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 1])
    assert torch.equal(model(x, t, c).sample, loaded(x, t, c).sample)


def test_mlp_class_labels_change_output():
    model = small_mlp(num_class_embeds=3)
    perturb(model, seed=1)
    x, t = torch.randn(4, 2), torch.full((4,), 200)
    outs = [model(x, t, torch.full((4,), c)).sample for c in range(3)]
    assert not torch.allclose(outs[0], outs[1])
    assert not torch.allclose(outs[1], outs[2])
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t)


def test_mlp_mid_block_hook_and_denoiser_features(schedule):
    model = small_mlp()
    seen = []
    handle = model.mid_block.register_forward_hook(lambda m, i, o: seen.append(o))
    model(torch.randn(5, 2), torch.full((5,), 7))
    handle.remove()
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor) and seen[0].shape == (5, 32)
    x0, feats = Denoiser(model, schedule, "epsilon")(torch.randn(5, 2), torch.full((5,), 7), return_features=True)
    assert x0.shape == (5, 2) and feats.shape == (5, 32)


def test_mlp_gradients_flow():
    model = small_mlp()
    out = model(torch.randn(3, 2), torch.tensor([1, 2, 3])).sample
    (out - 1).square().sum().backward()
    assert model.out_proj.weight.grad.abs().sum() > 0
    assert model.out_proj.bias.grad.abs().sum() > 0
