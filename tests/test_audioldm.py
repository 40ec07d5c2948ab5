"""Text-to-audio teachers in diffusers' ``AudioLDMPipeline`` layout (CLAP text embedding as ``class_labels``,
latents of mel spectrograms, a HiFi-GAN vocoder), on a tiny random pipeline built from config: loading as the
pipeline runs it, distillation, and a student folder that plain diffusers samples to the same sound."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import tiny_config
from t2i_fixtures import AUDIO_MELS, PROMPTS, make_tiny_audioldm, make_tiny_sd, write_prompts

from onestep.errors import ConfigError, TeacherError
from onestep.teachers import load_teacher


@pytest.fixture(scope="module")
def audioldm_dir(tmp_path_factory):
    return make_tiny_audioldm(tmp_path_factory.mktemp("audioldm") / "pipe")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("audioldm_prompts") / "prompts.txt")


@pytest.fixture(scope="module")
def pipe(audioldm_dir):
    from diffusers import AudioLDMPipeline

    p = AudioLDMPipeline.from_pretrained(audioldm_dir, use_safetensors=True)
    p.set_progress_bar_config(disable=True)
    return p


def test_audioldm_teacher_conditions_denoises_and_decodes_as_the_pipeline(audioldm_dir, prompts, pipe):
    from onestep.teachers.audioldm import MEL_RANGE, MelVAE

    teacher = load_teacher(audioldm_dir, prompts=str(prompts))
    assert teacher.sample_shape == (4, 8, AUDIO_MELS // 2) and teacher.conditioning.kind == "text"
    assert teacher.guidance_scale == 2.5 and teacher.meta["modality"] == "audio"
    assert teacher.meta["audio"] == {"vocoder": "SpeechT5HifiGan", "sample_rate": 8000, "num_samples": 256, "audio_length_in_s": 0.032,
                                     "frames": 16, "mel_bins": AUDIO_MELS}
    # the condition is the pipeline's: CLAP's text_embeds, normalised; the empty prompt is guidance's other branch
    cond = teacher.conditioning.from_labels(PROMPTS[:2])
    with torch.no_grad():
        theirs = pipe._encode_prompt(PROMPTS[:2], "cpu", 1, False)
        empty = pipe._encode_prompt(["x"], "cpu", 1, True)[:1]  # (negative first)
    assert set(cond) == {"class_labels"}
    torch.testing.assert_close(cond["class_labels"], theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(teacher.conditioning.null(1)["class_labels"], empty, rtol=0, atol=1e-5)
    assert not torch.allclose(cond["class_labels"][0], cond["class_labels"][1])
    # the denoiser calls the UNet as the pipeline does (class_labels, no attention context)
    z = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    with torch.no_grad():
        eps = pipe.unet(z, t, encoder_hidden_states=None, class_labels=theirs).sample
        x0 = teacher.denoiser()(z, t, cond)
    a, s = (v.view(-1, 1, 1, 1) for v in teacher.schedule.alpha_sigma(t))
    torch.testing.assert_close(x0, (z - s * eps) / a, rtol=1e-5, atol=1e-5)
    # pictures of the spectrograms (mel bins as rows, low at the bottom) that give back the pipeline's sound
    assert isinstance(teacher.vae, MelVAE)
    with torch.no_grad():
        mel = pipe.decode_latents(z)
        picture = teacher.vae.decode(z)
        sound = pipe.mel_spectrogram_to_waveform(mel)
    assert mel.shape == (2, 1, 16, AUDIO_MELS) and picture.shape == (2, 1, AUDIO_MELS, 16)
    lo, hi = MEL_RANGE
    torch.testing.assert_close(picture[:, 0, -1, :], 2 * (mel[:, 0, :, 0] - lo) / (hi - lo) - 1)  # the lowest band, bottom row
    torch.testing.assert_close(teacher.vae.waveform(picture), sound, rtol=0, atol=1e-5)


def test_audio_length_and_options_that_do_not_fit_are_refused(audioldm_dir, prompts, tmp_path):
    longer = load_teacher(audioldm_dir, prompts=str(prompts), audio_length_in_s=0.05)
    # 0.05 s is 25 frames of 16 samples at 8 kHz, rounded up to 26 (the VAE's factor 2); the sound is cut to 400 samples
    assert longer.sample_shape == (4, 13, AUDIO_MELS // 2)
    assert (longer.meta["audio"]["frames"], longer.meta["audio"]["num_samples"]) == (26, 400)
    with torch.no_grad():
        assert longer.vae.waveform(longer.vae.decode(torch.zeros(1, 4, 13, 8))).shape == (1, 400)
    with pytest.raises(ConfigError, match="audio_length_in_s must be a number of seconds > 0"):
        load_teacher(audioldm_dir, prompts=str(prompts), audio_length_in_s="long")
    with pytest.raises(ConfigError, match="set its clips' length with audio_length_in_s"):
        load_teacher(audioldm_dir, prompts=str(prompts), resolution=64)
    with pytest.raises(ConfigError, match="real_images are images, not sounds"):
        load_teacher(audioldm_dir, prompts=str(prompts), real_images=str(tmp_path))
    with pytest.raises(TeacherError, match="num_frames: an option of text-to-video teachers"):
        load_teacher(audioldm_dir, prompts=str(prompts), num_frames=4)
    with pytest.raises(TeacherError, match="audio_length_in_s: an option of text-to-audio"):
        load_teacher(make_tiny_sd(tmp_path / "sd"), prompts=str(prompts), audio_length_in_s=1.0)
    with pytest.raises(TeacherError, match="audio_length_in_s: an option of text-to-audio .*digits is not one"):
        load_teacher("digits", audio_length_in_s=1.0)
    with pytest.raises(ConfigError, match="audio_length_in_s must be > 0"):
        tiny_config("dmd2", tmp_path, audioldm_dir, audio_length_in_s=-1.0)


def test_dmd2_student_of_an_audioldm_teacher_is_a_pipeline_folder_plain_diffusers_samples(audioldm_dir, prompts, pipe, tmp_path):
    from diffusers import DiffusionPipeline

    from onestep.audio import read_wav
    from onestep.cli import main
    from onestep.export import load_student
    from onestep.samplers.student import sample_text_student
    from onestep.trainers import make_trainer

    config = tiny_config("dmd2", tmp_path, audioldm_dir, prompts=str(prompts), generator_timesteps=[999], batch_size=2, max_steps=2)
    trainer = make_trainer(config)
    g0 = {k: v.clone() for k, v in trainer.generator.backbone.state_dict().items()}
    f0 = {k: v.clone() for k, v in trainer.fake.backbone.state_dict().items()}
    t0 = {k: v.clone() for k, v in trainer.teacher.backbone.state_dict().items()}
    out = trainer.train()
    assert any(not torch.equal(g0[k], v) for k, v in trainer.generator.backbone.state_dict().items())
    assert any(not torch.equal(f0[k], v) for k, v in trainer.fake.backbone.state_dict().items())
    assert all(torch.equal(t0[k], v) for k, v in trainer.teacher.backbone.state_dict().items())
    for part in ("vae", "text_encoder", "tokenizer", "scheduler", "unet", "vocoder"):
        assert (out / part).is_dir(), part
    student = load_student(out)
    assert student.meta["audio"]["num_samples"] == 256 and student.sample_shape == (4, 8, 8)

    texts, seeds = ["a red cube", "a dog barking in the rain"], [5, 6]
    pictures = sample_text_student(student, texts, seeds)
    ours = student.vae.waveform(pictures)
    plain = DiffusionPipeline.from_pretrained(out, use_safetensors=True)
    assert type(plain).__name__ == "AudioLDMPipeline" and type(plain.scheduler).__name__ == "LCMScheduler"
    plain.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    theirs = plain(prompt=texts, num_inference_steps=1, guidance_scale=1.0, generator=gens, output_type="pt").audios
    assert plain.scheduler.timesteps.tolist() == student.timesteps == [999]
    assert ours.shape == theirs.shape == (2, 256)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # the model card's snippet samples the folder in plain diffusers
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(code.replace("path/to/this/folder", str(out)), scope)
    assert scope["audio"].shape == (256,)
    # onestep sample: spectrogram pictures and one WAV a sample, the vocoder's sound at its rate
    assert main(["sample", "--student", str(out), "--prompt", texts[0], "--prompt", texts[1], "--seed", "5",
                 "--num-samples", "2", "--out", str(tmp_path / "s")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "s" / "samples.npz")["samples"], pictures.numpy(), atol=1e-6)
    wave, rate = read_wav(tmp_path / "s" / "sample_00001.wav")
    assert rate == 8000 and wave.shape == (256,)
    expected = ours[1].numpy() * 0.9 / np.abs(ours[1].numpy()).max()  # write_wav's peak level
    np.testing.assert_allclose(wave, expected, atol=2 / 32767)
    # the demo: spectrogram pictures, and the first one's sound through the student's vocoder
    from onestep.demo.model import DemoModel, DemoRequest

    demo = DemoModel(student)
    result = demo.run(DemoRequest(prompt=texts[1], seed=6, num_images=1))
    torch.testing.assert_close(result.student_samples, pictures[1:], rtol=0, atol=1e-6)
    rate, played = demo.sound_of(result.student_samples)
    assert rate == 8000 and "text-to-audio" in demo.describe()
    np.testing.assert_allclose(played / 32767, expected, atol=2 / 32767)
    # the CLIP score is for images
    assert main(["eval", "clip", "--student", str(out), "--prompts", str(prompts), "--clip-model", str(tmp_path)]) == 2
    # NASA acts on cross-attention to the prompt, which this UNet has not
    assert main(["sample", "--student", str(out), "--prompt", "a", "--negative-prompt", "noise", "--nasa-alpha", "0.1",
                 "--out", str(tmp_path / "n")]) == 2


def test_a_musicldm_folder_is_a_teacher_and_its_student_a_musicldm_pipeline(prompts, tmp_path):
    """MusicLDMPipeline: a whole ClapModel as text encoder (its get_text_features), guidance 2.0, and CLAP's feature
    extractor, which the student folder keeps. (diffusers' deprecated pipeline reads get_text_features as a tensor,
    as transformers 4 returned it; under transformers 5 it is handed that tensor here.)"""
    from diffusers import DiffusionPipeline, MusicLDMPipeline

    from onestep.clip import pooled_embeds
    from onestep.export import load_student
    from onestep.samplers.student import sample_text_student
    from onestep.trainers import make_trainer

    def as_in_transformers_4(pipe):
        features = pipe.text_encoder.get_text_features
        pipe.text_encoder.get_text_features = lambda *a, **k: pooled_embeds(features(*a, **k))
        return pipe

    folder = make_tiny_audioldm(tmp_path / "musicldm", music=True)
    pipe = as_in_transformers_4(MusicLDMPipeline.from_pretrained(folder, use_safetensors=True))
    teacher = load_teacher(folder, prompts=str(prompts))
    assert teacher.guidance_scale == 2.0 and teacher.meta["pipeline"] == "MusicLDMPipeline"
    cond = teacher.conditioning.from_labels(PROMPTS[:2])["class_labels"]
    with torch.no_grad():
        theirs = pipe._encode_prompt(PROMPTS[:2], "cpu", 1, False)
    torch.testing.assert_close(cond, theirs, rtol=0, atol=1e-6)
    assert not torch.allclose(cond[0], cond[1])

    out = make_trainer(tiny_config("dmd2", tmp_path, folder, prompts=str(prompts), generator_timesteps=[999], batch_size=2,
                                   max_steps=1)).train()
    assert (out / "feature_extractor" / "preprocessor_config.json").is_file() and (out / "vocoder").is_dir()
    student = load_student(out)
    texts, seeds = ["a red cube", "a dog barking in the rain"], [3, 4]
    ours = student.vae.waveform(sample_text_student(student, texts, seeds))
    plain = as_in_transformers_4(DiffusionPipeline.from_pretrained(out, use_safetensors=True))
    assert type(plain).__name__ == "MusicLDMPipeline" and type(plain.text_encoder).__name__ == "ClapModel"
    plain.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    theirs = plain(prompt=texts, num_inference_steps=1, guidance_scale=1.0, generator=gens, output_type="pt").audios
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("frozen_dtype", ["float32", "bf16"])
def test_the_memory_plan_counts_the_vocoder_with_the_vae(audioldm_dir, prompts, tmp_path, frozen_dtype):
    from onestep.trainers import make_trainer
    from onestep.trainers.plan import memory_plan

    config = tiny_config("dmd2", tmp_path, audioldm_dir, prompts=str(prompts), frozen_dtype=frozen_dtype, frozen_compute="storage",
                         export=False)
    rows, _ = memory_plan(config)
    row = next(r for r in rows if r.role.startswith("VAE"))
    vae = make_trainer(config).teacher_spec.vae
    assert row.role == "VAE + vocoder" and any(True for _ in vae.vocoder.parameters())
    assert row.bytes == sum(p.numel() * p.element_size() for p in vae.parameters())


def write_tone_folder(folder, freqs=(300.0, 1000.0, 2500.0), rate=8000, seconds=0.032):
    """Captioned WAV files of pure tones (``metadata.jsonl``) at the tiny vocoder's rate."""
    import json

    from onestep.audio import write_wav

    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    lines = []
    for i, f in enumerate(freqs):
        write_wav(folder / f"tone_{i}.wav", np.sin(2 * np.pi * f * t), sample_rate=rate)
        lines.append(json.dumps({"file_name": f"tone_{i}.wav", "text": f"a pure tone at {f:g} hertz"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_slaney_filterbank_and_the_mel_of_a_tone_peak_where_the_tone_is(tmp_path):
    from onestep.teachers.audioldm import load_mel, slaney_mel_filterbank

    fb = slaney_mel_filterbank(64, 1024, 16000)
    freqs = np.linspace(0, 8000, 513)
    assert fb.shape == (64, 513) and (fb >= 0).all()
    centres = freqs[fb.argmax(1).numpy()]
    assert np.all(np.diff(centres) >= 0) and np.allclose(np.diff(centres[:10]), np.diff(centres[:10]).mean(), atol=16)  # linear below 1 kHz
    area = (fb.sum(1) * (freqs[1] - freqs[0])).numpy()
    np.testing.assert_allclose(area[8:], 1.0, rtol=0.05)  # Slaney's normalisation: unit area (wide enough triangles)
    folder = write_tone_folder(tmp_path / "tones", freqs=(1000.0,), rate=16000, seconds=0.5)
    mel = load_mel(folder / "tone_0.wav", frames=64, sample_rate=16000, hop=160, n_fft=1024, n_mels=64)  # 0.5 s are 50 frames
    assert mel.shape == (1, 64, 64)
    peak = mel[0, 10:40].mean(0).argmax().item()
    assert abs(centres[peak] - 1000) < 80 and mel[0, 10:40, peak].min() > -3
    assert mel[0, 54:].max() < np.log(1e-5) + 1e-3  # the silence it is padded with (windows past the tone's end)
    with pytest.raises(ConfigError, match="22050 Hz, but the teacher's vocoder runs at 16000 Hz"):
        from onestep.audio import write_wav

        load_mel(write_wav(tmp_path / "x.wav", np.zeros(100), sample_rate=22050), 4, 16000, 160, 1024, 64)


def test_real_audio_gives_consistency_distillation_its_data(audioldm_dir, prompts, tmp_path, monkeypatch):
    from onestep.export import load_student
    from onestep.teachers.audioldm import load_mel, mel_settings
    from onestep.trainers import make_trainer

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    folder = write_tone_folder(tmp_path / "tones")
    teacher = load_teacher(audioldm_dir, prompts=str(prompts), real_audio=str(folder))
    latents, cond = teacher.real_data(64, torch.Generator().manual_seed(0))
    assert latents.shape == (64, *teacher.sample_shape) and cond["class_labels"].shape == (64, 8)
    settings = mel_settings(teacher.vae.vocoder.config)
    assert settings == {"sample_rate": 8000, "hop": 16, "n_fft": 128, "n_mels": AUDIO_MELS}
    mels = torch.stack([load_mel(folder / f"tone_{i}.wav", 16, **settings) for i in range(3)])
    expected = teacher.vae.encode(mels)
    captions = teacher.conditioning.from_labels([f"a pure tone at {f:g} hertz" for f in (300, 1000, 2500)])["class_labels"]
    for z, c in zip(latents, cond["class_labels"]):  # every draw is one of the three files, with its own caption
        i = int(torch.cdist(z.flatten()[None], expected.flatten(1)).argmin())
        torch.testing.assert_close(z, expected[i], rtol=0, atol=1e-5)
        torch.testing.assert_close(c, captions[i], rtol=0, atol=1e-5)
    with pytest.raises(TeacherError, match="real_audio: an option of text-to-audio"):
        load_teacher("digits", real_audio=str(folder))
    with pytest.raises(ConfigError, match="consistency distillation noises real samples.*an AudioLDM one real_audio"):
        make_trainer(tiny_config("consistency", tmp_path, audioldm_dir, prompts=str(prompts)))
    with pytest.raises(ConfigError, match="AudioLDMPipeline passes none"):
        make_trainer(tiny_config("consistency", tmp_path, audioldm_dir, prompts=str(prompts), real_audio=str(folder),
                                 guidance_scale_range=[2.0, 4.0]))


def test_audioldm_lcm_preset_gives_a_two_step_student_plain_diffusers_samples(audioldm_dir, prompts, pipe, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    from onestep.cli import main
    from onestep.export import load_student
    from onestep.samplers.student import sample_text_student

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    folder = write_tone_folder(tmp_path / "tones")
    out = tmp_path / "run"
    assert main(["train", "audioldm_lcm", "--teacher", str(audioldm_dir), "--prompts", str(prompts), "--real_audio", str(folder),
                 "--audio_length_in_s", "0.032", "--batch_size", "2", "--max_steps", "2", "--mixed_precision", "'no'", "--log_with", "none",
                 "--preview_every", "0", "--checkpoint_every", "0", "--output-dir", str(out)]) == 0
    student = load_student(out / "student")
    assert len(student.timesteps) == 2 and (out / "student" / "vocoder").is_dir()
    texts, seeds = ["a pure tone at 1000 hertz", "a siren"], [3, 4]
    ours = student.vae.waveform(sample_text_student(student, texts, seeds))
    plain = DiffusionPipeline.from_pretrained(out / "student", use_safetensors=True)
    plain.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    theirs = plain(prompt=texts, num_inference_steps=2, guidance_scale=1.0, generator=gens, output_type="pt").audios
    assert plain.scheduler.timesteps.tolist() == student.timesteps
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
