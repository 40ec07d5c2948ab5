"""SD x4 upscaler teachers (diffusers' StableDiffusionUpscalePipeline) and their TAD-SR students, on a tiny
random pipeline built from config: UNet2DConditionModel with 7 input channels and a noise-level class
embedding, a VAE with factor 4 (latents 4x8x8, images 3x32x32), a tiny CLIP text encoder with the offline
tokenizer, a DDIM v-prediction scheduler and a DDPM low_res_scheduler."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import changed, state_of, tiny_config
from t2i_fixtures import TEXT_HIDDEN, tiny_text_config, tiny_tokenizer, write_image_folder
from onestep.conditioning import CONCAT_KEY

LATENT = 8
SIDE = 4 * LATENT  # the VAE decodes 8x8 latents to 32x32 images
BETAS = dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)


@pytest.fixture(scope="module", autouse=True)
def cache_in_tmp(tmp_path_factory):
    """The VAE-latent cache of this module's runs in a tmp folder (module-wide: the trained student is module-scoped)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ONESTEP_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def make_tiny_upscaler(out, seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4,
        sample_size=SIDE, scaling_factor=0.08333,
    )
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, norm_num_groups=4, num_class_embeds=1000,
    )
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=CLIPTextModel(tiny_text_config(len(tok))), tokenizer=tok, unet=unet,
        low_res_scheduler=DDPMScheduler(**BETAS),
        scheduler=DDIMScheduler(**BETAS, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        max_noise_level=350,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory):
    return make_tiny_upscaler(tmp_path_factory.mktemp("tiny_upscaler"))


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("hr"), n=4, size=SIDE)


@pytest.fixture(scope="module")
def pipe(upscaler_dir):
    from diffusers import StableDiffusionUpscalePipeline

    p = StableDiffusionUpscalePipeline.from_pretrained(upscaler_dir)
    p.set_progress_bar_config(disable=True)
    return p


def tadsr_config(tmp_path, teacher_dir, hr, **overrides):
    values = dict(export=False, fake_score="none", fake_updates_per_generator=1, generator_timesteps=[999], guidance_scale=1.0,
                  teacher_steps=2, gan_head_channels=8, batch_size=2, real_images=str(hr), resolution=SIDE)
    return tiny_config("tadsr", tmp_path, teacher_dir, **{**values, **overrides})


def test_upscaler_folder_loads_as_an_image_conditioned_latent_teacher(upscaler_dir, hr_dir, pipe):
    from onestep.teachers import load_teacher

    t = load_teacher(upscaler_dir, real_images=str(hr_dir), noise_level=30, prompt="a photo")
    assert t.sample_shape == (4, LATENT, LATENT) and t.vae is not None and t.guidance_scale == 1.0
    c = t.conditioning
    assert c.kind == "image" and not c.upsample and c.scale == 4 and c.image_channels == 3 and c.null(2) is None
    assert t.meta["upscaler"] == {"noise_level": 30, "prompt": "a photo", "max_noise_level": 350}
    # the fixed entries: the pipeline's prompt embedding and the noise level as class labels
    emb = pipe.encode_prompt("a photo", "cpu", 1, False)[0]
    torch.testing.assert_close(c.fixed["encoder_hidden_states"], emb, rtol=0, atol=0)
    # paired data: latents of the high-res images and their 8x8 low-res copies, noised
    z, cond = t.real_data(3, torch.Generator().manual_seed(0))
    assert z.shape == (3, 4, LATENT, LATENT) and cond[CONCAT_KEY].shape == (3, 3, LATENT, LATENT)
    assert cond["class_labels"].tolist() == [30] * 3 and cond["encoder_hidden_states"].shape == (3, *emb.shape[1:])
    assert c.images.shape == (4, 3, LATENT, LATENT) and c.sample(2)[CONCAT_KEY].shape == (2, 3, LATENT, LATENT)
    # decoding latents gives 4x larger images
    assert t.decode(z[:1]).shape == (1, 3, SIDE, SIDE)
    # the noise added to the condition is the low_res_scheduler's at noise_level
    lowres, noise = c.images[:2], torch.randn(2, 3, LATENT, LATENT)
    ref = pipe.low_res_scheduler.add_noise(lowres, noise, torch.tensor([30]))
    torch.testing.assert_close(c.condition(lowres, noise)[CONCAT_KEY], ref, rtol=0, atol=0)
    assert load_teacher(upscaler_dir).real_data is None  # no real_images: no paired data


