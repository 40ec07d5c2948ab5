"""Consistency distillation (issue 4): boundary condition, DDIM solver, EMA target, sampling, guidance input."""

import dataclasses
import json
import math

import pytest
import torch

from conftest import changed, state_of
from onestep.consistency import (
    ConsistencyDenoiser,
    GuidanceInput,
    boundary_scalings,
    consistency_distance,
    ddim_step,
    guidance_scale_embedding,
    ict_num_steps,
    ict_pair_weight,
    lcm_grid,
    lcm_timesteps,
    segment_edges,
    with_guidance_input,
)
from onestep.errors import ConfigError
from onestep.export import load_student
from onestep.samplers.student import sample_student_from_seeds
from onestep.schedule import NoiseSchedule
from onestep.trainers import ConsistencyConfig, ConsistencyTrainer


def tiny_cd_config(tmp_path, teacher_dir, **overrides):
    values = dict(
        teacher=str(teacher_dir),
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        batch_size=4,
        num_ddim_timesteps=20,
        max_timestep=959,
        guidance_scale=2.0,
        lr_generator=1e-3,
        log_with="none",
        seed=0,
    )
    values.update(overrides)
    return ConsistencyConfig(**values)


def tiny_cond_unet(time_cond_proj_dim=None):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
        time_cond_proj_dim=time_cond_proj_dim,
    )


# ------------------------------------------------------------ the maths


def test_boundary_condition_gives_identity_at_t_min(tiny_teacher):
    f = ConsistencyDenoiser(tiny_teacher.backbone, tiny_teacher.schedule, "epsilon")
    x = torch.randn(3, 1, 16, 16)
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        out = f(x, torch.zeros(3, dtype=torch.long), y)
        torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
        # Away from 0 the network's x0 takes over: c_out(19) = 190 / sqrt(190^2 + 0.25).
        c_skip, c_out = boundary_scalings(torch.tensor([0, 19]))
        torch.testing.assert_close(c_skip, torch.tensor([1.0, 0.25 / (190**2 + 0.25)]))
        torch.testing.assert_close(c_out, torch.tensor([0.0, 190 / math.sqrt(190**2 + 0.25)]))
        t = torch.full((3,), 19)
        torch.testing.assert_close(f(x, t, y), c_skip[1] * x + c_out[1] * f.x0(x, t, y))


def test_ddim_step_matches_hand_computation():
    # abar = [1, 0.64, 0.36]: (a, s) = (0.8, 0.6) at t = 1 and (0.6, 0.8) at t = 2.
    sched = NoiseSchedule(torch.tensor([1.0, 0.64, 0.36]))
    x, x0 = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.0]])
    t, tn = torch.tensor([2]), torch.tensor([1])
    # eps = (x - 0.6 x0) / 0.8 = [0.875, -2.5]; x_next = 0.8 x0 + 0.6 eps
    torch.testing.assert_close(ddim_step(sched, x, x0, t, tn), torch.tensor([[0.925, -1.5]]))
    # Stochastic (eta = 1): sig = sqrt(s_n^2 / s^2) sqrt(1 - a^2 / a_n^2), fresh noise z.
    sig = math.sqrt(0.36 / 0.64) * math.sqrt(1 - 0.36 / 0.64)
    z = torch.tensor([[1.0, 1.0]])
    expected = 0.8 * x0 + math.sqrt(0.36 - sig**2) * torch.tensor([[0.875, -2.5]]) + sig * z
    torch.testing.assert_close(ddim_step(sched, x, x0, t, tn, eta=1.0, noise=z), expected)
    # A zero-length step returns x (the segment students' boundary condition).
    torch.testing.assert_close(ddim_step(sched, x, x0, t, t), x)


