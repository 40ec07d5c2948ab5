"""CTM as in SoundCTM (trainers/ctm.py) and its jumps and gamma/nu-sampling (onestep/ctm.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import changed, state_of, tiny_config

from onestep.ctm import CTMDenoiser, JumpInput, feature_distance, gamma_target, jump
from onestep.errors import ConfigError
from onestep.export import load_student
from onestep.samplers.student import sample_student_from_seeds, student_sample
from onestep.schedule import expand_like
from onestep.teachers import load_teacher
from onestep.trainers import CTMTrainer, make_trainer


def ctm_config(tmp_path, teacher_dir, **overrides):
    values = dict(max_steps=2, batch_size=4, num_ddim_timesteps=8, max_timestep=959, solver_steps=2, target_ema_decay=0.9)
    values.update(overrides)
    return tiny_config("ctm", tmp_path, teacher_dir, **values)


def test_a_jump_is_a_ddim_step_with_both_boundaries(tiny_teacher_dir):
    schedule = load_teacher(tiny_teacher_dir).schedule
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t, s = torch.tensor([900, 500, 300]), torch.tensor([400, 0, 300])
    x_t = schedule.add_noise(x0, e, t)
    out = jump(schedule, x_t, x0, t, s)  # the exact x0: DDIM keeps the noise, x_s = a_s x0 + s_s e
    a, sg = (expand_like(v, x0) for v in schedule.alpha_sigma(s))
    torch.testing.assert_close(out[0], (a * x0 + sg * e)[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1], x0[1])  # s = 0: the end, g itself
    torch.testing.assert_close(out[2], x_t[2])  # s = t: x_t itself
    other = torch.zeros_like(x0)
    torch.testing.assert_close(jump(schedule, x_t, other, t, t), x_t)  # G(x, t, t) = x whatever g


def test_feature_distance_is_scale_free_and_hand_computable():
    a = torch.zeros(2, 2, 3, 3)
    a[:, 0] = 1.0
    b = torch.zeros(2, 2, 3, 3)
    b[0, 0] = 5.0  # same direction, other length: distance 0
    b[1, 1] = 1.0  # orthogonal: (1 - 0)^2 + (0 - 1)^2 over 2 channels, mean 1 per map
    d = feature_distance([a, a * 3], [b, b])
    torch.testing.assert_close(d, torch.tensor([0.0, 2.0]))


def test_the_student_starts_as_the_teacher_for_every_jump_target(tiny_teacher_dir, tmp_path):
    trainer = make_trainer(ctm_config(tmp_path, tiny_teacher_dir))
    assert isinstance(trainer, CTMTrainer) and trainer.fake is None and trainer.jump_input.kind == "class_table"
    assert trainer.jump_input.levels == [0] + trainer.grid and trainer.jump_input.stride == 11
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([959, 600, 120]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        ref = trainer.teacher(x, t, y)
        for s in ([0, 0, 0], [839, 359, 119]):
            torch.testing.assert_close(trainer.student.g(x, t, torch.tensor(s), y), ref)


def test_estimate_and_target_agree_at_the_start_when_s_is_u(tiny_teacher_dir, tmp_path, monkeypatch):
    # one teacher step t -> u with s = u: the target is x_u itself, the untrained estimate that same DDIM step
    trainer = make_trainer(ctm_config(tmp_path, tiny_teacher_dir, guidance_scale=1.0, uncond_prob=0.0, dsm_weight=0.0, distance="l2"))
    monkeypatch.setattr(trainer, "draw", lambda n: (1, torch.tensor([8, 5, 2, 1]), torch.tensor([7, 4, 1, 0]), torch.tensor([7, 4, 1, 0])))
    loss, _ = trainer.generator_loss(trainer.make_batch())
    assert float(loss.detach()) < 1e-8
    # s below u: the student jumps straight, the target in two steps: a real difference to learn
    monkeypatch.setattr(trainer, "draw", lambda n: (2, torch.tensor([8, 5, 3, 2]), torch.tensor([6, 3, 1, 0]), torch.tensor([0, 1, 0, 0])))
    assert float(trainer.generator_loss(trainer.make_batch())[0].detach()) > 1e-6


def test_a_ctm_step_trains_the_student_moves_the_target_by_ema_and_leaves_the_teacher(tiny_teacher_dir, tmp_path):
    trainer = make_trainer(ctm_config(tmp_path, tiny_teacher_dir))
    g0, t0, tg0 = state_of(trainer.generator.backbone), state_of(trainer.teacher.backbone), state_of(trainer.extras["target"])
    logs = trainer.train_step()
    assert {"loss/ctm", "loss/dsm"} <= set(logs) and all(math.isfinite(v) for v in logs.values())
    assert changed(g0, trainer.generator.backbone) > 0 and changed(t0, trainer.teacher.backbone) == 0
    g1 = trainer.generator.backbone.state_dict()
    for k, v in trainer.extras["target"].state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * tg0[k] + 0.1 * g1[k])


def test_ctm_gan_trains_its_head_on_real_against_end_points_and_reaches_the_student(tiny_teacher_dir, tmp_path):
    plain = make_trainer(ctm_config(tmp_path / "plain", tiny_teacher_dir))
    assert len(plain.heads) == 0 and not plain.is_fake_step(0)
    trainer = make_trainer(ctm_config(tmp_path / "gan", tiny_teacher_dir, gan_weight=0.5, gan_head_channels=16))
    assert trainer.is_fake_step(0) and set(trainer.heads) == {"gan"}
    g0, t0, h0 = state_of(trainer.generator.backbone), state_of(trainer.teacher.backbone), state_of(trainer.heads)
    batch = trainer.make_batch()
    loss, logs = trainer.generator_loss(batch)
    # the head takes no gradient from the generator's term, the student does (through the teacher's features)
    loss.backward()
    assert all(p.grad is None for p in trainer.heads.parameters())
    assert logs["loss/adv_g"] != 0 and batch["t_d"].shape == (4,) and batch["e_d"].shape == batch["real"].shape
    d_loss, d_logs = trainer.fake_score_loss(batch)  # hinge on real vs the end points, same t' and noise
    real, fake = (trainer.discriminate(x, batch["gan_cond"], batch["t_d"], batch["e_d"]) for x in (batch["real"].float(), batch["x_gen"]))
    torch.testing.assert_close(d_loss, torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
    trainer.generator.zero_grad(set_to_none=True)
    logs = trainer.train_step()
    assert {"loss/adv_g", "loss/adv_d", "grad_norm/fake"} <= set(logs)
    assert changed(g0, trainer.generator.backbone) > 0 and changed(h0, trainer.heads) > 0
    assert changed(t0, trainer.teacher.backbone) == 0
    with pytest.raises(ConfigError, match="gan_weight must be >= 0"):
        ctm_config(tmp_path, tiny_teacher_dir, gan_weight=-1.0)


def test_ctm_gan_on_one_step_judges_the_students_one_step_samples_at_low_noise(tiny_teacher_dir, tmp_path, monkeypatch):
    trainer = make_trainer(ctm_config(tmp_path, tiny_teacher_dir, gan_weight=0.5, gan_head_channels=16, gan_on="one_step", gan_t_max=50))
    batch = trainer.make_batch()
    calls = []
    G = trainer.G
    monkeypatch.setattr(trainer, "G", lambda net, x, t, s, cond: calls.append((net, x, t, s)) or G(net, x, t, s, cond))
    trainer.generator_loss(batch)
    assert (batch["t_d"] <= 50).all()
    # what the head judges is the student's one-step sample of a pure-noise draw, G(z, t_top, 0), as one-step sampling gives it
    net, z, t, s = calls[-1]
    assert net is trainer.student and (t == trainer.grid[-1]).all() and (s == 0).all() and z.shape == batch["real"].shape
    assert abs(float(z.std()) - 1) < 0.2  # pure noise, not a noised real sample
    with torch.no_grad():
        expected = G(trainer.student, z, t, s, batch["gan_cond"])
    torch.testing.assert_close(batch["x_gen"], expected)
    with pytest.raises(ConfigError, match="gan_on must be one of"):
        ctm_config(tmp_path, tiny_teacher_dir, gan_on="pixels")
    with pytest.raises(ConfigError, match="gan_t_max must lie in"):
        make_trainer(ctm_config(tmp_path / "big", tiny_teacher_dir, gan_weight=0.5, gan_t_max=5000)).generator_loss(batch)


def test_gamma_one_is_the_consistency_sampler_and_gamma_zero_is_deterministic(tiny_teacher_dir, tmp_path):
    trainer = make_trainer(ctm_config(tmp_path, tiny_teacher_dir))
    ts = [959, 599, 239]
    noise, y = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7])

    def fresh(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda shape: torch.randn(shape, generator=g)

    with torch.no_grad():
        g1 = trainer.ctm_view(trainer.generator.backbone, gamma=1.0)
        x = noise
        rn = fresh(5)
        for i, t in enumerate(ts):  # x0 = G(x, t, 0), re-noise to the next timestep
            x0 = g1(x, torch.full((2,), t), y)
            x = x0 if i == len(ts) - 1 else trainer.schedule.add_noise(x0, rn(x.shape), torch.full((2,), ts[i + 1]))
        torch.testing.assert_close(student_sample(g1, ts, noise, y, renoise=fresh(5)), x, rtol=1e-4, atol=1e-5)
        g0 = trainer.ctm_view(trainer.generator.backbone, gamma=0.0)
        a = student_sample(g0, ts, noise, y)  # no fresh noise needed
        torch.testing.assert_close(a, student_sample(g0, ts, noise, y, renoise=fresh(9)))
    s_mid = gamma_target(trainer.schedule, 599, 0.9, trainer.jump_input)  # snapped to the student's grid
    assert 0 < s_mid < 599 and s_mid in trainer.jump_input.levels
    assert gamma_target(trainer.schedule, 599, 0.9) < s_mid  # (unsnapped: sigma 0.44x, below the grid point)
    assert gamma_target(trainer.schedule, 599, 0.0) == 599 and gamma_target(trainer.schedule, 599, 1.0) == 0


def test_nu_interpolates_the_conditional_and_unconditional_student(tiny_teacher_dir, tmp_path):
    trainer = make_trainer(ctm_config(tmp_path, tiny_teacher_dir))
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([959, 400]), torch.tensor([1, 5])
    view = trainer.ctm_view(trainer.generator.backbone, nu=2.0)
    with torch.no_grad():
        c, u = view.g(x, t, torch.zeros(2), y), view.g(x, t, torch.zeros(2), torch.tensor([10, 10]))
        torch.testing.assert_close(view.guided_g(x, t, torch.zeros(2), y), u + 2.0 * (c - u), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(view(x, t, y), (u + 2.0 * (c - u)).clamp(-1, 1), rtol=1e-5, atol=1e-5)  # the teacher's clip
        torch.testing.assert_close(trainer.ctm_view(trainer.generator.backbone)(x, t, y), c.clamp(-1, 1))
    with pytest.raises(ConfigError, match="null_cond"):
        CTMDenoiser(view.backbone, trainer.schedule, "epsilon", trainer.jump_input, nu=2.0).guided_g(x, t, torch.zeros(2), y)


def test_the_student_exports_reloads_and_samples_like_the_trainer(tiny_teacher_dir, tmp_path):
    from diffusers import UNet2DModel

    trainer = make_trainer(ctm_config(tmp_path, tiny_teacher_dir, max_steps=1, nu=1.5, gamma=0.3, sampling_steps=2))
    folder = trainer.train()
    student = load_student(folder)
    assert isinstance(student.generator, CTMDenoiser) and student.generator.nu == 1.5 and student.generator.gamma == 0.3
    assert student.generator.jump_input == trainer.jump_input and student.timesteps == [959, 479]
    assert student.timesteps_for(4) == student.meta["ctm"]["timesteps_by_steps"]["4"]
    ours = trainer.sampling_generator(trainer.generator_for_export())
    for steps in (1, 2, 4):
        ts = student.timesteps_for(steps)
        a, _ = sample_student_from_seeds(student.generator, student, ts, [0, 1], [3, 4])
        b, _ = sample_student_from_seeds(ours, trainer.teacher_spec, ts, [0, 1], [3, 4])
        # the same weights; the reloaded network and the trained one's copy may take other CPU kernels
        # (a 2-thread AMD EPYC differs in one pixel of 512 by 1.2e-5 after 4 steps)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert UNet2DModel.from_pretrained(folder / "generator").config.num_class_embeds == 11 * 9  # plain diffusers
    # onestep sample --gamma / --nu override the student's own
    import numpy as np

    from onestep.errors import OnestepError
    from onestep.samplers.commands import sample_to_folder

    out = sample_to_folder(folder, tmp_path / "s", 2, steps=2, gamma=1.0, nu=1.0, label=3)
    student.generator.gamma, student.generator.nu = 1.0, 1.0
    want, _ = sample_student_from_seeds(student.generator, student, student.timesteps_for(2), [0, 1], [3, 3])
    np.testing.assert_allclose(np.load(out / "samples.npz")["samples"], want.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(OnestepError, match="gamma must lie"):
        sample_to_folder(folder, tmp_path / "s2", 1, gamma=2.0)


@pytest.mark.parametrize("field, value, match", [
    ("solver_steps", 9, "cannot exceed num_ddim_timesteps"),
    ("distance", "lpips", "distance must be one of"),
    ("gamma", 1.5, "gamma must lie in"),
    ("generator_lora_rank", 4, "jump target s as a new input"),
])
def test_bad_settings_are_config_errors(tiny_teacher_dir, tmp_path, field, value, match):
    with pytest.raises(ConfigError, match=match):
        ctm_config(tmp_path, tiny_teacher_dir, **{field: value})


def test_ctm_on_a_text_to_image_pipeline_feeds_s_as_timestep_cond_and_samples_after_export(tmp_path, monkeypatch):
    from t2i_fixtures import make_tiny_sd, write_image_folder, write_prompts

    from onestep.samplers.student import sample_text_student

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    sd = make_tiny_sd(tmp_path / "sd")
    trainer = make_trainer(ctm_config(tmp_path, sd, prompts=str(write_prompts(tmp_path / "prompts.txt")), batch_size=2, max_steps=1,
                                      real_images=str(write_image_folder(tmp_path / "images", n=4)), max_timestep=900, jump_embedding_dim=8))
    assert trainer.jump_input == JumpInput("timestep_cond", embedding_dim=8)
    g0 = state_of(trainer.generator.backbone)
    folder = trainer.train()
    assert changed(g0, trainer.generator.backbone) > 0
    student = load_student(folder)
    x = sample_text_student(student, ["a red cube"], [0], steps=2, decode=False)
    assert x.shape == (1, 4, 8, 8) and torch.isfinite(x).all()
    cond, t = student.conditioning.from_labels(["a red cube"]), torch.tensor([900])
    with torch.no_grad():  # the trained embedding of s reaches the network
        assert not torch.allclose(student.generator.g(x, t, torch.tensor([0]), cond), student.generator.g(x, t, torch.tensor([600]), cond))