def test_teacher_denoiser_is_the_pipeline_unet_call(upscaler_dir, pipe):
    from onestep.teachers import load_teacher

    t = load_teacher(upscaler_dir)
    torch.manual_seed(1)
    lowres, noise = torch.rand(2, 3, LATENT, LATENT) * 2 - 1, torch.randn(2, 3, LATENT, LATENT)
    x, tt = torch.randn(2, 4, LATENT, LATENT), torch.tensor([700, 700])
    cond = t.conditioning.condition(lowres, noise)
    with torch.no_grad():
        # as StableDiffusionUpscalePipeline.__call__ runs it (steps 4, 5 and 9)
        image = pipe.low_res_scheduler.add_noise(lowres, noise, torch.tensor([20], dtype=torch.long))
        emb = pipe.encode_prompt("", "cpu", 1, False)[0].expand(2, -1, -1)
        latent_in = torch.cat([pipe.scheduler.scale_model_input(x, tt[0]), image], dim=1)
        v = pipe.unet(latent_in, tt[0], encoder_hidden_states=emb, class_labels=torch.tensor([20, 20]), return_dict=False)[0]
        abar = pipe.scheduler.alphas_cumprod[700]
        x0_ref = abar.sqrt() * x - (1 - abar).sqrt() * v  # v-prediction
        x0 = t.denoiser()(x, tt, cond)
        raw = t.denoiser().backbone(torch.cat([x, cond[CONCAT_KEY]], 1), tt, encoder_hidden_states=cond["encoder_hidden_states"],
                                    class_labels=cond["class_labels"]).sample
    torch.testing.assert_close(raw, v, rtol=0, atol=0)
    torch.testing.assert_close(x0, x0_ref, rtol=0, atol=1e-6)


def test_tadsr_trains_the_generator_not_the_teacher(tmp_path, upscaler_dir, hr_dir):
    from onestep.trainers import make_trainer

    tr = make_trainer(tadsr_config(tmp_path, upscaler_dir, hr_dir, noise_level=25))
    assert tr.conditioning.noise_level == 25 and tr.teacher_spec.sample_shape == (4, LATENT, LATENT)
    teacher0 = {k: v.clone() for k, v in tr.triad.teacher_parameters().items()}
    gen0, head0 = state_of(tr.generator), state_of(tr.heads)
    for _ in range(2):
        logs = tr.train_step()
        assert all(np.isfinite(float(v)) for v in logs.values()), logs
    assert {"loss/reg", "loss/hfsd", "loss/adv_g", "loss/adv_d"} <= set(logs)
    assert changed(gen0, tr.generator) > 0 and changed(head0, tr.heads) > 0
    for k, v in tr.triad.teacher_parameters().items():
        assert torch.equal(v, teacher0[k]), k


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, upscaler_dir, hr_dir):
    """A student trained for one step through `onestep train` with the preset, the paths overridden."""
    from onestep.cli import main

    run = tmp_path_factory.mktemp("upscaler_run")
    args = ["train", "sd_x4_upscaler_tadsr", "--output-dir", str(run), "--teacher", str(upscaler_dir), "--real_images", str(hr_dir),
            "--resolution", str(SIDE), "--batch_size", "1", "--max_steps", "1", "--mixed_precision", "'no'", "--log_with", "none",
            "--warmup_steps", "0", "--checkpoint_every", "0", "--teacher_steps", "1", "--gan_head_channels", "8", "--noise_level", "30",
            "--prompt", "a photo"]
    assert main(args) == 0
    return run / "student"