def test_grid_and_timesteps_match_lcm_scheduler():
    from diffusers import LCMScheduler

    grid = lcm_grid(1000, 50)
    assert grid[:2] == [19, 39] and grid[-1] == 999 and len(grid) == 50
    sched = LCMScheduler(original_inference_steps=50)
    for k in (1, 2, 4, 8):
        sched.set_timesteps(k)
        assert lcm_timesteps(grid, k) == sched.timesteps.tolist()
    assert lcm_grid(1000, 48, max_timestep=959) == grid[:48]
    assert segment_edges(grid, 4) == [0, 259, 499, 759, 999]


def test_losses_and_ict_schedule_hand_values():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    torch.testing.assert_close(consistency_distance(a, b, "l2", 0.0), torch.tensor([12.5]))
    huber = ((math.sqrt(9 + 1) - 1) + (math.sqrt(16 + 1) - 1)) / 2
    torch.testing.assert_close(consistency_distance(a, b, "huber", 1.0), torch.tensor([huber]))
    torch.testing.assert_close(consistency_distance(a, b, "pseudo_huber", 1.0), torch.tensor([math.sqrt(26) - 1]))
    # 10 -> 1280 in 8 stages over K = 800 steps: K' = 100.
    assert [ict_num_steps(k, 800, 10, 1280) for k in (0, 99, 100, 250, 799)] == [10, 10, 20, 40, 1280]


def test_guidance_embedding_matches_diffusers_lcm_pipeline():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.5, 7.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    torch.testing.assert_close(guidance_scale_embedding(w, 32), ref)


# ------------------------------------------------------------ training


def test_steps_train_student_not_teacher_and_move_target_by_rate(tmp_path, tiny_teacher_dir):
    cfg = tiny_cd_config(tmp_path, tiny_teacher_dir, target_ema_decay=0.9, export=False)
    tr = ConsistencyTrainer(cfg)
    teacher0 = state_of(tr.teacher.backbone)
    student0 = state_of(tr.generator.backbone)
    target = tr.extras["target"]
    assert tr.fake is None and tr.opt_f is None  # no fake score is built or trained
    assert changed(student0, target) == 0  # the target starts as the student
    for _ in range(2):
        target_before = [p.detach().clone() for p in target.parameters()]
        logs = tr.train_step()
        assert math.isfinite(logs["loss/consistency"])
        for p_t, before, p_s in zip(target.parameters(), target_before, tr.generator.backbone.parameters()):
            torch.testing.assert_close(p_t, 0.9 * before + 0.1 * p_s, rtol=1e-6, atol=1e-7)
    assert changed(student0, tr.generator.backbone) > 0
    assert changed(teacher0, tr.teacher.backbone) == 0
    assert not any(p.grad is not None for p in target.parameters())


def test_teacher_step_is_guided_ddim_on_the_grid(tmp_path, tiny_teacher_dir):
    cfg = tiny_cd_config(tmp_path, tiny_teacher_dir, export=False)
    tr = ConsistencyTrainer(cfg)
    t_hi, t_lo = tr.draw_timesteps(256)
    grid = [0] + tr.grid
    assert all(grid[grid.index(h) - 1] == lo for h, lo in zip(t_hi.tolist(), t_lo.tolist()))
    assert int(t_hi.max()) <= 959
    x = torch.randn(4, 1, 16, 16)
    y, u = torch.tensor([0, 1, 2, 3]), torch.full((4,), 10)
    th, tl = torch.full((4,), 459), torch.full((4,), 439)
    with torch.no_grad():
        got = tr.teacher_step(x, th, tl, y, u, torch.full((4,), 2.0), None, None)
        x0 = tr.teacher(x, th, u) + 2.0 * (tr.teacher(x, th, y) - tr.teacher(x, th, u))
        want = ddim_step(tr.schedule, x, x0.clamp(-1, 1), th, tl)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_variants_run_and_train(tmp_path, tiny_teacher_dir):
    # SCott (stochastic step + GAN head), MLCM (segments, no EMA), iCT (no teacher).
    for i, extra in enumerate(
        [dict(eta=0.3, gan_weight=0.4), dict(num_segments=4, target_ema_decay=0.0), dict(teacher_free=True, loss="pseudo_huber", target_ema_decay=0.0)]
    ):
        tr = ConsistencyTrainer(tiny_cd_config(tmp_path / str(i), tiny_teacher_dir, export=False, **extra))
        student0, heads0 = state_of(tr.generator), state_of(tr.heads)
        logs = tr.train_step()
        assert math.isfinite(logs["loss/consistency"]) and changed(student0, tr.generator) > 0
        if "gan_weight" in extra:
            assert "loss/gan_d" in logs and changed(heads0, tr.heads) > 0
        if "num_segments" in extra:
            assert tr.target is tr.student and tr.sampling_timesteps == [959, 719, 479, 239]
            assert tr.segment_edge(torch.tensor([959, 720, 719, 19])).tolist() == [719, 719, 479, 0]


