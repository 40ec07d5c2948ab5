"""CLAP score of sounds against their prompts: how well a text-to-audio student follows its text.

Definition (Make-An-Audio's CLAP score, audiocraft's ``CLAPTextConsistencyMetric``): for each sound ``A``
and its prompt ``T``, ``score = cos(E_A, E_T)`` with ``E_A = ClapModel.get_audio_features`` and
``E_T = ClapModel.get_text_features`` (the projected embeddings); the reported CLAP score is the mean
over sounds, with its standard deviation and the per-sound scores in ``metrics.json``. A cosine, not a
percentage: LAION-CLAP gives roughly 0.2-0.5 for matching pairs of real recordings.

Each waveform is resampled (polyphase, band-limited) from its own rate to the feature extractor's
(48 kHz for LAION-CLAP) and turned into the folder's own ``ClapFeatureExtractor`` features, with its
truncation and padding (a sound longer than the extractor's 10 s is cropped at random there, with a
fixed seed here). Prompts are tokenised by the folder's tokenizer (RoBERTa for LAION-CLAP).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from onestep.clip import pooled_embeds
from onestep.errors import OnestepError
from onestep.files import transformers_model_folder

CLAP_SCORE_DEFINITION = (
    "CLAP score = mean over sounds of cos(audio_embeds, text_embeds), with ClapModel.get_audio_features / "
    "get_text_features on the folder's feature extractor and tokenizer, sounds resampled to its rate (as Make-An-Audio)"
)


class ClapScorer:
    """A frozen ``ClapModel`` with its feature extractor and tokenizer."""

    def __init__(self, model, feature_extractor, tokenizer, device: torch.device | str = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.feature_extractor, self.tokenizer = feature_extractor, tokenizer
        self.device = torch.device(device)

    @property
    def sample_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    @torch.no_grad()
    def audio_embeds(self, waves: list[np.ndarray], sample_rates: list[int]) -> torch.Tensor:
        """Unit-norm audio embeddings of mono waveforms, ``waves[i]`` at ``sample_rates[i]``."""
        waves = [resample(np.asarray(w, dtype=np.float32), r, self.sample_rate) for w, r in zip(waves, sample_rates)]
        state = np.random.get_state()
        np.random.seed(0)  # rand_trunc / fusion crop sounds longer than the extractor's window at random
        try:
            feats = self.feature_extractor(waves, sampling_rate=self.sample_rate, return_tensors="pt")
        finally:
            np.random.set_state(state)
        feats = {k: v.to(self.device) for k, v in feats.items()}
        return F.normalize(pooled_embeds(self.model.get_audio_features(**feats)).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings of ``prompts``."""
        tok = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(pooled_embeds(self.model.get_text_features(**tok)).float(), dim=-1)


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``wave`` (1-D) from ``rate`` to ``target`` Hz by polyphase filtering (scipy's ``resample_poly``)."""
    if rate == target:
        return wave
    from scipy.signal import resample_poly

    ratio = Fraction(target, rate)
    return resample_poly(wave, ratio.numerator, ratio.denominator).astype(np.float32)


def load_clap(path: str | Path, device: torch.device | str = "cpu") -> ClapScorer:
    """A local ``ClapModel`` folder (``save_pretrained``: config, safetensors weights, the feature extractor's
    ``preprocessor_config.json`` and the tokenizer, also from ``tokenizer/``) as a :class:`ClapScorer`.
    Pickle weights are refused and no code from the folder runs."""
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    path = transformers_model_folder(path, "--clap-model", "ClapModel")
    if not (path / "preprocessor_config.json").is_file():
        raise OnestepError(f"--clap-model {path}: no preprocessor_config.json (the ClapFeatureExtractor); save the ClapProcessor there")
    tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, TypeError, ValueError) as e:
        raise OnestepError(f"--clap-model {path}: no loadable tokenizer there: {e}") from e
    model = ClapModel.from_pretrained(path, use_safetensors=True)  # an explicit class: no auto_map, no remote code
    return ClapScorer(model, ClapFeatureExtractor.from_pretrained(path), tokenizer, device)


def clap_score(
    waves: list[np.ndarray] | torch.Tensor,
    sample_rate: int | list[int],
    prompts: list[str],
    clap: ClapScorer,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """CLAP score of ``waves[i]`` (mono, at ``sample_rate``, or ``sample_rate[i]``) against ``prompts[i]``
    (:data:`CLAP_SCORE_DEFINITION`).

    Returns:
        ``{"clap_score": mean, "clap_score_std": std, "per_sample": [N floats]}``.
    """
    from tqdm.auto import tqdm

    waves = [w.detach().cpu().float().numpy() if isinstance(w, torch.Tensor) else np.asarray(w) for w in waves]
    if len(waves) != len(prompts):
        raise OnestepError(f"{len(waves)} sounds for {len(prompts)} prompts")
    if any(w.ndim != 1 or not len(w) for w in waves):
        raise OnestepError("the CLAP score takes mono waveforms (one non-empty 1-D array a sound)")
    rates = [int(sample_rate)] * len(waves) if isinstance(sample_rate, int) else [int(r) for r in sample_rate]
    scores = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="CLAP score", disable=not progress, leave=False):
        a = clap.audio_embeds(waves[i : i + batch_size], rates[i : i + batch_size])
        t = clap.text_embeds(prompts[i : i + batch_size])
        scores.append((a * t).sum(-1))
    s = torch.cat(scores).double().cpu()
    return {"clap_score": float(s.mean()), "clap_score_std": float(s.std()) if len(s) > 1 else 0.0, "per_sample": s.tolist()}


