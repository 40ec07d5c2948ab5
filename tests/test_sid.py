"""SiD (trainers/sid.py): the loss's gradient against its closed form, the divergence's zero at the
start of training, and the official code's noise levels (``sid_t_sampling: karras``)."""

import pytest
import torch

from conftest import tiny_config
from onestep.errors import ConfigError
from onestep.trainers import make_trainer
from onestep.trainers.sid import KARRAS_RHO, karras_timesteps, sid_loss


def test_sid_gradient_through_both_scores_matches_the_closed_form():
    # Linear "score networks" f_p = A x_t, f_q = B x_t on x_t = a x_g + s e: autograd through both,
    # against the closed form of d/dx_g of mean(diff * ((f_p - x_g) - alpha diff)) / n, n = sg(mean|x_g - f_p|),
    # with diff = f_p - f_q and the Jacobians J_p = a A, J_q = a B of the scores with respect to x_g.
    g = torch.Generator().manual_seed(0)
    d, a, s, alpha = 6, 0.8, 0.6, 1.2
    A, B = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
    x_g = torch.randn(1, d, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(1, d, generator=g, dtype=torch.float64)
    x_t = a * x_g + s * e
    f_p, f_q = x_t @ A.T, x_t @ B.T
    sid_loss(x_g, f_p, f_q, alpha).backward()
    with torch.no_grad():
        x, fp, fq = x_g, f_p, f_q
        n = (x - fp).abs().mean()
        diff, r = fp - fq, fp - x
        J_p, J_q = a * A, a * B  # d f / d x_g
        # d/dx [diff . (r - alpha diff)] = (J_p - J_q)^T (r - alpha diff) + (J_p - I)^T diff - alpha (J_p - J_q)^T diff
        grad = (r - 2 * alpha * diff) @ (J_p - J_q) + diff @ (J_p - torch.eye(d, dtype=torch.float64))
        expected = grad / n / d  # the loss is a mean over the d elements
    torch.testing.assert_close(x_g.grad, expected.float().double(), rtol=1e-5, atol=1e-7)
    # With the scores detached only the direct term is left: (f_q - f_p) / n, DMD's direction.
    x2 = x_g.detach().clone().requires_grad_(True)
    sid_loss(x2, f_p.detach(), f_q.detach(), alpha).backward()
    torch.testing.assert_close(x2.grad, ((fq - fp) / n / d).float().double(), rtol=1e-5, atol=1e-7)


def test_sid_generator_gradient_is_zero_while_the_fake_score_is_the_teacher(tmp_path, tiny_teacher_dir):
    # Without guidance the fake score starts as an exact copy of the teacher: f_p = f_q on every x_t, so
    # the loss and (SiD differentiates through both, with equal Jacobians) its gradient are zero.
    def largest_grad(guidance_scale, where):
        tr = make_trainer(tiny_config("sid", tmp_path / where, tiny_teacher_dir, guidance_scale=guidance_scale, export=False))
        loss, _ = tr.generator_loss(tr.make_batch())
        loss.backward()
        grads = [p.grad for p in tr.generator.parameters() if p.grad is not None]
        assert grads
        return loss.item(), max(float(g.abs().max()) for g in grads)

    loss, grad = largest_grad(1.0, "plain")
    # With guidance the teacher differs from the fake score from the start: a real gradient.
    _, grad_guided = largest_grad(2.0, "guided")
    # (the two networks' passes may round differently: the loss is zero to float precision, not bit for bit)
    assert abs(loss) < 1e-6 and grad_guided > 1e-4
    # Zero up to rounding: the two backward passes through equal networks cancel (6e-9 against 1e-2 here).
    assert grad < 1e-5 * grad_guided
    # SiD-LSG: the fake score guided at the teacher's scale is the guided teacher again, and the zero is back
    tr = make_trainer(tiny_config("sid", tmp_path / "lsg", tiny_teacher_dir, guidance_scale=2.0, fake_guidance_scale=2.0, export=False))
    loss, _ = tr.generator_loss(tr.make_batch())
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert max(float(p.grad.abs().max()) for p in tr.generator.parameters() if p.grad is not None) < 1e-5 * grad_guided


def test_lsg_fake_score_training_drops_conditions_and_plain_sid_does_not(tmp_path, tiny_teacher_dir, monkeypatch):
    seen = []
    for where, extra in (("plain", {}), ("lsg", {"fake_guidance_scale": 2.0, "fake_uncond_prob": 0.5})):
        tr = make_trainer(tiny_config("sid", tmp_path / where, tiny_teacher_dir, guidance_scale=2.0, batch_size=64, export=False, **extra))
        monkeypatch.setattr(tr, "denoising_loss", lambda net, x0, cond: seen.append(cond) or torch.zeros(()))
        batch = tr.make_batch()
        batch["x_gen"] = torch.zeros(64, *tr.teacher_spec.sample_shape)
        tr.fake_score_loss(batch)
        dropped = (seen[-1] != batch["cond"]).float().mean().item()
        null = tr.conditioning.null(1)
        assert dropped == 0 if not extra else (0.3 < dropped < 0.7 and (seen[-1][seen[-1] != batch["cond"]] == null).all())
    with pytest.raises(ConfigError, match="fake_uncond_prob must lie in"):
        tiny_config("sid", tmp_path, tiny_teacher_dir, fake_uncond_prob=1.0)


def test_karras_timesteps_follow_the_sid_code_ladder(tiny_teacher):
    schedule = tiny_teacher.schedule
    T = schedule.num_train_timesteps
    low, high = 20, int(0.8 * T)
    t = karras_timesteps(schedule, 20000, low, high, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= low and int(t.max()) <= high
    a, s = schedule.alpha_sigma(t)
    # sigma^(1/rho) is uniform between its values at the ends: its quartiles sit at 1/4, 1/2, 3/4 of the way.
    ends = [float(v) for v in ((lambda a_, s_: (s_ / a_) ** (1 / KARRAS_RHO))(*schedule.alpha_sigma(torch.tensor([low, high]))))]
    u = ((s / a) ** (1 / KARRAS_RHO) - ends[0]) / (ends[1] - ends[0])
    for q in (0.25, 0.5, 0.75):
        assert abs(float(torch.quantile(u.double(), q)) - q) < 0.02
    # Most draws at low noise: the median t lies well below the middle of [low, high] (uniform's median).
    assert float(t.float().median()) < (low + high) / 2 - 0.1 * (high - low)
    # Deterministic for a seeded generator; a one-point range gives that point.
    again = karras_timesteps(schedule, 20000, low, high, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    assert torch.equal(karras_timesteps(schedule, 5, 300, 300), torch.full((5,), 300))


def test_sid_t_sampling_in_the_trainer(tmp_path, tiny_teacher_dir):
    uniform = make_trainer(tiny_config("sid", tmp_path / "u", tiny_teacher_dir, loss_t_range=[0.1, 0.6], export=False))
    karras = make_trainer(tiny_config("sid", tmp_path / "k", tiny_teacher_dir, loss_t_range=[0.1, 0.6], sid_t_sampling="karras", export=False))
    T = uniform.schedule.num_train_timesteps
    # 'uniform' (the default) is the shared sampler, draw for draw.
    uniform.state.reseed()
    t_u = uniform.sid_t(4000)
    uniform.state.reseed()
    torch.testing.assert_close(t_u, uniform.sample_t(4000, 0.1, 0.6))
    karras.state.reseed()
    t_k = karras.sid_t(4000)
    for t in (t_u, t_k):
        assert int(t.min()) >= round(0.1 * T) and int(t.max()) <= round(0.6 * T)
    assert float(t_k.float().mean()) < float(t_u.float().mean()) - 0.02 * T  # more draws at low noise
    # A generator step runs with it.
    loss, logs = karras.generator_loss(karras.make_batch())
    assert torch.isfinite(loss) and "loss/sid" in logs
    with pytest.raises(ConfigError, match="sid_t_sampling"):
        tiny_config("sid", tmp_path / "bad", tiny_teacher_dir, sid_t_sampling="lognormal")