def test_config_validation():
    with pytest.raises(ConfigError, match="loss"):
        ConsistencyConfig(loss="l1")
    with pytest.raises(ConfigError, match="teacher_free"):
        ConsistencyConfig(teacher_free=True, eta=0.5)
    with pytest.raises(ConfigError, match="fake_score"):
        ConsistencyConfig(fake_score="lora")
    with pytest.raises(ConfigError, match="guidance_scale_range"):
        ConsistencyConfig(guidance_scale_range=[3.0, 1.0])


# ------------------------------------------------------------ students


def test_student_samples_in_1_2_4_8_steps_with_that_many_calls(tmp_path, tiny_teacher_dir):
    tr = ConsistencyTrainer(tiny_cd_config(tmp_path, tiny_teacher_dir))
    student_dir = tr.train()
    meta = json.loads((student_dir / "onestep.json").read_text())
    assert meta["method"] == "consistency" and meta["consistency"]["parameterisation"] == "lcm"
    assert meta["timesteps"] == [959, 719, 479, 239]
    student = load_student(student_dir)
    calls = []
    student.generator.backbone.register_forward_hook(lambda m, i, o: calls.append(int(i[1][0])))
    for k in (1, 2, 4, 8):
        calls.clear()
        ts = student.timesteps_for(k)
        assert ts == meta["consistency"]["timesteps_by_steps"][str(k)]
        x, _ = sample_student_from_seeds(student.generator, student, ts, seeds=range(3), labels=[0, 1, 2])
        assert calls == ts and x.shape == (3, 1, 16, 16) and x.abs().max() <= 1
    # One step is f at the top of the grid applied to the seed's noise.
    x1, _ = sample_student_from_seeds(student.generator, student, [959], seeds=[5], labels=[3])
    z = torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(x1, student.generator(z, torch.tensor([959]), torch.tensor([3])).clamp(-1, 1))


def test_segment_student_moves_along_ddim_between_steps(tmp_path, tiny_teacher_dir):
    tr = ConsistencyTrainer(tiny_cd_config(tmp_path, tiny_teacher_dir, num_segments=2, target_ema_decay=0.0, max_steps=1))
    student = load_student(tr.train())
    assert student.generator.ddim_between_steps and student.timesteps == [959, 479]
    z = torch.randn(2, 1, 16, 16)
    y = torch.tensor([4, 5])
    from onestep.samplers.student import student_sample

    with torch.no_grad():
        got = student_sample(student.generator, student.timesteps, z, y)  # no renoise function needed
        x0 = student.generator(z, torch.full((2,), 959), y)
        x = ddim_step(student.schedule, z, x0, torch.full((2,), 959), torch.full((2,), 479))
        torch.testing.assert_close(got, student.generator(x, torch.full((2,), 479), y))
    with pytest.raises(Exception, match="exactly 2 steps"):
        student.timesteps_for(4)


