"""Latent text-to-video teachers (diffusers' ``TextToVideoSDPipeline`` layout: SD's parts with a
``UNet3DConditionModel``), on a tiny random pipeline built from config: loading, distillation, and a student
folder that plain diffusers samples."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_config
from t2i_fixtures import PROMPTS, make_tiny_sd, make_tiny_t2v, write_prompts

from onestep.errors import ConfigError, TeacherError
from onestep.teachers import load_teacher

FRAMES = 3


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    return make_tiny_t2v(tmp_path_factory.mktemp("t2v") / "pipe")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("t2v_prompts") / "prompts.txt")


def test_t2v_teacher_is_a_latent_clip_teacher_decoded_frame_by_frame(t2v_dir, prompts):
    from diffusers import TextToVideoSDPipeline

    teacher = load_teacher(t2v_dir, prompts=str(prompts), num_frames=FRAMES)
    assert teacher.sample_shape == (4, FRAMES, 8, 8) and teacher.conditioning.kind == "text"
    assert teacher.meta["modality"] == "video" and teacher.meta["frames"] == FRAMES and teacher.guidance_scale == 9.0
    assert load_teacher(t2v_dir, prompts=str(prompts)).sample_shape == (4, 16, 8, 8)  # the pipeline's default 16 frames
    z = torch.randn(2, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = TextToVideoSDPipeline.from_pretrained(t2v_dir, use_safetensors=True)
    with torch.no_grad():
        ours = teacher.vae.decode(z)
        theirs = pipe.decode_latents(z)
    assert ours.shape == (2, 3, FRAMES, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # the denoiser reads the clip with the prompt's tokens, as the pipeline's UNet call does
    cond = teacher.conditioning.from_labels(PROMPTS[:2])
    t = torch.tensor([500, 500])
    with torch.no_grad():
        eps = pipe.unet(z, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        x0 = teacher.denoiser()(z, t, cond)
    a, s = (v.view(-1, 1, 1, 1, 1) for v in teacher.schedule.alpha_sigma(t))
    torch.testing.assert_close(x0, (z - s * eps) / a, rtol=1e-4, atol=1e-4)


def test_frames_and_still_images_are_refused_where_they_do_not_fit(t2v_dir, prompts, tmp_path):
    with pytest.raises(ConfigError, match="num_frames must be a whole number >= 1"):
        load_teacher(t2v_dir, prompts=str(prompts), num_frames=0)
    with pytest.raises(ConfigError, match="still images, not clips"):
        load_teacher(t2v_dir, prompts=str(prompts), real_images=str(tmp_path))
    with pytest.raises(TeacherError, match="num_frames: an option of text-to-video teachers; digits is not one"):
        load_teacher("digits", num_frames=4)
    with pytest.raises(TeacherError, match="num_frames: an option of text-to-video teachers"):
        load_teacher(make_tiny_sd(tmp_path / "sd"), prompts=str(prompts), num_frames=4)
    with pytest.raises(ConfigError, match="num_frames must be > 0"):
        tiny_config("dmd2", tmp_path, t2v_dir, num_frames=-2)


def test_dmd2_student_of_a_t2v_teacher_is_a_pipeline_folder_plain_diffusers_samples(t2v_dir, prompts, tmp_path):
    from diffusers import DiffusionPipeline, UNet3DConditionModel

    from onestep.export import load_student
    from onestep.samplers.student import sample_text_student
    from onestep.trainers import make_trainer

    config = tiny_config("dmd2", tmp_path, t2v_dir, prompts=str(prompts), num_frames=FRAMES, generator_timesteps=[999], batch_size=2, max_steps=2)
    trainer = make_trainer(config)
    g0 = {k: v.clone() for k, v in trainer.generator.backbone.state_dict().items()}
    out = trainer.train()
    assert any(not torch.equal(g0[k], v) for k, v in trainer.generator.backbone.state_dict().items())
    for part in ("vae", "text_encoder", "tokenizer", "scheduler", "unet"):
        assert (out / part).is_dir(), part
    assert isinstance(UNet3DConditionModel.from_pretrained(out / "unet"), UNet3DConditionModel)
    student = load_student(out)
    assert student.sample_shape == (4, FRAMES, 8, 8) and student.meta["model_class"] == "UNet3DConditionModel"

    texts, seeds = ["a red cube", "something never seen in training"], [5, 6]
    ours = sample_text_student(student, texts, seeds).clamp(-1, 1)
    assert ours.shape == (2, 3, FRAMES, 16, 16)
    pipe = DiffusionPipeline.from_pretrained(out, use_safetensors=True)
    assert type(pipe).__name__ == "TextToVideoSDPipeline"
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    frames = pipe(prompt=texts, num_frames=FRAMES, num_inference_steps=1, guidance_scale=1.0, generator=gens, output_type="pt").frames
    theirs = frames.permute(0, 2, 1, 3, 4) * 2 - 1  # (B, F, C, H, W) in [0, 1] -> onestep's (B, C, F, H, W) in [-1, 1]
    assert pipe.scheduler.timesteps.tolist() == student.timesteps == [999]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # the model card's snippet, as written, samples the folder in plain diffusers
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(code.replace("path/to/this/folder", str(out)), scope)
    assert len(scope["frames"]) == FRAMES
    # onestep sample: samples.npz holds the decoded clips, one looping GIF per clip, grid.png one clip a row
    import numpy as np
    from PIL import Image

    from onestep.cli import main

    assert main(["sample", "--student", str(out), "--prompt", texts[0], "--prompt", texts[1], "--seed", "5",
                 "--num-samples", "2", "--out", str(tmp_path / "s")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "s" / "samples.npz")["samples"], sample_text_student(student, texts, seeds).numpy(), atol=1e-5)
    with Image.open(tmp_path / "s" / "clip_00001.gif") as gif:
        assert gif.n_frames == FRAMES and gif.size == (128, 128)
    with Image.open(tmp_path / "s" / "grid.png") as grid:
        assert abs(grid.size[0] / grid.size[1] - FRAMES / 2) < 0.05  # 3 frames a row, 2 rows
