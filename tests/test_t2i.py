"""Text-to-image teachers on tiny random SD / SDXL pipelines: loading, conditioning, every
trainer for a few steps, the LoRA fake score, and the exported pipeline folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import changed, state_of, tiny_config
from t2i_fixtures import PROMPTS, image_dir, latent_cache_in_tmp, make_tiny_clip, make_tiny_sd, make_tiny_sdxl, prompt_file  # noqa: F401 (fixtures)

from onestep.errors import ConfigError, OnestepError, TeacherError
from onestep.teachers import load_teacher

@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


def _pipe(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------ teachers


def test_sd_teacher_is_latent_and_encodes_prompts_as_the_pipeline(sd_dir, prompt_file):
    teacher = load_teacher(sd_dir, prompts=str(prompt_file), negative_prompt="blurry")
    assert teacher.sample_shape == (4, 8, 8)  # latents, not 3x16x16 pixels
    assert teacher.vae is not None and teacher.clip is None
    assert teacher.conditioning.kind == "text" and teacher.conditioning.prompts == PROMPTS
    assert teacher.schedule.num_train_timesteps == 1000 and teacher.prediction_type == "epsilon"

    pipe = _pipe(sd_dir)
    with torch.no_grad():
        ref, ref_neg = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, True, negative_prompt=["blurry"] * 2)
    ours = teacher.conditioning.from_labels(PROMPTS[:2])
    assert set(ours) == {"encoder_hidden_states"}
    torch.testing.assert_close(ours["encoder_hidden_states"], ref, rtol=0, atol=1e-6)
    # The negative prompt replaces the empty prompt as the unconditional branch; dropping uses "".
    torch.testing.assert_close(teacher.conditioning.null(2)["encoder_hidden_states"], ref_neg, rtol=0, atol=1e-6)
    with torch.no_grad():
        empty, _ = pipe.encode_prompt([""], "cpu", 1, False)
    torch.testing.assert_close(teacher.conditioning.empty(1)["encoder_hidden_states"], empty, rtol=0, atol=1e-6)
    # A batch drawn for training holds rows of the cached prompt table.
    g = torch.Generator().manual_seed(0)
    batch = teacher.conditioning.sample(6, generator=g)
    table = teacher.conditioning.from_labels(PROMPTS)["encoder_hidden_states"]
    for row in batch["encoder_hidden_states"]:
        assert any(torch.equal(row, t) for t in table)


def test_sdxl_conditioning_matches_the_pipeline_and_reaches_the_unet(sdxl_dir, prompt_file):
    teacher = load_teacher(sdxl_dir, prompts=str(prompt_file))
    cond = teacher.conditioning.from_labels(PROMPTS[:2])
    assert set(cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    pipe = _pipe(sdxl_dir)
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS[:2], device="cpu", do_classifier_free_guidance=True)
    torch.testing.assert_close(cond["encoder_hidden_states"], emb, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=0, atol=1e-6)
    assert cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # (H, W, crop, H, W) in pixels
    # force_zeros_for_empty_prompt: the unconditional branch is zeros, as in the SDXL pipeline.
    null = teacher.conditioning.null(2)
    torch.testing.assert_close(null["encoder_hidden_states"], neg) and torch.testing.assert_close(null["text_embeds"], neg_pooled)
    assert null["text_embeds"].abs().sum() == 0

    # The denoiser hands pooled embeddings and time ids to the UNet as added_cond_kwargs.
    den = teacher.denoiser()
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 500])
    with torch.no_grad():
        x0 = den(x, t, cond)
        eps = teacher.backbone(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                               added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample
        torch.testing.assert_close(teacher.schedule.eps_from_x0(x0, x, t), eps, rtol=1e-4, atol=1e-5)
        other_pooled = den(x, t, {**cond, "text_embeds": cond["text_embeds"] + 1})
        other_time = den(x, t, {**cond, "time_ids": cond["time_ids"] * 2})
    assert (other_pooled - x0).abs().max() > 1e-4 and (other_time - x0).abs().max() > 1e-4


def test_prompts_from_jsonl_and_csv(sd_dir, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"caption": "one"}\n{"prompt": "two"}\n"three"\n')
    (tmp_path / "p.csv").write_text("id,caption\n1,alpha\n2,beta\n")
    assert load_teacher(sd_dir, prompts=str(tmp_path / "p.jsonl")).conditioning.prompts == ["one", "two", "three"]
    assert load_teacher(sd_dir, prompts=str(tmp_path / "p.csv")).conditioning.prompts == ["alpha", "beta"]
    vt = load_teacher(sd_dir, validation_prompts=str(tmp_path / "p.csv"))
    assert vt.conditioning.validation_prompts == ["alpha", "beta"] and vt.conditioning.num_classes == 2
    with pytest.raises(ConfigError, match="needs training prompts"):
        vt.conditioning.sample(2)


def test_clear_errors_for_broken_folders(sd_dir, tmp_path):
    broken = tmp_path / "no_vae"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(TeacherError, match="no 'vae' component"):
        load_teacher(broken)
    pickled = tmp_path / "pickled"
    shutil.copytree(sd_dir, pickled)
    w = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    with pytest.raises(TeacherError, match="safetensors only"):
        load_teacher(pickled)
    (tmp_path / "plain").mkdir()
    with pytest.raises(TeacherError, match="model_index.json is missing"):
        load_teacher(tmp_path / "plain")
    with pytest.raises(TeacherError, match="local diffusers pipeline folder"):
        load_teacher("/path/to/stable-diffusion-v1-5")


def test_real_images_are_encoded_once_and_cached(sd_dir, image_dir, tmp_path):
    t1 = load_teacher(sd_dir, real_images=str(image_dir))
    cached = list((tmp_path / "cache" / "latents").glob("*/shard-*.safetensors"))
    assert len(cached) == 1
    x, cond = t1.real_data(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 4, 8, 8) and cond["encoder_hidden_states"].shape[0] == 3
    # The cached latents are the VAE's: decode(encode(img)) of the first image, by hand.
    from safetensors.torch import load_file

    from onestep.teachers.latents import load_image

    img = load_image(image_dir / "img_0.png", 16)[None]
    z = t1.vae.encode(img)
    torch.testing.assert_close(load_file(str(cached[0]))["latents"][:1], z, rtol=0, atol=1e-5)
    stamp = cached[0].stat().st_mtime_ns
    load_teacher(sd_dir, real_images=str(image_dir))
    assert cached[0].stat().st_mtime_ns == stamp  # read, not recomputed
    (image_dir / "metadata.jsonl").rename(image_dir / "meta.bak")
    try:
        with pytest.raises(ConfigError, match="no caption"):
            load_teacher(sd_dir, real_images=str(image_dir))
    finally:
        (image_dir / "meta.bak").rename(image_dir / "metadata.jsonl")


# ------------------------------------------------------------------------ trainers

METHOD_OVERRIDES = {
    "dmd2": dict(gan_weight_generator=1e-3),
    "vsd": dict(guidance_range=[0.5, 4.0]),
    "fdistill": dict(),
    "sid": dict(),
    "disback-dmd2": dict(disback_nodes=1, disback_record_steps=1, disback_interval=1),
    "consistency": dict(num_ddim_timesteps=10, guidance_scale_range=[2.0, 8.0]),
}


@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_every_trainer_runs_on_the_tiny_sd_pipeline(method, sd_dir, prompt_file, image_dir, tmp_path):
    from onestep.trainers import make_trainer

    real = {"real_images": str(image_dir)} if method in ("dmd2", "fdistill", "consistency") else {}
    config = tiny_config(
        method, tmp_path, sd_dir, prompts=str(prompt_file), generator_timesteps=[999], batch_size=2,
        max_steps=3, preview_every=3, preview_num=2, **real, **METHOD_OVERRIDES[method],
    )
    trainer = make_trainer(config)
    gen0 = state_of(trainer.generator.backbone)
    teacher0 = {k: v.detach().clone() for k, v in trainer.triad.teacher_parameters().items()}
    student = trainer.train()
    assert changed(gen0, trainer.generator.backbone) > 0
    assert all(torch.equal(teacher0[k], v) for k, v in trainer.triad.teacher_parameters().items())
    assert (tmp_path / "run" / "previews" / "step-000003.png").is_file()  # decoded through the VAE
    meta = json.loads((student / "onestep.json").read_text())
    assert meta["conditioning"]["kind"] == "text" and meta["sample_shape"] == [4, 8, 8]
    assert (student / "model_index.json").is_file() and (student / "unet").is_dir()


@pytest.mark.parametrize("method", ["dmd2", "disback-dmd2", "fdistill"])
def test_a_gan_term_without_real_images_is_refused(method, sd_dir, prompt_file, tmp_path):
    # Without real samples the discriminator never learns, yet would push the generator: refuse it.
    from onestep.trainers import make_trainer

    gan = {} if method == "fdistill" else {"gan_weight_generator": 1e-3}
    config = tiny_config(method, tmp_path, sd_dir, prompts=str(prompt_file), **gan)
    with pytest.raises(ConfigError, match="trains its discriminator on real samples.*real_images") as err:
        make_trainer(config)
    assert ("gan_weight_generator: 0" in str(err.value)) == (method != "fdistill")  # f-distill cannot drop it
    make_trainer(tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file)))  # no GAN term: fine


def test_lora_fake_score_keeps_one_copy_and_adapters_off_is_the_teacher(sd_dir, prompt_file, tmp_path):
    from diffusers import UNet2DConditionModel

    from onestep.trainers import make_trainer

    def storage(*nets):
        return {p.untyped_storage().data_ptr() for n in nets for name, p in n.named_parameters() if "lora_" not in name}

    config = tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file), generator_timesteps=[999], batch_size=2,
                         max_steps=2, fake_score="lora", lora_rank=4, export=False)
    trainer = make_trainer(config)
    base = sum(p.numel() for p in trainer.triad.teacher.backbone.parameters() if True) - sum(
        p.numel() for n, p in trainer.triad.teacher.backbone.named_parameters() if "lora_" in n)
    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet")
    assert base == sum(p.numel() for p in unet.parameters())
    # Teacher and fake score are one module: one set of base weights in memory.
    assert trainer.triad.teacher.backbone is trainer.fake.backbone
    assert storage(trainer.triad.teacher.backbone, trainer.fake.backbone) == storage(trainer.triad.teacher.backbone)
    trainer.train()
    lora = {n: p for n, p in trainer.fake.backbone.named_parameters() if "lora_B" in n}
    assert any(p.abs().sum() > 0 for p in lora.values())  # the adapters learned something
    cond = trainer.conditioning.from_labels(PROMPTS[:2])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([300, 700])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        off = trainer.triad.teacher.eps(x, t, cond)
        on = trainer.fake.eps(x, t, cond)
    torch.testing.assert_close(off, ref, rtol=1e-4, atol=1e-5)
    assert (on - ref).abs().max() > 1e-6


def test_lora_generator_trains_adapters_only_and_exports_merged(sd_dir, prompt_file, tmp_path):
    from diffusers import UNet2DConditionModel

    from onestep.export import load_student
    from onestep.trainers import make_trainer

    config = tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file), generator_timesteps=[999], batch_size=2,
                         max_steps=3, fake_updates_per_generator=1, generator_lora_rank=4)
    trainer = make_trainer(config)
    gen = trainer.generator.backbone
    trainable = [n for n, p in gen.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base0 = {n: p.detach().clone() for n, p in gen.named_parameters() if "lora_" not in n}
    student = trainer.train()
    assert all(torch.equal(base0[n], p) for n, p in gen.named_parameters() if "lora_" not in n)
    assert any(p.abs().sum() > 0 for n, p in gen.named_parameters() if "lora_B" in n)
    # The export is a plain UNet whose output is the LoRA generator's.
    plain = UNet2DConditionModel.from_pretrained(student / "unet")
    assert not any("lora" in k for k in plain.state_dict())
    cond = trainer.conditioning.from_labels(PROMPTS[:2])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([999, 999])
    with torch.no_grad():
        ours = trainer.generator(x, t, cond)
        theirs = load_student(student).generator(x, t, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ export


@pytest.mark.parametrize("make", ["sd", "sdxl"])
def test_exported_folder_is_a_diffusers_pipeline_equal_to_onestep_sampler(make, sd_dir, sdxl_dir, prompt_file, tmp_path):
    from safetensors.torch import load_file

    from onestep.export import load_student
    from onestep.samplers.student import sample_student_from_seeds
    from onestep.trainers import make_trainer

    folder = sd_dir if make == "sd" else sdxl_dir
    config = tiny_config("dmd2", tmp_path, folder, prompts=str(prompt_file), generator_timesteps=[999], batch_size=2, max_steps=2)
    out = make_trainer(config).train()
    for part in ("vae", "text_encoder", "tokenizer", "scheduler", "unet") + (("text_encoder_2", "tokenizer_2") if make == "sdxl" else ()):
        assert (out / part).is_dir(), part
    assert not list(out.rglob("*.bin"))
    single = load_file(str(out / "student_unet.safetensors"))
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert (out / "student_unet.safetensors").stat().st_ino == weights.stat().st_ino  # one file on disk, two names
    student = load_student(out)
    assert set(single) == set(student.generator.backbone.state_dict())

    prompts, seeds = ["a red cube", "something never seen in training"], [11, 12]
    x, _ = sample_student_from_seeds(student.generator, student, student.timesteps, seeds, labels=prompts)
    with torch.no_grad():
        ours = student.decode(x).clamp(-1, 1)
    pipe = _pipe(out)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    theirs = pipe(prompt=prompts, num_inference_steps=1, guidance_scale=1.0, generator=gens, output_type="pt").images * 2 - 1
    assert pipe.scheduler.timesteps.tolist() == student.timesteps == [999]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # the model card's snippet, as written, samples the folder in plain diffusers
    import re

    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(code.replace("path/to/this/folder", str(out)), scope)
    assert scope["image"].size == (16, 16)
    assert (ours - ours[0]).abs().max() > 1e-4  # different prompts and seeds, different images

    # NASA: onestep's sampler and the pipeline wrapper agree, and the negative prompt changes the image.
    from onestep.samplers import nasa_pipeline_call, sample_text_student

    steered = sample_text_student(student, prompts, seeds, negative_prompt="blurry", nasa_alpha=0.5)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    wrapped = nasa_pipeline_call(pipe, prompts, "blurry", 0.5, num_inference_steps=1, guidance_scale=1.0, generator=gens,
                                 output_type="pt").images * 2 - 1
    torch.testing.assert_close(steered, wrapped, rtol=0, atol=1e-5)
    assert (steered - ours).abs().max() > 1e-4


def test_k_step_student_scheduler_picks_its_timesteps():
    from onestep.pipeline import _lcm_original_steps, student_scheduler

    schedule = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    for ts in ([999], [999, 749, 499, 249], [800], [999, 499]):
        sched = student_scheduler({"schedule": schedule, "timesteps": ts, "prediction_type": "epsilon"})
        sched.set_timesteps(len(ts))
        assert sched.timesteps.tolist() == ts
    assert _lcm_original_steps([999, 500, 3], 1000) is None


def test_sample_cli_with_prompts(sd_dir, prompt_file, tmp_path):
    from onestep.cli import main
    from onestep.trainers import make_trainer

    config = tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file), generator_timesteps=[999], batch_size=2, max_steps=1)
    student = make_trainer(config).train()
    out = tmp_path / "samples"
    assert main(["sample", "--student", str(student), "--out", str(out), "--num-samples", "3", "--prompt", "a red cube",
                 "--negative-prompt", "blurry", "--nasa-alpha", "0.1"]) == 0
    assert len(list(out.glob("sample_*.png"))) == 3
    import numpy as np

    saved = np.load(out / "samples.npz")["samples"]
    assert saved.shape == (3, 3, 16, 16)  # decoded images, not latents
    assert main(["sample", "--student", str(student), "--out", str(out), "--class", "1"]) == 2
    with pytest.raises(OnestepError):
        from onestep.samplers.commands import sample_to_folder

        sample_to_folder(student, out, 2, prompts=None, nasa_alpha=0.5)


SD_PRESETS = ["sd15_dmd2", "sd15_vsd_pgsb", "sd15_fdistill_js", "sd15_lcm", "sd15_ctm", "sd15_boot", "sdxl_dmd2_lora", "audioldm_dmd2",
              "audioldm_lcm"]


@pytest.mark.parametrize("preset", SD_PRESETS)
def test_presets_load_and_name_the_placeholder_path(preset, tmp_path, capsys):
    from onestep.cli import main
    from onestep.trainers import load_config

    config = load_config(preset)
    assert config.teacher.startswith("/path/to/") and config.prompts.startswith("/path/to/")
    assert config.mixed_precision == "bf16" and config.gradient_checkpointing
    # (mixed_precision no: this process's accelerate state is already fp32)
    assert main(["train", preset, "--output-dir", str(tmp_path / "run"), "--mixed_precision", "'no'"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "point teacher: (or --teacher) at your local diffusers pipeline folder" in err


def test_sd15_dmd2_preset_runs_on_the_tiny_pipeline(sd_dir, prompt_file, tmp_path):
    from onestep.cli import main

    args = ["train", "sd15_dmd2", "--output-dir", str(tmp_path / "run"), "--teacher", str(sd_dir), "--prompts", str(prompt_file),
            "--resolution", "16", "--batch_size", "1", "--max_steps", "2", "--mixed_precision", "'no'", "--log_with", "none",
            "--warmup_steps", "0", "--preview_every", "0", "--checkpoint_every", "0"]
    assert main(args) == 0
    assert (tmp_path / "run" / "student" / "model_index.json").is_file()


@pytest.mark.slow
def test_two_cpu_processes_train_a_text_to_image_student(sd_dir, prompt_file, tmp_path):
    """The README's accelerate command on the tiny SD pipeline: two ranks, one exported pipeline folder."""
    from test_resume_ddp import _launch, _why

    r = _launch([
        "-m", "onestep.cli", "train", "sd15_dmd2", "--teacher", str(sd_dir), "--prompts", str(prompt_file),
        "--resolution", "16", "--batch_size", "1", "--max_steps", "2", "--mixed_precision", "'no'", "--log_with", "none",
        "--warmup_steps", "0", "--preview_every", "0", "--checkpoint_every", "0", "--output-dir", str(tmp_path / "run"),
    ])
    assert r.returncode == 0, _why(r)
    assert r.stdout.count("student written to") == 1
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint-2").glob("random_states_*.safetensors")) == [
        "random_states_0.safetensors", "random_states_1.safetensors"]
    assert (tmp_path / "run" / "student" / "model_index.json").is_file()