def test_class_table_guidance_student_starts_as_teacher_and_reloads(tmp_path, tiny_teacher_dir):
    cfg = tiny_cd_config(tmp_path, tiny_teacher_dir, guidance_scale_range=[1.0, 3.0], guidance_levels=5, max_steps=1)
    tr = ConsistencyTrainer(cfg)
    g = tr.guidance_input
    assert g.kind == "class_table" and g.scales == [1.0, 1.5, 2.0, 2.5, 3.0] and g.stride == 11
    assert tr.generator.backbone.config.num_class_embeds == 55
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([300, 700]), torch.tensor([3, 10])
    with torch.no_grad():
        ref = tr.teacher(x, t, y)
        for s in (1.0, 2.6):
            torch.testing.assert_close(tr.student.x0(x, t, y, guidance_scale=torch.full((2,), s)), ref)
    assert g.apply(y, torch.tensor([1.1, 2.9]), 2, "cpu").tolist() == [3, 10 + 4 * 11]
    assert set(tr.draw_guidance(200).tolist()) <= set(g.scales)
    student = load_student(tr.train())
    assert student.generator.guidance.to_dict() == g.to_dict()
    from diffusers import UNet2DModel

    plain = UNet2DModel.from_pretrained(student.path / "generator")  # plain diffusers, level 2 = scale 2.0
    with torch.no_grad():
        eps = plain(x, t, class_labels=y + 2 * 11).sample
        torch.testing.assert_close(student.generator.x0(x, t, y), student.schedule.to_x0(eps, x, t, "epsilon"))


def test_timestep_cond_student_and_lcm_scheduler_for_plain_diffusers(tmp_path):
    from diffusers import LCMScheduler, UNet2DConditionModel

    from onestep.conditioning import Conditioning
    from onestep.export import export_student
    from onestep.teachers import Teacher

    teacher_net = tiny_cond_unet()
    g = GuidanceInput("timestep_cond", default_scale=7.0, embedding_dim=16)
    student_net = with_guidance_input(teacher_net, g)
    assert student_net.config.time_cond_proj_dim == 16
    schedule = NoiseSchedule.from_scheduler_config(dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    f = ConsistencyDenoiser(student_net, schedule, "epsilon", guidance=g)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 499])
    cond = {"encoder_hidden_states": torch.randn(2, 3, 8)}
    with torch.no_grad():
        ref = teacher_net(x, t, **cond).sample  # zero-initialised projection: the student starts as the teacher
        torch.testing.assert_close(student_net(x, t, **g.apply(cond, 5.0, 2, "cpu")).sample, ref)
    teacher = Teacher("tiny-t2i", teacher_net, schedule, "epsilon", Conditioning("none"), (4, 8, 8))
    grid = lcm_grid(1000, 50)
    meta = {
        "consistency": dict(parameterisation="lcm", sigma_data=0.5, timestep_scaling=10.0, grid=grid, segment_edges=None,
                            timesteps_by_steps={"4": lcm_timesteps(grid, 4)}, between_steps="renoise"),
        "guidance": g.to_dict(),
    }
    out = export_student(tmp_path / "s", student_net, teacher, "consistency", lcm_timesteps(grid, 4), extra=meta)
    sched = LCMScheduler.from_pretrained(out / "scheduler")
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == load_student(out).timesteps == [999, 759, 499, 259]
    # One plain-diffusers LCM step (guidance 7 -> w = 6 embedded) is onestep's f.
    plain = UNet2DConditionModel.from_pretrained(out / "generator")
    w_emb = guidance_scale_embedding(torch.tensor([6.0, 6.0]), 16)
    with torch.no_grad():
        eps = plain(x, torch.tensor([999, 999]), timestep_cond=w_emb, **cond).sample
        denoised = sched.step(eps, 999, x, return_dict=True).denoised
        ours = load_student(out).generator(x, torch.tensor([999, 999]), cond)
    torch.testing.assert_close(ours, denoised, rtol=1e-4, atol=1e-5)


def test_teacher_fit_warm_start_moves_student_toward_teacher_and_target_follows(tmp_path, tiny_teacher_dir):
    tr = ConsistencyTrainer(tiny_cd_config(tmp_path, tiny_teacher_dir, teacher_fit_steps=1, export=False))
    student0 = state_of(tr.generator.backbone)
    logs = tr.train_step()
    assert "loss/teacher_fit" in logs and "loss/consistency" not in logs
    assert changed(student0, tr.generator.backbone) > 0
    assert changed(state_of(tr.generator.backbone), tr.extras["target"]) == 0  # the target is the student again
    assert "loss/consistency" in tr.train_step()


