"""Video: the moving-digit clips, the UNet3D ``digit-clips`` teacher layout and MCM, on tiny models built from config."""

import pytest
import torch

from conftest import TINY_SCHEDULER, changed, state_of
from onestep.conditioning import ClassTokenConditioning, cat_cond, conditioning_from_dict
from onestep.denoiser import call_backbone
from onestep.video import (
    FRAMES,
    centroids,
    clip_velocity,
    clips_dataset,
    frame_classes,
    frame_differences,
    render_clip,
    still_frames,
)

TINY_UNET3D = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    down_block_types=("DownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "UpBlock3D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=11,
    attention_head_dim=4,
)


@pytest.fixture(scope="module")
def clips_teacher_dir(tmp_path_factory):
    from diffusers import UNet3DConditionModel

    from onestep.teachers import save_unet_teacher
    from onestep.teachers.clips import TEACHER_META

    torch.manual_seed(0)
    return save_unet_teacher(tmp_path_factory.mktemp("tiny_clips"), UNet3DConditionModel(**TINY_UNET3D), TINY_SCHEDULER, TEACHER_META)


@pytest.fixture
def clips_teacher(clips_teacher_dir):
    from onestep.teachers.clips import load_clips_teacher

    return load_clips_teacher(clips_teacher_dir, name="tiny-clips")


def test_clips_have_shape_range_labels_and_are_deterministic():
    d = clips_dataset("test", n=12, seed=3)
    assert d["clips"].shape == (12, 1, FRAMES, 16, 16) and d["labels"].shape == (12,)
    assert d["clips"].min() >= -1 and d["clips"].max() <= 1
    again = clips_dataset("test", n=12, seed=3)
    assert torch.equal(d["clips"], again["clips"]) and torch.equal(d["labels"], again["labels"])
    assert not torch.equal(d["clips"], clips_dataset("test", n=12, seed=4)["clips"])
    # every clip moves at its drawn velocity, exactly (integer shifts of one digit)
    vel, residual = clip_velocity(d["clips"])
    torch.testing.assert_close(vel, d["velocity"], atol=1e-4, rtol=0)
    assert residual.max() < 1e-4
    x, y = still_frames("train", n=5)
    assert x.shape == (5, 1, 16, 16) and y.shape == (5,)


def test_motion_metric_on_a_hand_made_clip():
    digit = torch.zeros(8, 8)
    digit[3:5, 3:5] = 1.0  # a 2x2 square: centroid at (3.5, 3.5) from the digit's corner
    clip = render_clip(digit, start=(1, 6), velocity=(2, -1), frames=4)[None]
    c = centroids(clip)[0]
    torch.testing.assert_close(c[0], torch.tensor([4.5, 9.5]))
    vel, residual = clip_velocity(clip)
    torch.testing.assert_close(vel[0], torch.tensor([2.0, -1.0]), atol=1e-5, rtol=0)
    assert residual[0] < 1e-5
    with pytest.raises(ValueError, match="leaves"):
        render_clip(digit, start=(0, 0), velocity=(-1, 0))


def test_frames_of_real_clips_are_classified():
    d = clips_dataset("test", n=20, seed=0)
    acc = (frame_classes(d["clips"]) == d["labels"][:, None]).float().mean()
    assert acc > 0.75  # about 0.9 on real clips (the window is found from the centroid)


def test_motion_distance_ignores_a_per_clip_constant_image():
    from onestep.consistency import consistency_distance

    torch.manual_seed(0)
    a = torch.randn(3, 1, 4, 16, 16)
    const = torch.randn(3, 1, 1, 16, 16)  # one image per clip, added to every frame
    d = consistency_distance(frame_differences(a), frame_differences(a + const), "l2", 0.001)
    assert torch.allclose(d, torch.zeros(3), atol=1e-12)
    moved = a.clone()
    moved[:, :, 2] += 0.5  # one frame changes: motion changes
    assert (consistency_distance(frame_differences(a), frame_differences(moved), "l2", 0.001) > 0.01).all()
    # the plain consistency distance sees the constant image
    assert (consistency_distance(a, a + const, "l2", 0.001) > 0.1).all()


def test_class_token_conditioning_round_trips_and_batches():
    c = ClassTokenConditioning(num_classes=10, null_class=10)
    cond = c.from_labels([3, 7])
    assert cond["encoder_hidden_states"].shape == (2, 1, 11)
    assert c.labels_of(cond).tolist() == [3, 7] and c.labels_of(c.null(2)).tolist() == [10, 10]
    assert c.labels_of(c.drop(cond, 1.0)).tolist() == [10, 10] and c.guidable
    assert cat_cond(cond, c.null(2))["encoder_hidden_states"].shape == (4, 1, 11)
    again = conditioning_from_dict(c.to_dict())
    assert isinstance(again, ClassTokenConditioning) and again.to_dict() == c.to_dict()


