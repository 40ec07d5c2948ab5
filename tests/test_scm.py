"""sCM (trainers/scm.py) and TrigFlow on a VP teacher (onestep/trigflow.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import changed, state_of, tiny_config

from onestep import trigflow
from onestep.errors import ConfigError
from onestep.export import load_student
from onestep.samplers.student import sample_student_from_seeds
from onestep.schedule import expand_like
from onestep.teachers import load_teacher
from onestep.trainers import SCMTrainer, make_trainer


def scm_config(tmp_path, teacher_dir, **overrides):
    values = dict(max_steps=2, batch_size=4, lr_fake=1e-2, tangent_warmup_steps=0, sampling_steps=2)
    values.update(overrides)
    return tiny_config("scm", tmp_path, teacher_dir, **values)


def point(teacher, labels, sd=0.5, seed=0):
    """x_t at the TrigFlow times of integer ``labels`` (and those times)."""
    g = torch.Generator().manual_seed(seed)
    t = trigflow.t_for_label(teacher.schedule, torch.tensor(labels), sd)
    x0 = torch.randn(len(labels), *teacher.sample_shape, generator=g) * 0.5
    z = torch.randn(x0.shape, generator=g) * sd
    return expand_like(torch.cos(t), x0) * x0 + expand_like(torch.sin(t), x0) * z, t


def test_fractional_timesteps_interpolate_the_log_snr_and_invert_exactly(tiny_teacher_dir):
    schedule = load_teacher(tiny_teacher_dir).schedule
    table = schedule.log_snr
    labels = torch.tensor([0, 10, 500, 959, 999])
    assert torch.allclose(schedule.timestep_for_log_snr(table[labels].float()), labels.float(), atol=1e-3)
    mid = schedule.timestep_for_log_snr(((table[500] + table[501]) / 2).float().reshape(1))
    assert 500 < float(mid) < 501
    # a floating timestep: the table's values at integers, log-SNR halfway between neighbours at .5
    a_int, s_int = schedule.alpha_sigma(labels)
    a_f, s_f = schedule.alpha_sigma(labels.float())
    torch.testing.assert_close(a_f, a_int, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_f, s_int, rtol=1e-5, atol=1e-6)
    a_h, s_h = schedule.alpha_sigma(torch.tensor([500.5]))
    assert float(2 * (a_h.double().log() - s_h.double().log())) == pytest.approx(float((table[500] + table[501]) / 2), rel=1e-5)
    t = torch.tensor([123.25, 640.8])
    torch.testing.assert_close(schedule.timestep_for_log_snr(2 * (torch.log(schedule.alpha_sigma(t)[0]) - torch.log(schedule.alpha_sigma(t)[1]))), t,
                               rtol=1e-4, atol=1e-3)
    # t_for_label, label_for_t and vp_coordinates agree with the table: a^2 = abar
    t = trigflow.t_for_label(schedule, labels[1:4], 0.5)
    torch.testing.assert_close(trigflow.label_for_t(schedule, t, 0.5), labels[1:4].float(), rtol=1e-4, atol=1e-2)
    a, s, _ = trigflow.vp_coordinates(t, 0.5)
    torch.testing.assert_close(a * a, schedule.alphas_cumprod[labels[1:4]].float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a * a + s * s, torch.ones(3), rtol=1e-5, atol=1e-6)


def test_the_consistency_function_of_a_velocity_is_the_denoisers_x0(tiny_teacher_dir):
    teacher = load_teacher(tiny_teacher_dir)
    den, sd = teacher.denoiser(), 0.5
    x_t, t = point(teacher, [300, 600, 900])
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        v = trigflow.velocity(den, x_t, t, y, sd)
        f = expand_like(torch.cos(t), x_t) * x_t - expand_like(torch.sin(t), x_t) * v
        _, _, r = trigflow.vp_coordinates(t, sd)
        x0 = den(x_t / expand_like(r, x_t), torch.tensor([300, 600, 900]), y)
    torch.testing.assert_close(f, x0, rtol=1e-4, atol=1e-4)


def test_the_jvp_tangent_matches_finite_differences_and_keeps_the_attention(tiny_teacher_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    teacher = load_teacher(tiny_teacher_dir)
    den, sd = teacher.denoiser(), 0.5
    x_t, t = point(teacher, [250, 700])
    t = t + 3e-4  # off the integer labels, where the interpolated label has kinks
    y = torch.tensor([4, 5])
    v_x = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))

    def fn(x, tt):
        return trigflow.velocity(den, x, tt, y, sd)

    out, d_jvp, mode = trigflow.tangent(fn, (x_t, t), (v_x, torch.ones_like(t)), "auto", den.backbone)
    assert mode == "jvp"  # the fused attention kernel has no forward-mode rule: math attention makes it work
    _, d_fd, mode_fd = trigflow.tangent(fn, (x_t, t), (v_x, torch.ones_like(t)), "finite_difference", den.backbone)
    assert mode_fd == "finite_difference"
    assert float((d_jvp - d_fd).norm() / d_jvp.norm()) < 2e-2
    assert {type(m.processor) for m in den.backbone.modules() if hasattr(m, "processor")} == {AttnProcessor2_0}
    with torch.no_grad():
        torch.testing.assert_close(out, fn(x_t, t))


def test_tangent_normalisation_and_proposal():
    g = torch.stack([torch.full((1, 2, 2), 3.0), torch.zeros(1, 2, 2)])
    gn = trigflow.normalised(g, 0.1)
    assert float(gn[0].norm()) == pytest.approx(6 / 6.1)  # ||g|| = 6
    assert float(gn[1].abs().max()) == 0
    t = trigflow.sample_t(1000, -1.0, 1.4, 0.5, 0.1, 1.5, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) >= 0.1 and float(t.max()) <= 1.5 and 0.4 < float(t.median()) < 0.9  # atan(e^-1 / 0.5) = 0.63
    assert trigflow.tangent_warmup(50, 100) == 0.5 and trigflow.tangent_warmup(500, 100) == 1.0


def test_at_the_start_without_guidance_the_teacher_is_already_consistent(tiny_teacher_dir, tmp_path):
    # r = 0 (tangent warm-up), no guidance: g = cos^2 (dx/dt - V-) = 0 since the student is the teacher
    trainer = make_trainer(scm_config(tmp_path, tiny_teacher_dir, guidance_scale=1.0, tangent_warmup_steps=100,
                                      adaptive_weighting=False, tangent_norm_c=0.0))
    batch = trainer.make_batch()
    loss, logs = trainer.generator_loss(batch)
    assert float(loss.detach()) < 1e-9 and logs["scm/tangent_r"] == 0.0


def test_an_scm_step_trains_the_student_and_the_weighting_and_leaves_the_teacher(tiny_teacher_dir, tmp_path):
    trainer = make_trainer(scm_config(tmp_path, tiny_teacher_dir))
    assert isinstance(trainer, SCMTrainer) and trainer.fake is None and set(trainer.heads) == {"weight"}
    g0, t0, w0 = state_of(trainer.generator.backbone), state_of(trainer.teacher.backbone), state_of(trainer.heads)
    logs = trainer.train_step()
    assert math.isfinite(logs["loss/scm"]) and math.isfinite(logs["loss/weighting"]) and logs["scm/tangent_r"] == 1.0
    assert trainer.tangent_mode_used == "jvp"
    assert changed(g0, trainer.generator.backbone) > 0 and changed(w0, trainer.heads) > 0
    assert changed(t0, trainer.teacher.backbone) == 0


def test_the_weighting_learns_minus_log_error():
    from onestep.trainers.scm import AdaptiveWeight

    head = AdaptiveWeight(4)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    t = torch.linspace(0.1, 1.5, 64)
    err = 0.05 + 0.5 * t  # a per-time error level
    for _ in range(800):
        opt.zero_grad()
        w = head(t)
        (torch.exp(w) * err - w).mean().backward()
        opt.step()
    torch.testing.assert_close(head(t).detach(), -err.log(), rtol=0.05, atol=0.05)


def test_finite_difference_tangent_gives_the_jvp_loss(tiny_teacher_dir, tmp_path):
    losses = {}
    for mode in ("jvp", "finite_difference"):
        trainer = make_trainer(scm_config(tmp_path / mode, tiny_teacher_dir, tangent=mode, adaptive_weighting=False))
        loss, _ = trainer.generator_loss(trainer.make_batch())
        losses[mode] = float(loss)
    assert losses["finite_difference"] == pytest.approx(losses["jvp"], rel=0.05)


def test_the_student_exports_and_samples_in_one_and_two_steps(tiny_teacher_dir, tmp_path):
    trainer = make_trainer(scm_config(tmp_path, tiny_teacher_dir, max_steps=1))
    folder = trainer.train()
    student = load_student(folder)
    assert student.timesteps[0] == 959 and len(student.timesteps) == 2 and student.timesteps[1] < 959
    for steps in (1, 2):
        x, _ = sample_student_from_seeds(student.generator, student, student.timesteps[:steps], [0, 1], [3, 4])
        assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


@pytest.mark.parametrize("field, value, match", [
    ("tangent", "autograd", "tangent must be one of"),
    ("sampling_steps", 3, "sampling_steps must be 1 or 2"),
    ("max_timestep", 5, "min_timestep < max_timestep"),
])
def test_bad_settings_are_config_errors(tiny_teacher_dir, tmp_path, field, value, match):
    with pytest.raises(ConfigError, match=match):
        scm_config(tmp_path, tiny_teacher_dir, **{field: value})


def test_scm_on_a_text_to_image_pipeline_runs_with_jvp_and_exports_a_diffusers_pipeline(tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline
    from t2i_fixtures import make_tiny_sd, write_image_folder, write_prompts

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    sd = make_tiny_sd(tmp_path / "sd")
    prompts = write_prompts(tmp_path / "prompts.txt")
    images = write_image_folder(tmp_path / "images", n=4)
    trainer = make_trainer(scm_config(tmp_path, sd, prompts=str(prompts), real_images=str(images), batch_size=2, max_steps=2,
                                      max_timestep=900, sampling_steps=1))
    g0 = state_of(trainer.generator.backbone)
    folder = trainer.train()
    assert trainer.tangent_mode_used == "jvp"  # cross-attention in plain math has a forward-mode rule
    assert changed(g0, trainer.generator.backbone) > 0
    pipe = DiffusionPipeline.from_pretrained(folder)
    out = pipe("a red cube", num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 16, 16, 3) and load_student(folder).timesteps == [900]


@pytest.mark.parametrize("fake_score", ["copy", "lora"])
def test_rcm_adds_the_dmd_regulariser_and_trains_its_fake_score(tiny_teacher_dir, tmp_path, fake_score):
    trainer = make_trainer(scm_config(tmp_path, tiny_teacher_dir, dmd_weight=1.0, fake_score=fake_score))
    assert trainer.fake is not None
    fake = trainer.triad.trainable_fake_parameters()
    f0 = [p.detach().clone() for p in fake]
    g0, t0 = state_of(trainer.generator.backbone), state_of(trainer.teacher.backbone)
    logs = trainer.train_step()
    assert {"loss/scm", "loss/dmd", "loss/fake", "loss/weighting"} <= set(logs) and all(math.isfinite(v) for v in logs.values())
    assert changed(g0, trainer.generator.backbone) > 0 and any(not torch.equal(a, b) for a, b in zip(f0, fake))
    if fake_score == "copy":
        assert changed(t0, trainer.teacher.backbone) == 0


def test_the_dmd_regulariser_pushes_the_one_step_sample_along_the_dm_gradient(tiny_teacher_dir, tmp_path, monkeypatch):
    # the regulariser alone: its gradient on the one-step sample x is the normalised DM gradient / numel
    import onestep.trainers.scm as scm_module

    trainer = make_trainer(scm_config(tmp_path, tiny_teacher_dir, dmd_weight=1.0, fake_score="copy"))
    batch = trainer.make_batch()
    with torch.no_grad():  # make the fake score differ from the teacher, so that the gradient is not zero
        for p in trainer.fake.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    captured, inject = {}, scm_module.inject_gradient

    def spy(x, grad):
        captured["x"], captured["grad"] = x, grad
        return inject(x, grad)

    monkeypatch.setattr(scm_module, "inject_gradient", spy)
    loss = trainer.dmd_regulariser(batch)
    (g,) = torch.autograd.grad(loss, captured["x"])
    torch.testing.assert_close(g, captured["grad"] / captured["x"].numel())
    assert float(captured["grad"].abs().mean()) > 0 and torch.equal(batch["x_gen"], captured["x"].detach())


def test_rcm_settings_go_together(tiny_teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match="dmd_weight > 0 needs fake_score"):
        scm_config(tmp_path, tiny_teacher_dir, dmd_weight=0.5)
    with pytest.raises(ConfigError, match="needs dmd_weight 0"):
        scm_config(tmp_path, tiny_teacher_dir, fake_score="lora")
