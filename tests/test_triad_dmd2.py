import pytest
import torch

from conftest import changed, state_of, tiny_dmd2_config
from onestep.errors import ConfigError
from onestep.teachers import load_teacher
from onestep.trainers import DMD2Config, DMD2Trainer
from onestep.trainers.helpers import inject_gradient
from onestep.trainers.dmd2 import dm_gradient
from onestep.triad import Triad


@pytest.mark.parametrize("fake_score", ["copy", "lora"])
def test_dmd2_steps_train_generator_and_fake_not_teacher(tmp_path, tiny_teacher_dir, fake_score):
    cfg = tiny_dmd2_config(tmp_path, tiny_teacher_dir, fake_score=fake_score, lora_rank=4, export=False)
    tr = DMD2Trainer(cfg)
    teacher0 = {k: v.clone() for k, v in tr.triad.teacher_parameters().items()}
    gen0 = state_of(tr.generator)
    fake_trainable0 = [p.detach().clone() for p in tr.triad.trainable_fake_parameters()]
    for _ in range(3):  # steps 0 and 2 update the generator (ratio 2)
        logs = tr.train_step()
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert changed(gen0, tr.generator) > 0
    fake_after = tr.triad.trainable_fake_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(fake_trainable0, fake_after))
    for k, v in tr.triad.teacher_parameters().items():
        assert torch.equal(v, teacher0[k]), k


def test_lora_fake_equals_teacher_at_start_and_shares_weights(tiny_teacher_dir):
    teacher = load_teacher(tiny_teacher_dir)
    triad = Triad(teacher, fake_score="lora", lora_rank=4)
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        torch.testing.assert_close(triad.fake(x, t, y), triad.teacher(x, t, y), rtol=0, atol=0)
    assert triad.fake.backbone is triad.teacher.backbone  # one copy of the base weights
    assert all("lora_" in n for n, p in triad.fake.named_parameters() if p.requires_grad)
    # Perturb the adapters: the fake score moves, the teacher (adapters off) does not.
    before = triad.teacher(x, t, y).detach()
    with torch.no_grad():
        for n, p in triad.fake.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
        assert not torch.allclose(triad.fake(x, t, y), before)
        torch.testing.assert_close(triad.teacher(x, t, y), before, rtol=0, atol=0)


def test_lora_fake_score_adapts_the_attention_projections_by_default(tiny_teacher_dir):
    from onestep.lora import lora_target_modules

    triad = Triad(load_teacher(tiny_teacher_dir), fake_score="lora", lora_rank=4)
    adapted = {n.split(".lora_A")[0] for n, _ in triad.fake.backbone.named_parameters() if ".lora_A" in n}
    assert adapted and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} >= {"to_q", "to_k", "to_v"}  # every projection, not a few
    # 'all' is the wider set (every Linear and Conv2d: conv_in, resnet convs, the time embedding ...)
    backbone = load_teacher(tiny_teacher_dir).backbone
    wide = lora_target_modules(backbone, "all")
    assert set(adapted) < set(wide) and "conv_in" in wide and "time_embedding.linear_1" in wide
    # a list picks layers by name suffix
    assert set(lora_target_modules(backbone, ["to_q", "conv_in"])) == {n for n in wide if n.endswith(".to_q")} | {"conv_in"}
    with pytest.raises(ConfigError, match="match no Linear or Conv2d"):
        lora_target_modules(backbone, ["no_such_layer"])
    with pytest.raises(ConfigError, match="lora_targets"):
        DMD2Config(lora_targets="everything")


def test_lora_refused_for_analytic_teacher():
    with pytest.raises(ConfigError, match="analytic"):
        Triad(load_teacher("gmm-ring8"), fake_score="lora")


def test_dm_gradient_hand_made_case():
    x = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    x0_real = torch.tensor([[[[0.0, 0.0], [0.5, 1.0]]]])
    x0_fake = torch.tensor([[[[1.0, 2.0], [0.5, 0.0]]]])
    # mean |x - x0_real| = (1 + 1 + 0 + 1) / 4 = 0.75
    expected = (x0_fake - x0_real) / 0.75
    torch.testing.assert_close(dm_gradient(x, x0_real, x0_fake), expected)