# ------------------------------------------------------------------ SwiftBrush v2 CLIP loss


def test_vsd_clip_loss_scores_decoded_images_against_their_prompts(sd_dir, prompt_file, tmp_path):
    from onestep.trainers import make_trainer

    clip_dir = make_tiny_clip(tmp_path / "clip")
    base = dict(prompts=str(prompt_file), generator_timesteps=[999], batch_size=3, max_steps=1, export=False,
                fake_updates_per_generator=1, lora_rank=2, clip_model=str(clip_dir), clip_tau=1.5)
    tr = make_trainer(tiny_config("vsd", tmp_path / "a", sd_dir, clip_weight=5.0, clip_decay_steps=4, **base))
    assert tr.wants_prompts
    batch = tr.make_batch()
    # the prompts are the ones the condition embeds
    torch.testing.assert_close(batch["cond"]["encoder_hidden_states"], tr.conditioning.encode(batch["prompts"])["encoder_hidden_states"])
    assert set(batch["prompts"]) <= set(PROMPTS)
    # the weight decays linearly to 0 over clip_decay_steps generator steps
    weights = []
    for step in (0, 2, 4, 6):
        tr.state.step = step
        weights.append(tr.clip_weight())
    assert weights == [5.0, 2.5, 0.0, 0.0]
    tr.state.step = 0

    tr.state.reseed()
    batch = tr.make_batch()
    loss, logs = tr.generator_loss(batch)
    # the logged CLIP term is ClampedClipLoss on the decoded sample and its prompts (tau 1.5 > any cosine: active)
    with torch.no_grad():
        expected = tr.clip_loss.prompt_loss(tr.decode(batch["x_gen"]), batch["prompts"]).item()
    assert logs["loss/clip"] == pytest.approx(expected, rel=1e-5) and expected > 0.4
    assert loss.item() == pytest.approx(logs["loss/vsd"] + 5.0 * expected, rel=1e-5)

    # and it reaches the generator: one step with the CLIP term moves it differently from one without
    plain = make_trainer(tiny_config("vsd", tmp_path / "b", sd_dir, clip_weight=0.0, **base))
    with_clip = make_trainer(tiny_config("vsd", tmp_path / "c", sd_dir, clip_weight=5.0, **base))
    for t in (plain, with_clip):
        t.train_step()
    a, b = plain.generator.backbone.state_dict(), with_clip.generator.backbone.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
