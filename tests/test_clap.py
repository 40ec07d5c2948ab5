"""``onestep eval clap``: the CLAP score of sounds against their prompts (eval/clap.py), on a tiny random
``ClapModel`` saved with its feature extractor and an offline RoBERTa tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from t2i_fixtures import make_tiny_audioldm, tiny_clap_audio_config, write_prompts, write_roberta_vocab

from onestep.audio import write_wav
from onestep.cli import main

PROMPTS = ["a dog barking", "rain on a roof", "a violin playing a slow tune"]


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, RobertaTokenizer

    out = tmp_path_factory.mktemp("clap")
    vocab = write_roberta_vocab(out / "vocab")
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=80, projection_dim=8)
    ClapModel(ClapConfig(text_config=text, audio_config=tiny_clap_audio_config(), projection_dim=8)).save_pretrained(out)
    ClapFeatureExtractor(truncation="rand_trunc").save_pretrained(out)  # laion/clap-htsat-unfused's truncation
    RobertaTokenizer(str(out / "vocab" / "vocab.json"), str(out / "vocab" / "merges.txt"), model_max_length=77).save_pretrained(out)
    return out


def _tone(freq: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_the_clap_score_is_the_cosine_of_the_model_s_own_embeddings(clap_dir):
    from scipy.signal import resample_poly
    from transformers import ClapFeatureExtractor, ClapModel, RobertaTokenizer

    from onestep.eval.clap import clap_score, load_clap

    rng = np.random.default_rng(0)
    waves = [_tone(440, 16000), (0.3 * rng.standard_normal(16000)).astype(np.float32), _tone(2000, 16000, 0.5)]
    res = clap_score(waves, 16000, PROMPTS, load_clap(clap_dir), batch_size=2)

    model = ClapModel.from_pretrained(clap_dir).eval()
    fe, tok = ClapFeatureExtractor.from_pretrained(clap_dir), RobertaTokenizer.from_pretrained(clap_dir)
    with torch.no_grad():
        feats = fe([resample_poly(w, 3, 1) for w in waves], sampling_rate=48000, return_tensors="pt")
        a = model.get_audio_features(**feats)
        t = model.get_text_features(**{k: v for k, v in tok(PROMPTS, padding=True, return_tensors="pt").items() if k != "token_type_ids"})
    a, t = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (a, t))
    expected = F.cosine_similarity(a, t).double()
    assert res["per_sample"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert res["clap_score"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert res["clap_score_std"] == pytest.approx(float(expected.std()), abs=1e-5)
    assert len(set(np.round(res["per_sample"], 6))) == 3  # three different sounds and prompts, three scores


def test_a_sound_is_resampled_to_the_extractor_s_rate(clap_dir):
    """The same tone written at 16 kHz and at 48 kHz scores (nearly) the same; read as if it were 48 kHz
    audio, the 16 kHz one is a different sound (three times slower) and scores differently."""
    from onestep.eval.clap import clap_score, load_clap

    clap = load_clap(clap_dir)
    at16, at48 = _tone(700, 16000), _tone(700, 48000)
    s16, s48, wrong = (clap_score([w], r, PROMPTS[:1], clap)["clap_score"] for w, r in ((at16, 16000), (at48, 48000), (at16, 48000)))
    assert abs(s16 - s48) < 0.1 * abs(wrong - s48)


def test_eval_clap_scores_a_wav_folder_and_an_audioldm_student(clap_dir, tmp_path):
    from diffusers import AudioLDMPipeline

    from onestep.eval.clap import clap_score, load_clap

    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    for i, f in enumerate((300, 900, 2700)):
        write_wav(sounds / f"sample_{i:05d}.wav", _tone(f, 8000), sample_rate=8000)
    assert main(["eval", "clap", "--audio", str(sounds), "--prompts", str(prompts), "--clap-model", str(clap_dir),
                 "--out", str(tmp_path / "e1"), "--report", "--no-progress"]) == 0
    rec = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    from onestep.audio import read_wav

    read = [read_wav(sounds / f"sample_{i:05d}.wav")[0] for i in range(3)]
    assert rec["per_sample"] == pytest.approx(clap_score(read, 8000, PROMPTS, load_clap(clap_dir))["per_sample"], abs=1e-6)
    assert (tmp_path / "e1" / "report.md").is_file() and rec["metrics"]["clap_score"] == pytest.approx(np.mean(rec["per_sample"]))

    # a text-to-audio pipeline folder, sampled by plain diffusers with seeds 7, 8 (two steps)
    pipe_dir = make_tiny_audioldm(tmp_path / "audioldm")
    assert main(["eval", "clap", "--student", str(pipe_dir), "--prompts", str(prompts), "--clap-model", str(clap_dir), "--steps", "2",
                 "--seed", "7", "--num-samples", "2", "--out", str(tmp_path / "e2"), "--no-progress"]) == 0
    rec = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    pipe = AudioLDMPipeline.from_pretrained(pipe_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    audios = pipe(prompt=PROMPTS[:2], num_inference_steps=2, guidance_scale=1.0, generator=gens, output_type="pt").audios
    expected = clap_score(audios, pipe.vocoder.config.sampling_rate, PROMPTS[:2], load_clap(clap_dir))
    assert rec["per_sample"] == pytest.approx(expected["per_sample"], abs=1e-5)
    assert rec["sample_rate"] == 8000 and rec["clap_sample_rate"] == 48000 and rec["student"]["steps"] == 2


def test_eval_clap_refuses_what_it_cannot_score(clap_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    write_wav(sounds / "one.wav", _tone(440, 8000), sample_rate=8000)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    cases = [
        (["--audio", str(sounds), "--clap-model", str(clap_dir)], "1 .wav files for 3 prompts"),
        (["--audio", str(sounds), "--clap-model", str(pickled)], "pickle files are not loaded"),
        (["--clap-model", str(clap_dir)], "exactly one of --student DIR and --audio DIR"),
        (["--student", str(sounds), "--clap-model", str(clap_dir)], "not a text-to-audio student (no model_index.json); CLAP scoring samples a diffusers pipeline folder, or scores a folder of WAV files with --audio"),
    ]
    for args, message in cases:
        assert main(["eval", "clap", "--prompts", str(prompts), *args, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "metrics.json").exists()
