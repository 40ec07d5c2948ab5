"""Image-conditioned (super-resolution) teachers and TAD-SR, on tiny real diffusers models built from config."""

import json

import pytest
import torch

from conftest import TINY_SCHEDULER, changed, state_of, tiny_config
from onestep.conditioning import CONCAT_KEY, ImageConditioning, cat_cond, conditioning_from_dict, index_cond
from onestep.denoiser import Denoiser, call_backbone

TINY_SR_UNET = dict(
    sample_size=16,
    in_channels=2,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    attention_head_dim=8,
)
TINY_SR_META = dict(format_version=1, conditioning=dict(kind="image", image_channels=1, scale=4, upsample=True),
                    guidance_scale=1.0, clip_sample=1.0, data="digits-sr")


@pytest.fixture(scope="module")
def sr_teacher_dir(tmp_path_factory):
    from diffusers import UNet2DModel

    from onestep.teachers import save_unet_teacher

    torch.manual_seed(0)
    return save_unet_teacher(tmp_path_factory.mktemp("tiny_sr"), UNet2DModel(**TINY_SR_UNET), TINY_SCHEDULER, TINY_SR_META)


@pytest.fixture
def sr_teacher(sr_teacher_dir):
    from onestep.teachers import load_teacher

    return load_teacher(sr_teacher_dir)


def test_sr_teacher_loads_with_image_conditioning_and_paired_data(sr_teacher):
    assert sr_teacher.sample_shape == (1, 16, 16)  # the UNet's out_channels: the condition is the second input channel
    c = sr_teacher.conditioning
    assert c.kind == "image" and not c.guidable and c.null(3) is None
    assert c.num_classes == 1500  # the training split's conditions
    hr, cond = sr_teacher.real_data(5, torch.Generator().manual_seed(0))
    assert hr.shape == (5, 1, 16, 16) and cond[CONCAT_KEY].shape == (5, 1, 16, 16)
    # paired: each condition is its high-res image, area-averaged to 4x4 and upsampled back
    torch.testing.assert_close(cond[CONCAT_KEY], c.condition_of(hr)[CONCAT_KEY])
    lowres = c.degrade(hr)
    assert lowres.shape == (5, 1, 4, 4)
    torch.testing.assert_close(lowres[:, :, 0, 0], hr[:, :, :4, :4].mean((-1, -2)))


def test_concat_condition_reaches_the_backbone(sr_teacher):
    unet = sr_teacher.backbone
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    img = torch.randn(2, 1, 16, 16)
    out = call_backbone(unet, x, t, {CONCAT_KEY: img})
    torch.testing.assert_close(out, unet(torch.cat([x, img], 1), t).sample, rtol=0, atol=0)
    assert not torch.allclose(out, call_backbone(unet, x, t, {CONCAT_KEY: img.flip(0)}))


def test_image_conditioning_batches_and_round_trips():
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 16, 16).clone()
    c = ImageConditioning(image_channels=1, scale=4, fixed={"class_labels": torch.tensor([20])}).with_images(images)
    cond = c.sample(4, generator=torch.Generator().manual_seed(0))
    assert cond[CONCAT_KEY].shape == (4, 1, 16, 16) and cond["class_labels"].tolist() == [20] * 4
    picked = c.from_labels([3, 1])
    assert picked[CONCAT_KEY][:, 0, 0, 0].tolist() == [3.0, 1.0]
    both = cat_cond(picked, picked)
    assert both[CONCAT_KEY].shape[0] == 4 and both["class_labels"].shape == (4,)
    assert index_cond(both, slice(1, 2))[CONCAT_KEY][0, 0, 0, 0] == 1.0
    again = conditioning_from_dict(json.loads(json.dumps(c.to_dict())))
    assert isinstance(again, ImageConditioning) and again.to_dict() == c.to_dict() and again.images is None
    with pytest.raises(Exception, match="no condition images"):
        again.sample(2)