def test_clips_teacher_loads_with_shape_and_conditioning(clips_teacher):
    t = clips_teacher
    assert t.sample_shape == (1, FRAMES, 16, 16) and t.conditioning.kind == "class_tokens"
    x, cond = t.real_data(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, FRAMES, 16, 16) and cond["encoder_hidden_states"].shape == (3, 1, 11)
    xt, ts = torch.randn(3, 1, FRAMES, 16, 16), torch.tensor([10, 500, 900])
    out = call_backbone(t.backbone, xt, ts, cond)
    assert out.shape == xt.shape
    # the class token reaches the backbone (through the mid block's cross-attention)
    other = t.conditioning.from_labels((t.conditioning.labels_of(cond) + 1) % 10)
    assert not torch.allclose(out, call_backbone(t.backbone, xt, ts, other))
    assert t.denoiser().guided(xt, ts, cond, t.conditioning.null(3), 2.0).shape == xt.shape


def _mcm_config(tmp_path, **overrides):
    from onestep.trainers import MCMConfig

    values = dict(teacher="tiny-clips", output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, num_ddim_timesteps=4,
                  max_timestep=959, guidance_scale=2.0, lr_generator=1e-3, lr_fake=1e-3, log_with="none", seed=0,
                  frame_gan_weight=0.1, mix_prob=0.5, export=False, checkpoint_every=0)
    values.update(overrides)
    return MCMConfig(**values)


def test_mcm_step_changes_the_generator_and_the_discriminator_not_the_teacher(tmp_path, clips_teacher):
    from onestep.trainers import MCMTrainer

    tr = MCMTrainer(_mcm_config(tmp_path), teacher=clips_teacher)
    g0, t0, h0 = state_of(tr.generator.backbone), state_of(tr.triad.teacher.backbone), state_of(tr.heads)
    logs = tr.train_step()
    assert {"loss/motion", "loss/gan_g", "loss/gan_d", "mix/student_starts"} <= set(logs)
    assert changed(g0, tr.generator.backbone) > 0 and changed(h0, tr.heads) > 0
    assert changed(t0, tr.triad.teacher.backbone) == 0
    # the EMA target is frozen and evaluated without the temporal convolutions' dropout: the same input, the same target
    target = tr.extras["target"]
    assert not target.training and not any(m.training for m in target.modules())
    x, t = torch.randn(2, 1, FRAMES, 16, 16), torch.tensor([500, 700])
    cond = tr.conditioning.from_labels([1, 2])
    with torch.no_grad():
        a, b = (target(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample for _ in range(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mcm_refuses_image_teachers_and_scott_gan(tmp_path, tiny_teacher, clips_teacher):
    from onestep.errors import ConfigError
    from onestep.trainers import MCMTrainer

    with pytest.raises(ConfigError, match="frame_gan_weight"):
        _mcm_config(tmp_path, gan_weight=0.5)
    with pytest.raises(ConfigError, match="video"):
        MCMTrainer(_mcm_config(tmp_path, frame_gan_weight=0.0), teacher=tiny_teacher)


def test_mcm_student_exports_reloads_and_samples(tmp_path, clips_teacher):
    from onestep.export import load_student
    from onestep.trainers import MCMTrainer

    tr = MCMTrainer(_mcm_config(tmp_path, export=True, frame_gan_weight=0.0), teacher=clips_teacher)
    folder = tr.train()
    student = load_student(folder)
    assert student.meta["sample_shape"] == [1, FRAMES, 16, 16]
    src = tr.generator_on_main().state_dict()
    for k, v in student.generator.backbone.state_dict().items():
        assert torch.equal(v, src[k].to(v.dtype))
    # sampled clip by clip from the reloaded folder: (N, C, F, H, W), the same per seed as the trainer's generator
    from onestep.samplers.student import sample_student_from_seeds

    ts = student.timesteps_for(1)
    x, _ = sample_student_from_seeds(student.generator, student, ts, [3, 4], [0, 1])
    ref, _ = sample_student_from_seeds(tr.sampling_generator(tr.generator_for_export().eval()), tr.teacher_spec, ts, [3, 4], [0, 1])
    assert x.shape == (2, 1, FRAMES, 16, 16) and torch.isfinite(x).all()
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    # the demo picks a class for it and shows each clip as a strip of frames, the samples onestep sample gives
    from onestep.demo import DemoModel, DemoRequest
    from onestep.demo.gallery import result_items

    model = DemoModel(student, device="cpu")
    assert model.kind == "class" and model.num_classes == 10
    result = model.run(DemoRequest(label=None, seed=3, num_images=2, steps=1))
    torch.testing.assert_close(result.student_samples, x, rtol=0, atol=0)
    assert [(pic.shape, c) for pic, c in result_items(result)] == [((16, FRAMES * 17 - 1), "class 0, seed 3"), ((16, FRAMES * 17 - 1), "class 1, seed 4")]


def test_builtin_digit_clips_teacher_loads_from_its_safetensors():
    from onestep.teachers import load_teacher
    from onestep.teachers.clips import CLIPS_TEACHER

    files = list((CLIPS_TEACHER / "unet").glob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) < 5 * 2**20
    t = load_teacher("digit-clips")
    assert t.name == "digit-clips" and t.sample_shape == (1, FRAMES, 16, 16) and t.guidance_scale == 2.0
    assert type(t.backbone).__name__ == "UNet3DConditionModel" and t.real_data is not None