@torch.no_grad()
def sample_audio_pipeline(
    folder: str | Path,
    prompts: list[str],
    steps: int | None = None,
    seed: int = 0,
    guidance_scale: float = 1.0,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """Sounds of a text-to-audio student folder that is a diffusers pipeline (``AudioLDMPipeline``), as plain
    diffusers samples it, one per prompt; sound ``i`` uses seed ``seed + i``. Returns ``(waveforms (N, samples),
    the vocoder's sample rate, student info)``."""
    from .clip import open_pipeline, pipeline_info, pipeline_outputs, pipeline_steps

    pipe, meta = open_pipeline(folder, device, what="CLAP scoring", kind="audio")
    if getattr(pipe, "vocoder", None) is None:
        raise OnestepError(f"{folder}: not a text-to-audio student (no vocoder); the CLAP score compares sounds with prompts")
    steps = pipeline_steps(meta, steps)
    waves = pipeline_outputs(pipe, prompts, steps, seed, guidance_scale, batch_size, progress, field="audios")
    return waves, int(pipe.vocoder.config.sampling_rate), pipeline_info(folder, meta, steps)


def read_sounds(folder: str | Path, count: int) -> tuple[list[np.ndarray], list[int]]:
    """The first ``count`` WAV files of ``folder`` by name (mono 16-bit PCM, as ``onestep sample`` writes
    them): ``(waveforms, sample rates)``."""
    from onestep.audio import read_wav

    folder = Path(folder).expanduser()
    files = sorted(folder.glob("*.wav")) if folder.is_dir() else []
    if len(files) < count:
        raise OnestepError(f"{folder} holds {len(files)} .wav files for {count} prompts (file i by name is the sound of prompt i)")
    waves, rates = [], []
    for f in files[:count]:
        try:
            w, r = read_wav(f)
        except (ValueError, EOFError, OSError) as e:
            raise OnestepError(f"{f}: not a mono 16-bit PCM WAV file ({e})") from e
        waves.append(w)
        rates.append(r)
    return waves, rates


def clap_command(
    prompts: str,
    clap_model: str,
    student: str | None = None,
    audio: str | None = None,
    caption_column: str | None = None,
    num_samples: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    guidance_scale: float = 1.0,
    batch_size: int = 16,
    out: str | None = None,
    report: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``onestep eval clap``: the CLAP score of a text-to-audio student (an ``AudioLDMPipeline`` folder, sampled
    by plain diffusers, sound ``i`` with seed ``seed + i``) or of a folder of WAV files (file ``i`` by name
    for prompt ``i``) over a prompt file. Writes ``metrics.json`` (and ``report.md``) into ``out``."""
    import time

    from onestep.teachers.text import read_prompts

    from .commands import _device, default_out
    from .report import format_table, markdown_table, write_metrics, write_report

    if (student is None) == (audio is None):
        raise OnestepError("give exactly one of --student DIR and --audio DIR")
    texts = read_prompts(prompts, caption_column)
    if num_samples is not None:
        texts = texts[:num_samples]
    dev = _device(device)
    scorer = load_clap(clap_model, dev)
    record: dict[str, Any] = {"command": "clap", "prompts": str(prompts), "clap_model": str(clap_model), "definition": CLAP_SCORE_DEFINITION}
    t0 = time.perf_counter()
    if student is not None:
        waves, rate, info = sample_audio_pipeline(student, texts, steps, seed, guidance_scale, batch_size, dev, progress)
        rates: int | list[int] = rate
        record.update(student=info, seeds=[seed, seed + len(texts) - 1], guidance_scale=guidance_scale, sample_rate=rate)
        src = student
    else:
        waves, rates = read_sounds(audio, len(texts))
        record.update(audio=str(audio), seeds=None)
        src = audio
    t1 = time.perf_counter()
    res = clap_score(waves, rates, texts, scorer, batch_size=batch_size, progress=progress)
    t2 = time.perf_counter()
    row = {"what": Path(src).name, "clap_score": res["clap_score"], "samples": len(texts)}
    record.update(metrics={"clap_score": res["clap_score"], "clap_score_std": res["clap_score_std"]}, num_samples=len(texts), rows=[row],
                  device=str(dev), seconds={"sampling": t1 - t0, "scoring": t2 - t1}, clap_sample_rate=scorer.sample_rate)
    outdir = Path(out) if out else default_out(src, "clap")
    write_metrics(outdir, record | {"per_sample": res["per_sample"]})
    print(format_table([row], ["what", "clap_score", "samples"]))
    if report:
        write_report(outdir, f"CLAP score of {src}", record, markdown_table([row], ["what", "clap_score", "samples"]) + f"\n\n{CLAP_SCORE_DEFINITION}", [])
    record["out"] = str(outdir)
    return record


__all__ = ["CLAP_SCORE_DEFINITION", "ClapScorer", "clap_command", "clap_score", "load_clap", "read_sounds", "resample", "sample_audio_pipeline"]