def test_hfsd_gradient_is_the_teacher_eps_difference(sr_teacher):
    from onestep.trainers.tadsr import hfsd_gradient

    sched = sr_teacher.schedule
    t = torch.tensor([20, 100, 200])
    x_s, x_tch, e = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    xs_t, xt_t = sched.add_noise(x_s, e, t), sched.add_noise(x_tch, e, t)
    x0_s, x0_t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)  # the teacher's x0 at the two points
    a, s = (v.view(-1, 1, 1, 1) for v in sched.alpha_sigma(t))
    expected = sched.eps_from_x0(x0_s, xs_t, t) - sched.eps_from_x0(x0_t, xt_t, t)
    torch.testing.assert_close(hfsd_gradient(x_s, x_tch, x0_s, x0_t, a, s, "eps"), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hfsd_gradient(x_s, x_tch, x0_s, x0_t, a, s, "x0"), expected * s / a, rtol=1e-4, atol=1e-4)
    # a student equal to the teacher's output gets no gradient
    assert hfsd_gradient(x_tch, x_tch, x0_t, x0_t, a, s).abs().max() == 0


def test_tadsr_trains_generator_and_discriminator_not_teacher(tmp_path, sr_teacher_dir):
    from onestep.trainers import make_trainer

    cfg = tiny_config("tadsr", tmp_path, sr_teacher_dir, export=False, fake_score="none", fake_updates_per_generator=1,
                      generator_timesteps=[600], guidance_scale=1.0, teacher_steps=2, gan_head_channels=8)
    tr = make_trainer(cfg)
    teacher0 = {k: v.clone() for k, v in tr.triad.teacher_parameters().items()}
    gen0, head0 = state_of(tr.generator), state_of(tr.heads)
    for _ in range(3):
        logs = tr.train_step()
        assert all(torch.isfinite(torch.tensor(float(v))) for v in logs.values()), logs
    assert {"loss/reg", "loss/hfsd", "loss/adv_g", "loss/adv_d"} <= set(logs)
    assert changed(gen0, tr.generator) > 0 and changed(head0, tr.heads) > 0
    for k, v in tr.triad.teacher_parameters().items():
        assert torch.equal(v, teacher0[k]), k


def test_tadsr_refuses_a_teacher_without_image_conditioning(tmp_path, tiny_teacher_dir):
    from onestep.errors import ConfigError
    from onestep.trainers import make_trainer

    with pytest.raises(ConfigError, match="image-conditioned"):
        make_trainer(tiny_config("tadsr", tmp_path, tiny_teacher_dir, export=False, fake_score="none", guidance_scale=1.0))