@pytest.mark.parametrize("weighting", ["native", "snr+1"])
def test_fake_loss_weighting_weighs_the_x0_error_by_snr_or_snr_plus_one(tmp_path, tiny_teacher_dir, weighting):
    """eps-MSE is the x0 error weighed by SNR_t = a^2 / s^2; 'snr+1' adds 1 to that weight where the
    generator's loss reads the fake score (t <= 0.96 T here), so its x0 predictions at high noise
    (SNR ~ 0) still carry weight, and not above (t = 990), where x0 is not resolvable from eps."""
    tr = DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir, export=False, fake_loss_weighting=weighting, loss_t_range=[0.02, 0.96]))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 16, 16, generator=g), torch.randn(3, 1, 16, 16, generator=g)
    t = torch.tensor([50, 950, 990])
    x_t = tr.schedule.add_noise(x0, noise, t)
    pred_x0 = x0 + 0.1 * torch.randn(3, 1, 16, 16, generator=g)
    a, s = tr.schedule.alpha_sigma(t)
    snr = a**2 / s**2
    err = ((pred_x0 - x0) ** 2).mean(dim=(1, 2, 3))
    w = snr if weighting == "native" else snr + torch.tensor([1.0, 1.0, 0.0])
    expected = (w * err).mean()
    torch.testing.assert_close(tr.denoising_loss_of(pred_x0, x0, x_t, t, noise), expected, rtol=1e-4, atol=0)
    assert snr[1] < 0.01  # at t = 950 eps-MSE hardly sees the x0 error; snr+1 weighs it ~1


def test_inject_gradient_gives_g_over_numel():
    x = torch.randn(2, 3, requires_grad=True)
    g = torch.randn(2, 3)
    inject_gradient(x, g).backward()
    torch.testing.assert_close(x.grad, g / x.numel())


def test_dmd2_generator_gradient_matches_formula(tmp_path, tiny_teacher_dir):
    """The generator's output gradient equals the DM formula for the same t and noise."""
    cfg = tiny_dmd2_config(tmp_path, tiny_teacher_dir, export=False)
    tr = DMD2Trainer(cfg)
    batch = tr.make_batch()
    rng_state = tr.rng.get_state()
    captured = {}
    orig_generate = tr.generate

    def generate(b):
        x = orig_generate(b)
        x.retain_grad()
        captured["x"] = x
        return x

    tr.generate = generate
    loss, _ = tr.generator_loss(batch)
    loss.backward()
    x = captured["x"].detach()
    # Replay the random draws after G(z): t, then the noise.
    tr.rng.set_state(rng_state)
    n = x.shape[0]
    t = tr.sample_t(n, *cfg.loss_t_range)
    x_t = tr.schedule.add_noise(x, tr.randn(tuple(x.shape)), t)
    with torch.no_grad():
        real = tr.teacher.guided(x_t, t, batch["cond"], batch["uncond"], cfg.guidance_scale)
        fake = tr.fake(x_t, t, batch["cond"])
    norm = (x - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(captured["x"].grad, (fake - real) / norm / x.numel(), atol=1e-7, rtol=1e-4)


def test_gan_head_trains_and_uses_real_data(tmp_path, tiny_teacher_dir):
    cfg = tiny_dmd2_config(tmp_path, tiny_teacher_dir, gan_weight_generator=5e-3, gan_weight_discriminator=1e-2, export=False)
    tr = DMD2Trainer(cfg)
    head0 = state_of(tr.heads)
    logs = tr.train_step()
    assert "loss/gan_g" in logs and "loss/gan_d" in logs
    assert changed(head0, tr.heads) > 0
    batch = tr.make_batch()
    assert batch["real"].shape == (4, 1, 16, 16) and batch["real"].min() >= -1


def test_gan_costs_one_fake_score_pass_beyond_dmd(tmp_path, tiny_teacher_dir):
    """The GAN reads the features of passes DMD2 runs anyway: with it, the generator step still runs
    the fake score once (with gradient to x, for x0_fake and D(G(z))) and the fake-score step twice
    (the denoising pass, which also feeds D(fake), and D(real))."""
    calls = {}
    for gan in (0.0, 5e-3):
        tr = DMD2Trainer(tiny_dmd2_config(tmp_path / str(gan), tiny_teacher_dir, gan_weight_generator=gan, export=False))
        n = []
        tr.fake.register_forward_hook(lambda *a: n.append(1))
        batch = tr.make_batch()
        loss, _ = tr.generator_loss(batch)
        gen_calls = len(n)
        loss.backward()
        if gan:  # the GAN term's gradient reached the generator through the fake score's pass
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.generator.parameters())
            assert all(p.grad is None for p in tr.triad.trainable_fake_parameters())
        tr.fake_score_loss(batch)
        calls[gan] = (gen_calls, len(n) - gen_calls)
    assert calls == {0.0: (1, 1), 5e-3: (1, 2)}


def test_backward_simulation_trains_k_step_student(tmp_path, tiny_teacher_dir):
    cfg = tiny_dmd2_config(tmp_path, tiny_teacher_dir, generator_timesteps=[999, 749, 499, 249], export=False)
    tr = DMD2Trainer(cfg)
    calls = []
    backbone = tr.generator.backbone
    handle = backbone.register_forward_hook(lambda m, i, o: calls.append(int(i[1][0])))
    torch.manual_seed(0)
    seen = set()
    for _ in range(6):
        calls.clear()
        tr.generate(tr.make_batch())
        # k no-grad steps along the timesteps, then the trained one: always a prefix of the schedule.
        assert calls == cfg.generator_timesteps[: len(calls)]
        seen.add(len(calls))
    handle.remove()
    assert len(seen) > 1


