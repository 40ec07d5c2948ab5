"""Flow-matching (SD3-style) text-to-image teachers on tiny random SD3 pipelines: the flow schedule
against diffusers' FlowMatchEulerDiscreteScheduler, prompt encoding against StableDiffusion3Pipeline,
trainers for a few steps, LoRA targets, and the exported pipeline folder against onestep's sampler."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import changed, state_of, tiny_config
from t2i_fixtures import PROMPTS, SD3_SHIFT, image_dir, latent_cache_in_tmp, make_tiny_sd3, prompt_file  # noqa: F401 (fixtures)

from onestep.errors import ConfigError, TeacherError
from onestep.schedule import FlowMatchSchedule, NoiseSchedule
from onestep.teachers import load_teacher


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def sd3_t5_dir(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3_t5"), t5=True)


def _pipe(folder, t5: bool = True):
    from diffusers import DiffusionPipeline

    # diffusers loads an SD3 folder without T5 only when told so (text_encoder_3 is not optional to it).
    extra = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------ schedule


@pytest.mark.parametrize("shift", [1.0, SD3_SHIFT])
def test_flow_schedule_is_the_schedulers_training_schedule(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    schedule = NoiseSchedule.from_scheduler_config(sched)
    assert isinstance(schedule, FlowMatchSchedule) and schedule.num_train_timesteps == 1000
    # Training sigmas (the scheduler lists them from t = T-1 down to 0), shift included.
    torch.testing.assert_close(schedule.sigmas, sched.sigmas.flip(0).double(), rtol=0, atol=1e-6)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    a, s = schedule.alpha_sigma(t)
    torch.testing.assert_close(a, 1 - s) and torch.testing.assert_close(s[-1], torch.tensor(1.0))
    # The transformer's timestep input is sigma * T, the scheduler's own timesteps.
    torch.testing.assert_close(schedule.model_timestep(t), sched.timesteps.flip(0)[t], rtol=0, atol=2e-4)
    # add_noise is the scheduler's forward process.
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    ref = sched.scale_noise(x0, sched.timesteps.flip(0)[t], noise)
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), ref, rtol=0, atol=1e-6)
    # "flow" (v = eps - x0) round-trips through to_x0 / from_x0, and the target is eps - x0 (recovered
    # from x_t: x_t's float32 rounding is divided by sigma, 1e-3 at t = 0, hence the tolerance).
    x_t = schedule.add_noise(x0, noise, t)
    v = schedule.from_x0(x0, x_t, t, "flow")
    torch.testing.assert_close(v, noise - x0, rtol=0, atol=2e-4)
    torch.testing.assert_close(schedule.to_x0(v, x_t, t, "flow"), x0, rtol=0, atol=1e-5)
    assert schedule.to_dict()["shift"] == shift and schedule.to_dict()["_class_name"] == "FlowMatchEulerDiscreteScheduler"


def test_flow_schedule_refuses_dynamic_shifting_and_vp_stays_vp():
    with pytest.raises(ConfigError, match="use_dynamic_shifting"):
        NoiseSchedule.from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})
    with pytest.raises(ConfigError, match="FlowMatchEulerDiscreteScheduler"):
        NoiseSchedule.from_scheduler_config({"_class_name": "FlowMatchLCMScheduler"})
    vp = NoiseSchedule.from_scheduler_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear"})
    t = torch.tensor([5, 999])
    assert vp.kind == "vp" and torch.equal(vp.model_timestep(t), t)


# ------------------------------------------------------------------------ teachers


@pytest.mark.parametrize("t5", [False, True])
def test_sd3_prompts_are_encoded_as_the_pipeline_encodes_them(t5, sd3_dir, sd3_t5_dir, prompt_file):
    folder = sd3_t5_dir if t5 else sd3_dir
    teacher = load_teacher(folder, prompts=str(prompt_file), negative_prompt="blurry")
    assert isinstance(teacher.schedule, FlowMatchSchedule) and teacher.prediction_type == "flow"
    assert teacher.sample_shape == (4, 8, 8) and teacher.guidance_scale == 7.0 and teacher.vae is not None

    pipe = _pipe(folder, t5)
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS[:2], None, None, device="cpu", negative_prompt=["blurry"] * 2)
        empty, _, empty_pooled, _ = pipe.encode_prompt([""], None, None, device="cpu", do_classifier_free_guidance=False)
    cond = teacher.conditioning.from_labels(PROMPTS[:2])
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert emb.shape == (2, 16 + 256, 40)  # CLIP tokens padded to the T5 width, then 256 T5 tokens (or zeros)
    assert (emb[:, 16:].abs().max() > 0) == t5
    torch.testing.assert_close(cond["encoder_hidden_states"], emb, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=1e-6)
    null = teacher.conditioning.null(2)
    torch.testing.assert_close(null["encoder_hidden_states"], neg, rtol=0, atol=1e-6)
    torch.testing.assert_close(null["pooled_projections"], neg_pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(teacher.conditioning.empty(1)["pooled_projections"], empty_pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(teacher.conditioning.empty(1)["encoder_hidden_states"], empty, rtol=0, atol=1e-6)

    # The denoiser feeds the transformer sigma * T and turns its velocity into x0; GAN features
    # are the middle block's image tokens on the patch grid.
    den = teacher.denoiser()
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 300])
    with torch.no_grad():
        x0, feats = den(x, t, cond, return_features=True)
        v = pipe.transformer(hidden_states=x, timestep=pipe.scheduler.timesteps.flip(0)[t], **cond).sample
    torch.testing.assert_close(teacher.schedule.from_x0(x0, x, t, "flow"), v, rtol=1e-4, atol=1e-5)
    assert feats.shape == (2, 16, 4, 4)  # (B, inner dim, H / patch, W / patch)


def test_sd3_folder_errors_name_the_missing_part(sd3_dir, sd3_t5_dir, tmp_path):
    broken = tmp_path / "no_text_encoder_2"
    shutil.copytree(sd3_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(TeacherError, match="no 'text_encoder_2' component"):
        load_teacher(broken)
    half_t5 = tmp_path / "no_tokenizer_3"
    shutil.copytree(sd3_t5_dir, half_t5)
    shutil.rmtree(half_t5 / "tokenizer_3")
    with pytest.raises(TeacherError, match="no 'tokenizer_3' component"):
        load_teacher(half_t5)
    pickled = tmp_path / "pickled"
    shutil.copytree(sd3_dir, pickled)
    w = pickled / "transformer" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    with pytest.raises(TeacherError, match="safetensors only"):
        load_teacher(pickled)
    dynamic = tmp_path / "dynamic"
    shutil.copytree(sd3_dir, dynamic)
    cfg_file = dynamic / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "use_dynamic_shifting": True}))
    with pytest.raises(ConfigError, match="use_dynamic_shifting"):
        load_teacher(dynamic)


def test_lora_targets_of_a_transformer_are_its_attention_and_mlp_layers(sd3_dir):
    from diffusers import SD3Transformer2DModel

    from onestep.lora import lora_target_modules

    names = lora_target_modules(SD3Transformer2DModel.from_pretrained(sd3_dir / "transformer"))
    assert "transformer_blocks.0.attn.to_q" in names and "transformer_blocks.0.attn.add_k_proj" in names
    assert "transformer_blocks.1.ff.net.2" in names
    assert all(n.startswith("transformer_blocks.") for n in names)  # no embedders, no proj_out
    assert not any("norm" in n for n in names)


# ------------------------------------------------------------------------ trainers

METHOD_OVERRIDES = {
    "dmd2": dict(gan_weight_generator=1e-3),
    "consistency": dict(num_ddim_timesteps=10),
    "vsd": dict(),
}


@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_trainers_run_on_the_tiny_sd3_pipeline(method, sd3_dir, prompt_file, image_dir, tmp_path):
    from onestep.trainers import make_trainer

    real = {"real_images": str(image_dir)} if method in ("dmd2", "consistency") else {}
    config = tiny_config(method, tmp_path, sd3_dir, prompts=str(prompt_file), generator_timesteps=[999], batch_size=2,
                         max_steps=3, preview_every=3, preview_num=2, **real, **METHOD_OVERRIDES[method])
    trainer = make_trainer(config)
    # consistency trains no fake score; its EMA target (an extra network, decay 0.95) moves instead
    moving = trainer.extras["target"] if method == "consistency" else trainer.fake.backbone
    gen0, moving0 = state_of(trainer.generator.backbone), state_of(moving)
    teacher0 = {k: v.detach().clone() for k, v in trainer.triad.teacher_parameters().items()}
    student = trainer.train()
    assert changed(gen0, trainer.generator.backbone) > 0
    assert changed(moving0, moving) > 0
    assert all(torch.equal(teacher0[k], v) for k, v in trainer.triad.teacher_parameters().items())
    assert (tmp_path / "run" / "previews" / "step-000003.png").is_file()
    meta = json.loads((student / "onestep.json").read_text())
    assert meta["model_class"] == "SD3Transformer2DModel" and meta["prediction_type"] == "flow"
    assert meta["generator_subfolder"] == "transformer" and (student / "transformer").is_dir()


def test_lora_fake_score_on_a_transformer_is_the_teacher_with_adapters_off(sd3_dir, prompt_file, tmp_path):
    from diffusers import SD3Transformer2DModel

    from onestep.trainers import make_trainer

    config = tiny_config("dmd2", tmp_path, sd3_dir, prompts=str(prompt_file), generator_timesteps=[999], batch_size=2,
                         max_steps=2, fake_score="lora", lora_rank=4, export=False)
    trainer = make_trainer(config)
    assert trainer.triad.teacher.backbone is trainer.fake.backbone
    trainer.train()
    assert any(p.abs().sum() > 0 for n, p in trainer.fake.backbone.named_parameters() if "lora_B" in n)
    plain = SD3Transformer2DModel.from_pretrained(sd3_dir / "transformer")
    cond = trainer.conditioning.from_labels(PROMPTS[:2])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([300, 700])
    with torch.no_grad():
        ref = plain(hidden_states=x, timestep=trainer.schedule.model_timestep(t), **cond).sample
        off = trainer.schedule.from_x0(trainer.triad.teacher(x, t, cond), x, t, "flow")
        on = trainer.schedule.from_x0(trainer.fake(x, t, cond), x, t, "flow")
    torch.testing.assert_close(off, ref, rtol=1e-4, atol=1e-5)
    assert (on - ref).abs().max() > 1e-6


# ------------------------------------------------------------------------ export


def test_exported_sd3_student_is_a_diffusers_pipeline_equal_to_onestep_sampler(sd3_t5_dir, prompt_file, tmp_path):
    from safetensors.torch import load_file

    from onestep.export import load_student
    from onestep.samplers import sample_text_student
    from onestep.samplers.noise import per_sample_noise, seed_generators
    from onestep.samplers.student import sample_student_from_seeds
    from onestep.trainers import make_trainer

    config = tiny_config("dmd2", tmp_path, sd3_t5_dir, prompts=str(prompt_file), generator_timesteps=[999], batch_size=2, max_steps=2)
    out = make_trainer(config).train()
    for part in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3", "scheduler", "transformer"):
        assert (out / part).is_dir(), part
    assert not list(out.rglob("*.bin"))
    student = load_student(out)
    assert set(load_file(str(out / "student_transformer.safetensors"))) == set(student.generator.backbone.state_dict())
    meta = json.loads((out / "onestep.json").read_text())
    assert meta["pipeline_sigmas"] == [1.0] and meta["conditioning"]["family"] == "sd3"

    prompts, seeds = ["a red cube", "something never seen in training"], [11, 12]
    x, _ = sample_student_from_seeds(student.generator, student, student.timesteps, seeds, labels=prompts)
    with torch.no_grad():
        ours = student.decode(x).clamp(-1, 1)
    pipe = _pipe(out)
    latents = per_sample_noise(seed_generators(seeds), student.sample_shape)
    theirs = pipe(prompt=prompts, num_inference_steps=1, guidance_scale=1.0, latents=latents, output_type="pt").images * 2 - 1
    assert pipe.scheduler.timesteps.tolist() == [1000.0] and pipe.scheduler.config.stochastic_sampling
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - ours[0]).abs().max() > 1e-4
    # The same through onestep's text sampler; NASA has no cross-attention to act in here.
    torch.testing.assert_close(sample_text_student(student, prompts, seeds), ours, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="cross-attention"):
        sample_text_student(student, prompts, seeds, negative_prompt="blurry", nasa_alpha=0.5)


def test_k_step_sd3_student_pipeline_sigmas_are_its_timesteps(sd3_dir, prompt_file, tmp_path):
    from onestep.export import load_student
    from onestep.trainers import make_trainer

    config = tiny_config("dmd2", tmp_path, sd3_dir, prompts=str(prompt_file), generator_timesteps=[999, 499], batch_size=2, max_steps=1)
    out = make_trainer(config).train()
    meta = json.loads((out / "onestep.json").read_text())
    assert meta["pipeline_sigmas"] == [1.0, 0.5]
    student = load_student(out)
    pipe = _pipe(out, t5=False)
    pipe.scheduler.set_timesteps(sigmas=meta["pipeline_sigmas"])
    ts = torch.tensor(student.timesteps)
    torch.testing.assert_close(pipe.scheduler.timesteps, student.schedule.model_timestep(ts), rtol=0, atol=1e-3)
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], student.schedule.alpha_sigma(ts)[1], rtol=0, atol=1e-6)
    # A plain call runs the student's two steps (re-noising between them) and gives an image.
    img = pipe(prompt=PROMPTS[:1], num_inference_steps=2, sigmas=meta["pipeline_sigmas"], guidance_scale=1.0, output_type="pt").images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()


def test_sd3_dmd2_preset_loads(tmp_path):
    from onestep.trainers import load_config

    config = load_config("sd3_dmd2_lora")
    assert config.teacher.startswith("/path/to/") and config.guidance_scale == 7.0
    assert config.fake_score == "lora" and config.mixed_precision == "bf16"