def test_sr_student_exports_and_reloads_bit_exactly(tmp_path, sr_teacher_dir):
    from diffusers import UNet2DModel

    from onestep.export import load_student
    from onestep.trainers import make_trainer

    cfg = tiny_config("tadsr", tmp_path, sr_teacher_dir, max_steps=1, fake_score="none", fake_updates_per_generator=1,
                      generator_timesteps=[600], guidance_scale=1.0, teacher_steps=1, gan_weight=0.0)
    tr = make_trainer(cfg)
    folder = tr.train()
    student = load_student(folder)
    assert student.conditioning.kind == "image" and student.sample_shape == (1, 16, 16)
    plain = UNet2DModel.from_pretrained(folder / "generator")  # plain diffusers, no onestep
    x, t = torch.randn(2, 1, 16, 16), torch.full((2,), 600)
    cond = {CONCAT_KEY: torch.randn(2, 1, 16, 16)}
    ref = Denoiser(tr.generator_for_export(), tr.schedule, tr.generator.prediction_type).eval()
    with torch.no_grad():
        torch.testing.assert_close(student.generator(x, t, cond), ref(x, t, cond), rtol=0, atol=0)
        torch.testing.assert_close(plain(torch.cat([x, cond[CONCAT_KEY]], 1), t).sample,
                                   student.generator.backbone(torch.cat([x, cond[CONCAT_KEY]], 1), t).sample, rtol=0, atol=0)

    # onestep sample --image: a folder of low-res images, sample i upscales image i mod n
    import numpy as np
    from PIL import Image

    from onestep.cli import main

    lowres_dir = tmp_path / "lowres"
    lowres_dir.mkdir()
    for i in range(3):
        Image.fromarray(np.full((4, 4), 60 * i, dtype=np.uint8)).save(lowres_dir / f"{i}.png")
    assert main(["sample", "--student", str(folder), "--out", str(tmp_path / "sr"), "--num-samples", "4", "--image", str(lowres_dir)]) == 0
    saved = np.load(tmp_path / "sr" / "samples.npz")
    assert saved["samples"].shape == (4, 1, 16, 16) and saved["labels"].tolist() == [0, 1, 2, 0]
    assert main(["sample", "--student", str(folder), "--out", str(tmp_path / "sr2"), "--num-samples", "2"]) == 2  # no --image: one line, exit 2

    # onestep eval sr: each ground-truth image degraded, super-resolved with seed i, scored beside bicubic
    import torch.nn.functional as F

    from onestep.eval.sr import psnr
    from onestep.samplers.student import super_resolve

    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # larger than the student's 16x16: resized on the short side and centre-cropped
        Image.fromarray(rng.integers(0, 256, (32, 40), dtype=np.uint8)).save(hr_dir / f"{i}.png")
    assert main(["eval", "sr", "--student", str(folder), "--images", str(hr_dir), "--seed", "5", "--out", str(tmp_path / "ev"), "--report"]) == 0
    rec = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    from onestep.eval.sr import ground_truth

    hr, _ = ground_truth(student, str(hr_dir), None)
    assert hr.shape == (3, 1, 16, 16) and rec["num_samples"] == 3 and rec["seeds"] == [5, 7]
    lowres = F.interpolate(hr, scale_factor=0.25, mode="area")  # the training degradation
    x = super_resolve(student, lowres, [5, 6, 7])
    assert x.shape == hr.shape and rec["metrics"]["psnr"] == pytest.approx(psnr(x, hr), abs=1e-5)
    bicubic = F.interpolate(lowres, size=(16, 16), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert rec["bicubic"]["psnr"] == pytest.approx(psnr(bicubic, hr), abs=1e-5) and rec["rows"][1]["mse_ratio"] == 1.0
    assert rec["metrics"]["perceptual_error"] >= 0 and (tmp_path / "ev" / "examples.png").is_file()
    # a student of another teacher has no built-in ground truth: one line, exit 2
    assert main(["eval", "sr", "--student", str(folder), "--out", str(tmp_path / "ev2")]) == 2


def test_sr_metrics_on_hand_made_images():
    from onestep.eval.sr import high_frequency_energy, perceptual_error, psnr, sr_scores

    ref = torch.zeros(2, 1, 16, 16)  # mid grey (0.5 on [0, 1])
    x = ref + 0.2  # off by 0.1 on [0, 1]: MSE 0.01, PSNR 20 dB
    assert psnr(x, ref) == pytest.approx(20.0, abs=1e-4)
    assert high_frequency_energy(ref) == 0.0
    checker = torch.ones(1, 1, 16, 16)
    checker[..., ::2, :] = -1  # 8 cycles per side along one axis: all its energy is high-frequency
    assert high_frequency_energy(checker) == pytest.approx(0.25, rel=1e-6)  # (0.5 amplitude)^2 on [0, 1]
    assert high_frequency_energy(checker, min_cycles=9) == 0.0
    digits = torch.rand(4, 1, 16, 16) * 2 - 1
    assert perceptual_error(digits, digits) == 0.0
    scores = sr_scores(digits, digits)
    assert scores["hf_ratio"] == pytest.approx(1.0) and scores["psnr"] == pytest.approx(100.0)


def test_upscaler_layout_unet2dcondition_takes_image_noise_level_and_text():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4, num_class_embeds=1000,
    ).eval()
    c = ImageConditioning(image_channels=3, scale=4, upsample=False,
                          fixed={"class_labels": torch.tensor([20]), "encoder_hidden_states": torch.randn(1, 5, 16)})
    lowres = torch.rand(2, 3, 8, 8) * 2 - 1
    cond = c.from_lowres(lowres)
    assert cond[CONCAT_KEY].shape == (2, 3, 8, 8)  # the SD upscaler's image stays at the latent size
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 900])
    with torch.no_grad():
        out = call_backbone(unet, x, t, cond)
        ref = unet(torch.cat([x, lowres], 1), t, encoder_hidden_states=cond["encoder_hidden_states"],
                   class_labels=cond["class_labels"]).sample
        other = call_backbone(unet, x, t, {**cond, "class_labels": torch.tensor([350, 350])})
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.allclose(out, other)  # the noise level reaches the backbone too