def test_config_validation():
    from onestep.trainers import DMD2Config

    with pytest.raises(ConfigError, match="ema_decay"):
        DMD2Config(ema_decay=1.5)
    with pytest.raises(ConfigError, match="strictly decreasing"):
        DMD2Config(generator_timesteps=[249, 999])
    with pytest.raises(ConfigError, match="loss_t_range"):
        DMD2Config(loss_t_range=[0.9, 0.5])
    with pytest.raises(ConfigError, match="loss_t_range"):
        DMD2Config(loss_t_range=[0.5])
    with pytest.raises(ConfigError, match="fake_loss_weighting must be one of"):
        DMD2Config(fake_loss_weighting="min-snr")
    from onestep.trainers import ConsistencyConfig, SiDConfig, VSDConfig

    assert SiDConfig(fake_loss_weighting="snr+1").fake_loss_weighting == "snr+1"
    for cls in (VSDConfig, ConsistencyConfig):  # their fake-score loss is their own, or they have none
        with pytest.raises(ConfigError, match="fake_loss_weighting: .*leave it 'native'"):
            cls(fake_loss_weighting="snr+1")


def test_old_timestep_range_keys_name_their_replacement():
    from onestep.trainers import load_config

    with pytest.raises(ConfigError, match="'vsd_t_min' was replaced by 'loss_t_range'"):
        load_config("digits_vsd", {"vsd_t_min": 0.1})
    assert load_config("digits_vsd", {"loss_t_range": [0.1, 0.9]}).loss_t_range == [0.1, 0.9]


@pytest.fixture
def fresh_accelerate_state():
    # accelerate keeps one mixed-precision state per process: start and leave each case with none
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield AcceleratorState
    AcceleratorState._reset_state(True)


def test_mixed_precision_follows_the_launcher_and_refuses_a_conflict(tmp_path, tiny_teacher_dir, monkeypatch, fresh_accelerate_state):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` exports
    tr = DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir))  # the config leaves it unset
    assert tr.accelerator.mixed_precision == "bf16" and tr.config.mixed_precision == "bf16"
    assert next(tr.teacher.backbone.parameters()).dtype == torch.bfloat16  # frozen_dtype auto follows it
    fresh_accelerate_state._reset_state(True)
    with pytest.raises(ConfigError, match="the config says 'no' but the launcher asks for 'bf16'"):
        DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir, mixed_precision="no"))
    fresh_accelerate_state._reset_state(True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # a launcher nobody asked for mixed precision
    tr = DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir, mixed_precision="bf16"))  # the preset's bf16 stands
    assert tr.accelerator.mixed_precision == "bf16"
    fresh_accelerate_state._reset_state(True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir)).config.mixed_precision == "no"  # no launcher


def test_gradient_accumulation_steps_with_the_mean_gradient_of_its_micro_batches(tmp_path, tiny_teacher_dir):
    def trainer(name):
        return DMD2Trainer(tiny_dmd2_config(tmp_path / name, tiny_teacher_dir, gradient_accumulation_steps=2,
                                            max_grad_norm=0.0, fake_updates_per_generator=1))

    # What the loop applies: the generator's gradient when its optimizer steps.
    tr = trainer("a")
    seen = {}
    step = tr.opt_g.step
    tr.opt_g.step = lambda *a, **k: (seen.update({n: p.grad.clone() for n, p in tr.generator.named_parameters()}), step(*a, **k))[1]
    logs = tr.train_step()
    assert tr.state.step == 1 and seen
    # The same micro-batches by hand, one backward each: the mean of their gradients.
    ref = trainer("b")
    batches = []
    for micro in range(2):
        ref.state.reseed(micro)
        batches.append(ref.make_batch())
    assert not torch.equal(batches[0]["noise"], batches[1]["noise"])  # each micro-batch draws its own noise
    grads, losses = [], []
    for batch in batches:
        loss, _ = ref.generator_loss(batch)
        ref.generator.zero_grad()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in ref.generator.named_parameters()})
        losses.append(loss.item())
    for n, g in seen.items():
        torch.testing.assert_close(g, (grads[0][n] + grads[1][n]) / 2, rtol=1e-5, atol=1e-7)
    assert logs["loss/dm"] == pytest.approx(sum(losses) / 2)  # logs are the micro-batches' mean
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        DMD2Config(gradient_accumulation_steps=0)