def test_lcm_lora_trains_the_adapters_against_the_student_itself(tmp_path, tiny_teacher_dir):
    with pytest.raises(ConfigError, match="target_ema_decay: 0"):
        tiny_cd_config(tmp_path, tiny_teacher_dir, generator_lora_rank=2, target_ema_decay=0.95)
    tr = ConsistencyTrainer(tiny_cd_config(tmp_path, tiny_teacher_dir, generator_lora_rank=2, export=False))  # mode default: 0
    assert tr.target is tr.student
    before = {n: p.detach().clone() for n, p in tr.generator.backbone.named_parameters()}
    for _ in range(2):
        tr.train_step()
    moved = {n for n, p in tr.generator.backbone.named_parameters() if not torch.equal(before[n], p)}
    assert moved and all("lora_" in n for n in moved)  # only the adapters train
    student = tr.export()
    assert not any("lora" in k for k in load_student(student).generator.state_dict())  # merged at export


def test_resumed_run_restores_the_ema_target_and_ends_bit_identical(tmp_path, tiny_teacher_dir):
    """The EMA target is an extra network of the loop: checkpointed as target.safetensors and read
    back on resume, so a run stopped at step 2 and resumed ends where a straight run does."""
    from safetensors.torch import load_file

    straight = ConsistencyTrainer(tiny_cd_config(tmp_path / "a", tiny_teacher_dir, max_steps=4, target_ema_decay=0.9, export=False))
    straight.train()
    cfg = tiny_cd_config(tmp_path / "b", tiny_teacher_dir, max_steps=2, target_ema_decay=0.9, export=False)
    first = ConsistencyTrainer(cfg)
    first.train()
    saved = load_file(str(tmp_path / "b" / "run" / "checkpoint-2" / "target.safetensors"))
    assert set(saved) == set(first.extras["target"].state_dict())
    assert all(torch.equal(saved[k], v) for k, v in first.extras["target"].state_dict().items())
    resumed = ConsistencyTrainer(dataclasses.replace(cfg, max_steps=4, resume="latest"))
    assert changed(state_of(first.extras["target"]), resumed.extras["target"]) > 0  # a fresh copy of the student
    resumed.load_checkpoint("latest")
    assert changed(state_of(first.extras["target"]), resumed.extras["target"]) == 0  # read back, not rebuilt from the student
    resumed.train()
    assert changed(state_of(straight.generator.backbone), resumed.generator.backbone) == 0
    assert changed(state_of(straight.extras["target"]), resumed.extras["target"]) == 0


def test_each_mode_sets_its_own_target_and_loss_defaults():
    lcm, mlcm, ict = ConsistencyConfig(), ConsistencyConfig(num_segments=4), ConsistencyConfig(teacher_free=True)
    assert (lcm.target_ema_decay, lcm.loss) == (0.95, "l2")
    assert (mlcm.target_ema_decay, mlcm.loss) == (0.0, "l2")  # MLCM: the student is its own target
    assert (ict.target_ema_decay, ict.loss) == (0.0, "pseudo_huber")  # iCT: no EMA target, pseudo-Huber
    assert ConsistencyConfig(generator_lora_rank=4).target_ema_decay == 0.0  # LCM-LoRA
    explicit = ConsistencyConfig(teacher_free=True, target_ema_decay=0.5, loss="l2")  # an explicit choice stands
    assert (explicit.target_ema_decay, explicit.loss) == (0.5, "l2")


