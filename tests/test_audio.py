"""Audio (issue 18): the synthetic sounds, their mel spectrograms and vocoder, WAV files, the built-in
``sounds`` teacher, consistency distillation of it, and ``onestep sample`` writing WAVs."""

import math
import wave

import numpy as np
import pytest
import torch

from conftest import changed, state_of
from onestep import audio as A


def _active_frames(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|STFT| frames of a sound and the indices of the frames that hold sound (not silence)."""
    mag = A.stft_magnitude(torch.from_numpy(w)[None])[0].numpy()  # (freqs, frames)
    energy = mag.sum(0)
    return mag, np.flatnonzero(energy > 0.2 * energy.max())


def test_sound_classes_are_distinct():
    rng = np.random.default_rng(123)
    freqs = np.fft.rfftfreq(A.N_FFT, 1 / A.SAMPLE_RATE)
    for _ in range(8):
        low, high = A.synth_sound(0, rng), A.synth_sound(1, rng)
        assert 240 <= A.dominant_frequency(low) <= 460 and 1390 <= A.dominant_frequency(high) <= 2010
        for label, rising in ((2, True), (3, False)):  # chirps: the pitch moves up (down) from first to last frame
            mag, act = _active_frames(A.synth_sound(label, rng))
            first, last = freqs[mag[:, act[1]].argmax()], freqs[mag[:, act[-2]].argmax()]
            assert (last > 2 * first) if rising else (first > 2 * last)
        noise = A.synth_sound(4, rng)  # broadband: far flatter spectrum than a tone
        flat = lambda w: np.exp(np.log(np.abs(np.fft.rfft(w)) ** 2 + 1e-12).mean()) / (np.abs(np.fft.rfft(w)) ** 2).mean()  # noqa: E731
        assert flat(noise) > 100 * flat(low) and 1500 < A.spectral_centroid(noise) < 2500
        mag, act = _active_frames(A.synth_sound(5, rng))  # two beeps a fifth apart
        f1, f2 = freqs[mag[:, act[1]].argmax()], freqs[mag[:, act[-2]].argmax()]
        assert 580 <= f1 <= 820 and abs(f2 / f1 - 1.5) < 0.1
    with pytest.raises(ValueError, match="sound class"):
        A.synth_sound(6, rng)


def test_dataset_is_deterministic_shaped_and_normalised():
    x, y = A.sounds_dataset("test")
    assert x.shape == (600, 1, A.N_MELS, A.FRAMES) == (600, 1, 32, 16) and y.tolist()[:7] == [0, 1, 2, 3, 4, 5, 0]
    assert x.min() >= -1 and x.max() <= 1 and (x == -1).float().mean() > 0.3  # silence sits at -1
    w, _ = A.sounds_waveforms(2, seed=1)
    torch.testing.assert_close(A.mel_spectrogram(w), x[:12], rtol=0, atol=0)
    # mean low-frequency energy: the low tone sits lower in the mel rows than the high tone
    rows = torch.arange(A.N_MELS, dtype=torch.float32)
    centre = [float(((x[y == c, 0] + 1).mean((0, 2)) * rows).sum() / (x[y == c, 0] + 1).mean((0, 2)).sum()) for c in range(6)]
    assert centre[0] + 8 < centre[1]


@pytest.mark.parametrize("freq", [440.0, 1500.0])
def test_mel_round_trip_recovers_a_tone(freq):
    t = np.arange(A.NUM_SAMPLES) / A.SAMPLE_RATE
    tone = (0.7 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    mel = A.mel_spectrogram(tone)
    assert mel.shape == (1, 1, 32, 16)
    assert abs(A.mel_centers()[int(mel[0, 0].mean(1).argmax())] - freq) < 0.12 * freq  # the brightest band holds the tone
    back = A.mel_to_waveform(mel)
    assert back.shape == (1, A.NUM_SAMPLES)
    centers = A.mel_centers()
    half_band = np.diff(centers)[np.searchsorted(centers, freq) - 1] / 2  # 32 bands: ~31 Hz at 440 Hz, ~60 Hz at 1500 Hz
    assert abs(A.dominant_frequency(back[0]) - freq) < half_band
    assert (A.mel_spectrogram(back) - mel).abs().mean() < 0.2  # the vocoded sound has nearly the same mels (0.10 and 0.14)


def test_wav_written_and_reread_with_wave(tmp_path):
    w = A.sounds_waveforms(1, seed=3)[0][1]
    path = A.write_wav(tmp_path / "x.wav", w)
    with wave.open(str(path), "rb") as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth(), f.getnframes()) == (8000, 1, 2, A.NUM_SAMPLES)
    back, rate = A.read_wav(path)
    assert rate == 8000 and back.shape == (A.NUM_SAMPLES,) and abs(np.abs(back).max() - 0.9) < 1e-3
    np.testing.assert_allclose(back, 0.9 * w.numpy() / np.abs(w.numpy()).max(), atol=1e-4)
    with pytest.raises(Exception, match="differ from the built-in vocoder"):
        A.write_sounds(torch.zeros(1, 1, 32, 16), tmp_path, audio={**A.AUDIO_META, "sample_rate": 16000})


def test_sounds_teacher_loads_with_shape_conditioning_and_data():
    from onestep.teachers import load_teacher

    teacher = load_teacher("sounds")
    assert teacher.sample_shape == (1, 32, 16) and teacher.conditioning.kind == "class"
    assert teacher.conditioning.num_classes == 6 and teacher.conditioning.null_class == 6
    assert teacher.meta["modality"] == "audio" and teacher.meta["audio"]["sample_rate"] == 8000
    assert A.audio_meta_of(teacher.meta) == teacher.meta["audio"]
    assert sum(p.numel() for p in teacher.backbone.parameters()) * 4 < 4e6  # < 4 MB of float32
    x0, y = teacher.real_data(4, torch.Generator().manual_seed(0))
    assert x0.shape == (4, 1, 32, 16) and y.shape == (4,)
    den = teacher.denoiser()
    x = torch.randn(2, 1, 32, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    with torch.no_grad():
        a, b = den(x, t, torch.tensor([0, 0])), den(x, t, torch.tensor([1, 1]))
    assert a.shape == (2, 1, 32, 16) and (a - b).abs().mean() > 1e-3  # the class changes the prediction


@pytest.fixture(scope="module")
def lcm_run(tmp_path_factory):
    from onestep.trainers import load_config, make_trainer

    out = tmp_path_factory.mktemp("sounds_lcm")
    cfg = load_config("sounds_lcm", {"max_steps": 2, "batch_size": 2, "log_with": "none", "checkpoint_every": 0,
                                     "preview_every": 0, "overwrite": True}, output_dir=str(out / "run"))
    tr = make_trainer(cfg)
    teacher0, student0 = state_of(tr.teacher.backbone), state_of(tr.generator.backbone)
    student_dir = tr.train()
    return tr, teacher0, student0, student_dir


def test_consistency_steps_train_the_generator_not_the_teacher(lcm_run):
    tr, teacher0, student0, _ = lcm_run
    assert tr.teacher_spec.name == "sounds"
    assert changed(teacher0, tr.teacher.backbone) == 0
    assert changed(student0, tr.generator.backbone) > 0


def test_onestep_sample_of_an_audio_student_writes_wavs(capsys, lcm_run, tmp_path):
    from onestep.cli import main

    out = tmp_path / "samples"
    code = main(["sample", "--student", str(lcm_run[3]), "--num-samples", "3", "--out", str(out), "--steps", "1"])
    assert code == 0, capsys.readouterr().err
    data = np.load(out / "samples.npz")
    assert data["samples"].shape == (3, 1, 32, 16) and list(data["labels"]) == [0, 1, 2]
    wavs = sorted(out.glob("sample_*.wav"))
    assert [p.name for p in wavs] == ["sample_00000.wav", "sample_00001.wav", "sample_00002.wav"]
    with wave.open(str(wavs[0]), "rb") as f:
        assert f.getframerate() == 8000 and f.getnframes() == A.NUM_SAMPLES
    assert (out / "grid.png").exists() and len(list(out.glob("sample_*.png"))) == 3
    assert math.isfinite(float(np.abs(data["samples"]).max()))


def test_demo_plays_the_first_sample_of_an_audio_student(lcm_run):
    gr = pytest.importorskip("gradio")
    from onestep.demo.app import build_app
    from onestep.demo.model import DemoModel, DemoRequest
    from onestep.export import load_student

    model = DemoModel(load_student(lcm_run[3]), device="cpu")
    assert model.audio == A.AUDIO_META
    result = model.run_student(DemoRequest(label=3, seed=7, steps=1, num_images=2, with_teacher=False))
    rate, w = model.sound_of(result.student_samples)
    assert rate == 8000 and w.dtype == np.int16 and w.shape == (A.NUM_SAMPLES,)
    assert abs(int(np.abs(w).max()) - round(0.9 * 32767)) <= 1  # normalised like write_wav
    expected = A.mel_to_waveform(result.student_samples[:1])[0].numpy()
    np.testing.assert_allclose(w / 32767, 0.9 * expected / np.abs(expected).max(), atol=1e-4)  # the sample's own sound

    app = build_app(model)
    players = [b for b in app.blocks.values() if isinstance(b, gr.Audio)]
    assert len(players) == 1 and players[0].visible and players[0].elem_id == "student-audio"
    assert {fn.api_name for fn in app.fns.values() if fn.api_visibility == "public"} == {"generate", "load_student"}
    (sound,) = [fn.fn for fn in app.fns.values() if getattr(fn.fn, "__name__", "") == "sound"][:1]
    out = sound("3", "", "", 0.0, 7, 1, 2, 4)  # the page's inputs: class 3, seed 7, 1 step, 2 images
    assert out.visible and out.value is not None


def test_referee_classifies_real_sounds_and_mel_fid_ranks_sets():
    from onestep.errors import OnestepError
    from onestep.eval.audio import audio_scores, mel_fid

    x_train, y_train = A.sounds_dataset("train")
    real = audio_scores(x_train[:600], y_train[:600])
    assert real["class_accuracy"] > 0.95 and real["mel_fid"] < 2.0  # held-in vs held-out real sounds: near the floor
    shuffled = audio_scores(x_train[:600], y_train[:600].roll(1))  # the same sounds, asked for the wrong classes
    assert shuffled["class_accuracy"] < 0.2 and shuffled["mel_fid"] == pytest.approx(real["mel_fid"])
    noise = torch.rand(600, 1, 32, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert mel_fid(noise) > 10 * max(real["mel_fid"], 0.1)
    one_class = x_train[y_train == 0][:600]  # a collapsed set (one class only) is far from the six-class real set
    assert mel_fid(one_class) > 5 * max(real["mel_fid"], 0.1)
    with pytest.raises(OnestepError, match="shape"):
        mel_fid(torch.zeros(4, 1, 16, 16))
