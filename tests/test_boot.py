"""BOOT (trainers/boot.py) and the BOOT student's signal view (onestep/boot.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import changed, state_of, tiny_config

from onestep.boot import BOOTDenoiser, bootstrap_coefficient
from onestep.errors import ConfigError, StudentFormatError
from onestep.export import load_student
from onestep.samplers.student import sample_student_from_seeds
from onestep.schedule import expand_like
from onestep.trainers import BOOTTrainer, make_trainer


def boot_config(tmp_path, teacher_dir, **overrides):
    values = dict(max_steps=2, batch_size=4, num_ddim_steps=8, signal_timestep=959)
    values.update(overrides)
    return tiny_config("boot", tmp_path, teacher_dir, **values)


def test_the_bootstrap_target_is_one_teacher_ddim_step_of_the_signal(tiny_teacher_dir, tmp_path):
    trainer = make_trainer(boot_config(tmp_path, tiny_teacher_dir, time_init="teacher"))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(4, 1, 16, 16, generator=g)
    cond, uncond = torch.tensor([1, 2, 3, 4]), trainer.conditioning.null(4)
    grid = trainer.grid
    assert grid[0] == 999 and grid[-1] == 0 and len(grid) == 8
    t = torch.tensor([grid[0], grid[2], grid[5], grid[6]])
    s = torch.tensor([grid[1], grid[3], grid[6], grid[7]])
    target = trainer.bootstrap_target(eps, cond, uncond, t, s)
    # by hand: y_t from the student (x_t = eps at the top), f the guided teacher x0 clamped to [-1, 1],
    # y_s* = y_t + (1 - s_s a_t / (a_s s_t)) (f - y_t)
    ac = trainer.schedule.alphas_cumprod
    a_t, s_t, a_s, s_s = ac[t].sqrt(), (1 - ac[t]).sqrt(), ac[s].sqrt(), (1 - ac[s]).sqrt()
    with torch.no_grad():
        y_t = trainer.student(eps, t, cond).double()
        y_t[0] = (eps[0].double() - s_t[0] * eps[0].double()) / a_t[0]  # x_T = eps
        x_t = expand_like(a_t, eps) * y_t + expand_like(s_t, eps) * eps.double()
        f = trainer.teacher.guided(x_t.float(), t, cond, uncond, 2.0).double().clamp(-1, 1)
    delta = 1 - (s_s * a_t) / (a_s * s_t)
    torch.testing.assert_close(bootstrap_coefficient(trainer.schedule, t, s), delta.float(), rtol=1e-5, atol=1e-6)
    expected = y_t + expand_like(delta, eps) * (f - y_t)
    torch.testing.assert_close(target.double(), expected, rtol=1e-4, atol=1e-4)
    assert float(delta[0]) == pytest.approx(1.0, abs=1e-3)  # the boundary: the teacher's x0 from pure noise


def test_the_student_starts_as_the_teachers_one_step_prediction_at_every_time(tiny_teacher_dir, tmp_path):
    trainer = make_trainer(boot_config(tmp_path, tiny_teacher_dir))
    eps, y = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 5, 9])
    m = torch.full((3,), 959)
    with torch.no_grad():
        top = trainer.teacher(eps, m, y)
        for label in (0, 500, 959):
            torch.testing.assert_close(trainer.student(eps, torch.full((3,), label), y), top, rtol=1e-4, atol=1e-4)
    # time_init: teacher keeps the teacher's network: its output at t, read as the signal at M
    plain = make_trainer(boot_config(tmp_path / "plain", tiny_teacher_dir, time_init="teacher"))
    t = torch.full((3,), 300)
    with torch.no_grad():
        raw = plain.teacher.backbone(eps, t, class_labels=y).sample
        a, s = (expand_like(v, eps) for v in plain.schedule.alpha_sigma(m))
        torch.testing.assert_close(plain.student(eps, t, y), (eps - s * raw) / a, rtol=1e-4, atol=1e-4)


def test_a_boot_step_trains_the_student_without_real_data_and_leaves_the_teacher(tiny_teacher_dir, tmp_path):
    trainer = make_trainer(boot_config(tmp_path, tiny_teacher_dir))
    assert isinstance(trainer, BOOTTrainer) and trainer.fake is None and trainer.opt_f is None
    assert trainer.teacher_spec.real_data is not None  # the tiny teacher brings data: BOOT must not read it

    def no_real_data(*args, **kwargs):
        raise AssertionError("BOOT read real data")

    object.__setattr__(trainer.teacher_spec, "real_data", no_real_data)
    assert "real" not in trainer.make_batch()
    g0, t0 = state_of(trainer.generator.backbone), state_of(trainer.teacher.backbone)
    logs = trainer.train_step()
    assert math.isfinite(logs["loss/boot"]) and logs["loss/boot"] > 0
    assert changed(g0, trainer.generator.backbone) > 0 and changed(t0, trainer.teacher.backbone) == 0


def test_derivative_weighting_is_inverse_delta_squared_with_mean_one(tiny_teacher_dir, tmp_path):
    trainer = make_trainer(boot_config(tmp_path, tiny_teacher_dir, loss_weighting="derivative"))
    w, d = trainer.pair_weight.double(), trainer.pair_delta.double()
    assert float(w.mean()) == pytest.approx(1.0) and torch.allclose(w * d**2, (w * d**2)[0].expand_as(w), rtol=1e-4)
    uniform = make_trainer(boot_config(tmp_path / "u", tiny_teacher_dir))
    assert torch.equal(uniform.pair_weight, torch.ones(7))


def test_the_exported_student_reloads_and_samples_as_the_trainer_does(tiny_teacher_dir, tmp_path):
    from diffusers import UNet2DModel

    trainer = make_trainer(boot_config(tmp_path, tiny_teacher_dir, max_steps=1))
    folder = trainer.train()
    x_train, _ = trainer.preview_samples(n=6)
    student = load_student(folder)
    assert isinstance(student.generator, BOOTDenoiser) and student.timesteps == [0]
    assert student.meta["boot"]["signal_timestep"] == 959 and student.meta["method"] == "boot"
    x, _ = sample_student_from_seeds(student.generator, student, student.timesteps, range(6), [i % 10 for i in range(6)])
    torch.testing.assert_close(x, x_train)
    # plain diffusers: the UNet at t = 0, its eps output converted at signal_timestep
    unet = UNet2DModel.from_pretrained(folder / "generator")
    z, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 7])
    ac = student.schedule.alphas_cumprod[959].float()
    with torch.no_grad():
        by_hand = (z - (1 - ac).sqrt() * unet(z, 0, class_labels=y).sample) / ac.sqrt()
        torch.testing.assert_close(student.generator(z, torch.zeros(2, dtype=torch.long), y), by_hand, rtol=1e-4, atol=1e-4)
    with pytest.raises(StudentFormatError, match="exactly one step"):
        student.timesteps_for(2)


@pytest.mark.parametrize("field, value, match", [
    ("num_ddim_steps", 1, "num_ddim_steps must be at least 2"),
    ("loss_weighting", "snr", "loss_weighting must be one of"),
    ("time_init", "zero", "time_init must be one of"),
    ("signal_timestep", -1, "signal_timestep must be an integer >= 0"),
    ("fake_score", "copy", "fake_score must be one of"),
    ("regression_warmup_steps", 10, "BOOT is data-free"),
])
def test_bad_settings_are_config_errors(tiny_teacher_dir, tmp_path, field, value, match):
    with pytest.raises(ConfigError, match=match):
        boot_config(tmp_path, tiny_teacher_dir, **{field: value})


def test_a_signal_timestep_beyond_the_schedule_is_refused(tiny_teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match="signal_timestep must be below 1000"):
        make_trainer(boot_config(tmp_path, tiny_teacher_dir, signal_timestep=1000))


def test_boot_on_a_text_to_image_pipeline_learns_from_prompts_alone(tmp_path, monkeypatch):
    from t2i_fixtures import make_tiny_sd, write_prompts

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    sd = make_tiny_sd(tmp_path / "sd")
    prompts = write_prompts(tmp_path / "prompts.txt")
    trainer = make_trainer(boot_config(tmp_path, sd, prompts=str(prompts), batch_size=2, max_steps=1, signal_timestep=None))
    assert trainer.teacher_spec.real_data is None and trainer.signal_timestep == 999
    g0, t0 = state_of(trainer.generator.backbone), state_of(trainer.teacher.backbone)
    folder = trainer.train()
    assert changed(g0, trainer.generator.backbone) > 0 and changed(t0, trainer.teacher.backbone) == 0
    student = load_student(folder)
    assert isinstance(student.generator, BOOTDenoiser) and student.timesteps == [0]
    x, _ = sample_student_from_seeds(student.generator, student, student.timesteps, [0, 1], ["a red cube", "a cat"])
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    # plain diffusers: the folder's scheduler makes the pipeline's one step the student's (the latent it returns)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe("a red cube", num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="latent").images
    with torch.no_grad():
        ours = student.generator(z, torch.zeros(1, dtype=torch.long), student.conditioning.from_labels(["a red cube"], "cpu"))
    torch.testing.assert_close(out.float(), ours, rtol=1e-4, atol=1e-4)