def test_ict_weights_each_pair_by_the_inverse_sigma_step(tmp_path, tiny_teacher_dir, monkeypatch):
    import onestep.trainers.consistency as cd

    schedule = NoiseSchedule.from_scheduler_config({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"})
    t_hi, t_lo = torch.tensor([500, 40]), torch.tensor([480, 20])
    ac = schedule.alphas_cumprod.double()
    sig = lambda t: ((1 - ac[t]) / ac[t]).sqrt()  # noqa: E731  (s_t / a_t)
    expected = torch.stack([1 / (sig(500) - sig(480)), 1 / (sig(40) - sig(20))]).float()
    torch.testing.assert_close(ict_pair_weight(schedule, t_hi, t_lo), expected)
    assert expected[1] > expected[0] > 0  # the same 20 steps span less sigma at low noise: they weigh more

    # In training, the loss is the lambda-weighted mean of the per-pair distances.
    tr = ConsistencyTrainer(tiny_cd_config(tmp_path, tiny_teacher_dir, teacher_free=True, export=False))
    seen = {}
    draw, distance = tr.draw_timesteps, cd.consistency_distance
    monkeypatch.setattr(tr, "draw_timesteps", lambda n: seen.setdefault("t", draw(n)))
    monkeypatch.setattr(cd, "consistency_distance", lambda *a: seen.setdefault("d", distance(*a)))
    tr.state.reseed()
    loss, _ = tr.generator_loss(tr.make_batch())
    weight = ict_pair_weight(tr.schedule, *seen["t"])
    assert not torch.allclose(weight, weight.mean().expand_as(weight))  # the pairs do differ
    torch.testing.assert_close(loss, (weight * seen["d"]).mean())


def test_first_step_timestep_is_the_label_of_the_top_point_in_training_and_sampling(tmp_path, tiny_teacher_dir):
    """With ``first_step_timestep`` the student reads that label on the grid's top (pure noise when sampling)
    and the grid's own labels elsewhere; the teacher's step still starts at the top; the student folder
    records it, so 1, 2 and 4 steps start there."""
    cfg = tiny_cd_config(tmp_path, tiny_teacher_dir, num_ddim_timesteps=4, first_step_timestep=600, max_steps=2)
    tr = ConsistencyTrainer(cfg)
    assert tr.grid == [239, 479, 719, 959] and tr.sampling_timesteps == [600, 719, 479, 239]
    labels = []
    hook = tr.generator.backbone.register_forward_hook(lambda m, i, o: labels.append(i[1].tolist()))
    t_hi, t_lo = torch.tensor([959, 479, 959, 239]), torch.tensor([719, 239, 719, 0])
    tr.draw_timesteps = lambda n: (t_hi, t_lo)
    teacher_from = []
    step = tr.teacher_step
    tr.teacher_step = lambda x_hi, hi, lo, *a: teacher_from.append(hi.tolist()) or step(x_hi, hi, lo, *a)
    tr.state.reseed()
    tr.generator_loss(tr.make_batch())
    hook.remove()
    assert labels[0] == [600, 479, 600, 239]  # the student's pass (the target is a separate network)
    assert teacher_from == [[959, 479, 959, 239]]
    student = load_student(tr.train())
    meta = json.loads((student.path / "onestep.json").read_text())["consistency"]
    assert meta["first_step_timestep"] == 600
    assert [student.timesteps_for(k) for k in (1, 2, 4)] == [[600], [600, 479], [600, 719, 479, 239]]
    calls = []
    student.generator.backbone.register_forward_hook(lambda m, i, o: calls.append(int(i[1][0])))
    sample_student_from_seeds(student.generator, student, student.timesteps_for(2), seeds=[0], labels=[1])
    assert calls == [600, 479]


@pytest.mark.parametrize("bad", [dict(first_step_timestep=719), dict(first_step_timestep=1000), dict(first_step_timestep=600, num_segments=2)])
def test_first_step_timestep_off_the_grid_and_for_one_segment_lcm_only(bad, tmp_path, tiny_teacher_dir):
    with pytest.raises(ConfigError, match="first_step_timestep"):
        ConsistencyTrainer(tiny_cd_config(tmp_path, tiny_teacher_dir, num_ddim_timesteps=4, **bad))