def test_student_folder_is_an_upscale_pipeline_matching_onestep(student_dir, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionUpscalePipeline

    from onestep.export import load_student
    from onestep.samplers.student import sample_upscaler_student

    meta = json.loads((student_dir / "onestep.json").read_text())
    assert meta["generator_subfolder"] == "unet" and meta["timesteps"] == [999]
    assert meta["upscaler"]["noise_level"] == 30 and meta["upscaler"]["prompt"] == "a photo"
    index = json.loads((student_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == 350
    pipe = StableDiffusionUpscalePipeline.from_pretrained(student_dir)  # plain diffusers, no onestep
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    student = load_student(student_dir)
    assert student.conditioning.noise_level == 30 and student.sample_shape == (4, LATENT, LATENT)
    torch.manual_seed(2)
    img01 = torch.rand(2, 3, LATENT, LATENT)  # the pipeline takes [0, 1] tensors (and normalises them)
    seeds = [5, 6]
    call = dict(prompt=["a photo", "a photo"], image=img01, num_inference_steps=1, guidance_scale=1.0, noise_level=30)
    with torch.no_grad():
        ref = pipe(**call, output_type="latent", generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        ours = sample_upscaler_student(student, img01 * 2 - 1, seeds, decode=False)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        pixels = pipe(**call, output_type="pt", generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        decoded = sample_upscaler_student(student, img01 * 2 - 1, seeds)
    assert decoded.shape == (2, 3, SIDE, SIDE)
    torch.testing.assert_close(decoded / 2 + 0.5, pixels, rtol=1e-4, atol=1e-4)
    assert pipe.scheduler.timesteps.tolist() == student.timesteps == [999]

    # the model card's snippet, as written, upscales in plain diffusers
    import re

    from PIL import Image

    code = re.search(r"```python\n(.*?)```", (student_dir / "README.md").read_text(), re.S).group(1)
    assert "noise_level=30" in code and "guidance_scale=1.0" in code and "prompt='a photo'" in code
    scope: dict = {"low_res_image": Image.new("RGB", (LATENT, LATENT), (90, 30, 200))}
    exec(code.replace("path/to/this/folder", str(student_dir)), scope)
    assert scope["image"].size == (SIDE, SIDE)

    # onestep sample --image: the same images, decoded, one PNG each
    from onestep.cli import main

    lowres = tmp_path / "lowres"
    lowres.mkdir()
    for i in range(2):
        Image.fromarray((img01[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(lowres / f"{i}.png")
    out = tmp_path / "sr"
    assert main(["sample", "--student", str(student_dir), "--out", str(out), "--num-samples", "3", "--image", str(lowres)]) == 0
    saved = np.load(out / "samples.npz")
    assert saved["samples"].shape == (3, 3, SIDE, SIDE) and saved["labels"].tolist() == [0, 1, 0]
    assert Image.open(out / "sample_00000.png").size == (SIDE, SIDE)
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.zeros((SIDE, SIDE, 3), dtype=np.uint8)).save(big / "0.png")
    assert main(["sample", "--student", str(student_dir), "--out", str(tmp_path / "bad"), "--image", str(big)]) == 2


def test_eval_sr_scores_an_upscaler_student_on_high_res_images(student_dir, hr_dir, tmp_path):
    from onestep.cli import main
    from onestep.eval.sr import ground_truth, psnr
    from onestep.export import load_student
    from onestep.samplers.student import sample_upscaler_student

    assert main(["eval", "sr", "--student", str(student_dir), "--images", str(hr_dir), "--num-samples", "2", "--out", str(tmp_path / "ev")]) == 0
    rec = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    student = load_student(student_dir)
    hr, _ = ground_truth(student, str(hr_dir), 2)
    assert hr.shape == (2, 3, SIDE, SIDE) and rec["num_samples"] == 2 and rec["metrics"]["perceptual_error"] is None  # RGB: no digits features
    lowres = student.conditioning.degrade(hr)  # the upscaler teacher's own degradation (bicubic, a quarter the size)
    assert lowres.shape == (2, 3, LATENT, LATENT)
    assert rec["metrics"]["psnr"] == pytest.approx(psnr(sample_upscaler_student(student, lowres, [0, 1]), hr), abs=1e-4)
    assert main(["eval", "sr", "--student", str(student_dir), "--out", str(tmp_path / "ev2")]) == 2  # no built-in ground truth


def test_bad_upscaler_input_gives_clear_errors(tmp_path, upscaler_dir, hr_dir, capsys):
    from onestep.cli import main
    from onestep.errors import ConfigError, TeacherError
    from onestep.teachers import load_teacher
    from onestep.trainers import make_trainer

    broken = tmp_path / "no_low_res"
    shutil.copytree(upscaler_dir, broken)
    shutil.rmtree(broken / "low_res_scheduler")
    with pytest.raises(TeacherError, match="low_res_scheduler"):
        load_teacher(broken)
    # a VAE config with another scaling factor: 0.08333, as the pipeline sets it
    odd = tmp_path / "odd_vae"
    shutil.copytree(upscaler_dir, odd)
    vae_cfg = json.loads((odd / "vae" / "config.json").read_text())
    (odd / "vae" / "config.json").write_text(json.dumps({**vae_cfg, "scaling_factor": 0.18215}))
    assert load_teacher(odd).vae.vae.config.scaling_factor == 0.08333
    with pytest.raises(ConfigError, match=r"noise_level must be an integer in \[0, 350\]"):
        load_teacher(upscaler_dir, noise_level=400)
    # the upscaler's own options, refused for any other teacher (built-in or folder) instead of ignored
    with pytest.raises(TeacherError, match="noise_level, prompt: options of SD x4 upscaler teachers; digits-sr is not one"):
        load_teacher("digits-sr", prompt="a photo", noise_level=30)
    with pytest.raises(TeacherError, match="noise_level: options of SD x4 upscaler teachers"):
        make_trainer(tadsr_config(tmp_path / "b", "digits-sr", None, real_images=None, resolution=None, noise_level=30))
    with pytest.raises(ConfigError, match="real_images"):  # TAD-SR needs paired data
        make_trainer(tadsr_config(tmp_path / "a", upscaler_dir, hr_dir, real_images=None))
    with pytest.raises(ConfigError, match="no images"):
        load_teacher(upscaler_dir, real_images=str(tmp_path))
    # the preset without its paths: one line on stderr naming the fix
    assert main(["train", "sd_x4_upscaler_tadsr", "--output-dir", str(tmp_path / "run"), "--mixed_precision", "'no'"]) == 2
    assert "point teacher: (or --teacher) at your local diffusers pipeline folder" in capsys.readouterr().err
