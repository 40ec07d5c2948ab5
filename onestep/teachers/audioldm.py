"""Text-to-audio teachers: latent diffusion on mel spectrograms as diffusers' ``AudioLDMPipeline`` lays it out.

A folder holds ``unet/`` (a ``UNet2DConditionModel`` without cross-attention context: the text comes in
through ``class_labels``, a ``simple_projection`` class embedding concatenated to the time embedding),
``vae/`` (an ``AutoencoderKL`` of one-channel mel spectrograms ``(1, T, M)``: T frames, M mel bins),
``text_encoder/`` (``ClapTextModelWithProjection``) with ``tokenizer/`` (RoBERTa), ``vocoder/``
(``SpeechT5HifiGan``: mel frames to waveform samples) and ``scheduler/``. Everything loads from safetensors.
``MusicLDMPipeline`` folders have the same layout with a whole ``ClapModel`` as ``text_encoder/`` (its
``get_text_features``, already normalised) and CLAP's ``feature_extractor/``; they load the same way,
guidance 2.0 as that pipeline's default.

As the pipeline runs it:

- a prompt's condition is CLAP's projected text embedding, L2-normalised: ``{"class_labels": (B, D)}``
  (:class:`ClapPromptEncoder`); the unconditional branch of guidance is the empty prompt's (default scale 2.5);
- the latents are ``(C, T / f, M / f)`` with ``T = audio_length_in_s / (prod(upsample_rates) / sampling_rate)``
  rounded up to a multiple of the VAE factor ``f`` (default length: the UNet's ``sample_size * f`` frames),
  ``M`` the vocoder's ``model_in_dim``;
- decoding is ``vae.decode(z / scaling_factor)`` (the log-mel spectrogram), then the vocoder, cut to
  ``audio_length_in_s * sampling_rate`` samples.

Samples are drawn everywhere as pictures: :class:`MelVAE` decodes latents to the spectrogram shown as an
image in [-1, 1] (mel bins as rows, low bands at the bottom, time left to right; :data:`MEL_RANGE` mapped
affinely), and turns such pictures back into sound (:meth:`MelVAE.waveform`). Student folders are
``AudioLDMPipeline`` folders again (:func:`onestep.pipeline.write_pipeline_parts`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, TeacherError
from ..schedule import NoiseSchedule
from .base import Teacher, _sha256_of, dtype_option
from .latents import LatentVAE
from .prompt_cache import cache_dtype
from .text import PromptEncoder

AUDIOLDM_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "vocoder")
#: The text encoders of the pipelines loaded here: AudioLDM's, and MusicLDM's whole CLAP model.
CLAP_TEXT_ENCODERS = ("ClapTextModelWithProjection", "ClapModel")
#: Loader options only AudioLDM folders take.
AUDIO_OPTIONS = ("audio_length_in_s", "real_audio")
#: The log-mel values mapped to black (-1) and white (+1) in pictures: AudioLDM's mels are ``log(max(mel, 1e-5))``,
#: so silence is -11.5; loud bands stay below 4.
MEL_RANGE = (-12.0, 4.0)
#: ``AudioLDMPipeline``'s default guidance scale.
AUDIOLDM_GUIDANCE = 2.5
#: ``MusicLDMPipeline``'s.
MUSICLDM_GUIDANCE = 2.0


def is_audioldm(index: dict[str, Any]) -> bool:
    """An ``AudioLDMPipeline`` (or ``MusicLDMPipeline``) folder: a CLAP text encoder and a vocoder beside the UNet."""
    from .sd import component_class

    return component_class(index, "vocoder") is not None and component_class(index, "text_encoder") in CLAP_TEXT_ENCODERS


class ClapPromptEncoder(PromptEncoder):
    """Encodes prompts as ``AudioLDMPipeline`` does: RoBERTa tokens (padded to the tokenizer's length, with
    the attention mask) through ``ClapTextModelWithProjection``, its ``text_embeds`` L2-normalised; or, when
    ``text_encoder/`` holds a whole ``ClapModel`` (``MusicLDMPipeline``), its ``get_text_features`` (normalised
    by CLAP itself). A condition is ``{"class_labels": (B, D)}``. ``size`` is the spectrogram's ``(frames, mel bins)``."""

    #: the tensor every row of a prompt cache of this encoder holds
    row_key = "class_labels"

    def __init__(self, folder: str | Path, size: tuple[int, int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 compute: str = "storage"):
        super().__init__(folder, False, size, device=device, dtype=dtype, compute=compute)

    @property
    def whole_clap(self) -> bool:
        """Whether ``text_encoder/`` is a whole ``ClapModel`` (MusicLDM) rather than its text tower."""
        import json

        config = json.loads((self.folder / "text_encoder" / "config.json").read_text())
        return config.get("model_type") == "clap"

    def _components(self) -> list[tuple[str, str, type, type]]:
        from transformers import AutoTokenizer, ClapModel, ClapTextModelWithProjection

        return [("tokenizer", "text_encoder", AutoTokenizer, ClapModel if self.whole_clap else ClapTextModelWithProjection)]

    @property
    def family(self) -> str:
        return "audioldm"

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        import torch.nn.functional as F

        from ..clip import pooled_embeds

        (tok, enc), = self._load()
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        input_ids, mask = ids.input_ids.to(self.device), ids.attention_mask.to(self.device)
        if hasattr(enc, "get_text_features"):  # MusicLDM: CLAP's own (normalised) text features, as its pipeline takes them
            return {"class_labels": pooled_embeds(enc.get_text_features(input_ids, attention_mask=mask)).float().cpu()}
        return {"class_labels": F.normalize(enc(input_ids, attention_mask=mask).text_embeds, dim=-1).float().cpu()}


class MelVAE(LatentVAE):
    """The frozen VAE and vocoder of an AudioLDM folder: latents to spectrogram pictures in [-1, 1], pictures to sound.

    Args:
        vae: the ``AutoencoderKL`` of mel spectrograms.
        vocoder: the ``SpeechT5HifiGan``.
        num_samples: waveform samples of one clip (the pipeline's ``audio_length_in_s * sampling_rate``).
    """

    def __init__(self, vae: nn.Module, vocoder: nn.Module, num_samples: int):
        super().__init__(vae)
        self.vocoder = vocoder.requires_grad_(False).eval()
        self.num_samples = int(num_samples)

    @property
    def sample_rate(self) -> int:
        return int(self.vocoder.config.sampling_rate)

    def mel(self, z: torch.Tensor) -> torch.Tensor:
        """The log-mel spectrograms ``(B, 1, T, M)`` of latents, as ``AudioLDMPipeline.decode_latents`` gives them."""
        return super().decode(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pictures of the spectrograms of latents, ``(B, 1, M, T)``, about [-1, 1] (not clamped)."""
        return self.to_picture(self.mel(z))

    @staticmethod
    def to_picture(mel: torch.Tensor) -> torch.Tensor:
        lo, hi = MEL_RANGE
        return (2 * (mel.transpose(-1, -2).flip(-2) - lo) / (hi - lo) - 1).float()

    @staticmethod
    def from_picture(picture: torch.Tensor) -> torch.Tensor:
        lo, hi = MEL_RANGE
        return ((picture.float() + 1) * (hi - lo) / 2 + lo).flip(-2).transpose(-1, -2)

    @torch.no_grad()
    def waveform(self, pictures: torch.Tensor) -> torch.Tensor:
        """The sound ``(B, num_samples)`` (float32) of spectrogram pictures, through the vocoder as the pipeline does."""
        mel = self.from_picture(pictures).squeeze(1).to(next(self.vocoder.parameters()).device, self.vocoder.dtype)
        return self.vocoder(mel).float().cpu()[:, : self.num_samples]


# ------------------------------------------------------------------------------- real sounds


@lru_cache(maxsize=4)
def slaney_mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """``(n_mels, n_fft // 2 + 1)`` triangles on the Slaney mel scale (linear below 1 kHz, logarithmic above),
    each scaled to unit area (Slaney's normalisation): the filterbank AudioLDM's front end uses (built once per
    setting: every file of a ``real_audio`` folder reads the same one; callers must not modify it)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    step, knee_hz, knee_mel, log_step = 200.0 / 3, 1000.0, 15.0, np.log(6.4) / 27.0

    def to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f < knee_hz, f / step, knee_mel + np.log(np.maximum(f, 1e-10) / knee_hz) / log_step)

    def to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        return np.where(m < knee_mel, m * step, knee_hz * np.exp(log_step * (m - knee_mel)))

    edges = to_hz(np.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2))
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    rising = (freqs[None] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    falling = (edges[2:, None] - freqs[None]) / np.diff(edges)[1:, None]
    weights = np.maximum(0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return torch.from_numpy(weights).float()


def mel_settings(vocoder_config) -> dict[str, int]:
    """AudioLDM's STFT front end for a vocoder: its hop (the vocoder's upsampling), mel bins and sample rate,
    and the window AudioLDM pairs with them (1024 samples for a hop of 160 at 16 kHz; scaled with the hop)."""
    hop = int(np.prod(vocoder_config.upsample_rates))
    return {"sample_rate": int(vocoder_config.sampling_rate), "hop": hop, "n_fft": int(2 ** round(np.log2(hop * 6.4))),
            "n_mels": int(vocoder_config.model_in_dim)}


def load_mel(path: Path, frames: int, sample_rate: int, hop: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """The log-mel spectrogram ``(1, frames, n_mels)`` of a mono 16-bit WAV file as AudioLDM computes its training
    data: the mean removed and the peak scaled to 0.5, padded with silence or cut to ``frames * hop`` samples, a
    Hann-windowed STFT (window ``n_fft``, reflect-padded, not centred), Slaney mel triangles from 0 Hz to Nyquist,
    ``log(max(mel, 1e-5))``. The file's sample rate must be the vocoder's (no resampling here)."""
    from ..audio import read_wav

    try:
        wave, rate = read_wav(path)
    except (OSError, EOFError, ValueError) as e:
        raise ConfigError(f"real_audio {path}: not a readable mono 16-bit PCM WAV file ({e})") from e
    if rate != sample_rate:
        raise ConfigError(f"real_audio {path}: {rate} Hz, but the teacher's vocoder runs at {sample_rate} Hz; resample the files first")
    x = torch.from_numpy(wave).double()
    x = x - x.mean()
    x = 0.5 * x / x.abs().max().clamp(min=1e-8)
    x = torch.nn.functional.pad(x, (0, max(0, frames * hop - len(x))))[: frames * hop]
    pad = (n_fft - hop) // 2
    x = torch.nn.functional.pad(x[None, None], (pad, pad), mode="reflect")[0, 0]
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft, dtype=x.dtype), center=False, return_complex=True).abs()
    mel = slaney_mel_filterbank(n_mels, n_fft, sample_rate).double() @ spec
    return torch.log(mel.clamp(min=1e-5)).T[:frames].float()[None]


def audio_folder_data(folder: str | Path, conditioning, vae: LatentVAE, frames: int, vocoder_config, device: torch.device | str = "cpu"):
    """A real-data sampler ``(n, generator) -> (latents, caption embeddings)`` over a folder of captioned WAV files
    (``metadata.jsonl`` with ``file_name`` and ``text``, or a ``.txt`` beside each ``.wav``): :func:`load_mel`'s
    spectrograms, encoded once by the VAE into the on-disk latent cache, as real images are."""
    from .latents import image_folder_data, read_image_captions

    pairs = read_image_captions(folder, (".wav",), "real_audio")
    settings = mel_settings(vocoder_config)
    return image_folder_data(folder, conditioning, vae, frames, device, pairs=pairs, load=lambda p: load_mel(p, frames, **settings))


def audio_shape(unet_config, vae_factor: int, vocoder_config, audio_length_in_s: float | None) -> tuple[int, int, int]:
    """``(frames, mel bins, waveform samples)`` of a clip of ``audio_length_in_s`` seconds (default: the UNet's
    ``sample_size * vae_factor`` frames), with ``AudioLDMPipeline``'s arithmetic: frames rounded up to a
    multiple of the VAE factor, the waveform cut to the length asked for."""
    upsample = float(np.prod(vocoder_config.upsample_rates) / vocoder_config.sampling_rate)
    length = float(audio_length_in_s) if audio_length_in_s is not None else unet_config.sample_size * vae_factor * upsample
    frames = int(length / upsample)
    if frames % vae_factor:
        frames = int(np.ceil(frames / vae_factor)) * vae_factor
    return frames, int(vocoder_config.model_in_dim), int(length * vocoder_config.sampling_rate)


def load_audioldm_teacher(
    path: Path,
    name: str,
    prompts: str | list[str] | None = None,
    validation_prompts: str | list[str] | None = None,
    negative_prompt: str | None = None,
    resolution: int | None = None,
    real_images: str | None = None,
    cache_text_embeddings: bool = True,
    text_cache_dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    prompt_column: str | None = None,
    weights_dtype: torch.dtype | None = None,
    text_compute: str = "storage",
    audio_length_in_s: float | None = None,
    real_audio: str | Path | None = None,
) -> Teacher:
    """Load an ``AudioLDMPipeline`` (or ``MusicLDMPipeline``) folder as a latent text-to-audio :class:`~onestep.teachers.Teacher`.

    The prompt options are those of :func:`onestep.teachers.sd.load_text_to_image_teacher`;
    ``audio_length_in_s`` sets the clips' length (default: the UNet's ``sample_size``, as the pipeline);
    ``real_audio`` is a folder of captioned WAV files at the vocoder's rate, the real data of consistency
    distillation and GAN terms (:func:`audio_folder_data`). ``resolution`` and ``real_images`` are refused."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import SpeechT5HifiGan

    from .sd import read_model_index, read_scheduler_config, require_parts, text_teacher_data

    index = read_model_index(path)
    require_parts(path, index, AUDIOLDM_PARTS, "text-to-audio", f"an AudioLDM folder needs {', '.join(AUDIOLDM_PARTS)}")
    if resolution:
        raise ConfigError(f"resolution: {path} is a text-to-audio teacher; set its clips' length with audio_length_in_s")
    if real_images:
        raise ConfigError(f"real_images: {path} is a text-to-audio teacher, and real_images are images, not sounds; "
                          "give captioned WAV files as real_audio")
    if audio_length_in_s is not None and (isinstance(audio_length_in_s, bool) or not isinstance(audio_length_in_s, (int, float))
                                          or not audio_length_in_s > 0):
        raise ConfigError(f"audio_length_in_s must be a number of seconds > 0 (got {audio_length_in_s!r})")
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True, **dtype_option(weights_dtype))
        vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
        vocoder = SpeechT5HifiGan.from_pretrained(path / "vocoder", use_safetensors=True)
    except (OSError, ValueError) as e:
        raise TeacherError(f"{path}: cannot load the UNet, the VAE or the vocoder ({e})") from e
    if unet.config.class_embed_type != "simple_projection":
        raise TeacherError(f"{path}: an AudioLDM UNet takes the text embedding as class_labels (class_embed_type 'simple_projection'), "
                           f"this one has {unet.config.class_embed_type!r}")
    latent_vae = LatentVAE(vae)
    f = latent_vae.scale_factor
    frames, mels, num_samples = audio_shape(unet.config, f, vocoder.config, audio_length_in_s)
    if mels % f:
        raise TeacherError(f"{path}: the vocoder's {mels} mel bins are not a multiple of the VAE's factor {f}")
    mel_vae = MelVAE(vae, vocoder, num_samples)
    encoder = ClapPromptEncoder(path, (frames, mels), device=device, dtype=cache_dtype(text_cache_dtype), compute=text_compute)
    conditioning, _ = text_teacher_data(
        encoder, mel_vae, frames, device, prompts=prompts, validation_prompts=validation_prompts, negative_prompt=negative_prompt,
        cache_text_embeddings=cache_text_embeddings, text_cache_dtype=text_cache_dtype, prompt_column=prompt_column,
    )
    real_data = audio_folder_data(real_audio, conditioning, mel_vae, frames, vocoder.config, device) if real_audio else None
    sched_cfg = read_scheduler_config(path)
    audio = {"vocoder": type(vocoder).__name__, "sample_rate": int(vocoder.config.sampling_rate), "num_samples": num_samples,
             "audio_length_in_s": num_samples / int(vocoder.config.sampling_rate), "frames": frames, "mel_bins": mels}
    return Teacher(
        name=name,
        backbone=unet,
        schedule=NoiseSchedule.from_scheduler_config(sched_cfg),
        prediction_type=sched_cfg.get("prediction_type", "epsilon"),
        conditioning=conditioning,
        sample_shape=(int(unet.config.in_channels), frames // f, mels // f),
        guidance_scale=MUSICLDM_GUIDANCE if index.get("_class_name") == "MusicLDMPipeline" else AUDIOLDM_GUIDANCE,
        clip=None,
        sha256=_sha256_of(list((path / "unet").glob("*.safetensors"))),
        real_data=real_data,
        meta={"pipeline": index.get("_class_name"), "pipeline_folder": str(path.resolve()), "modality": "audio", "audio": audio},
        vae=mel_vae,
    )


def student_audio_parts(path: Path, meta: dict[str, Any], device: torch.device | str = "cpu") -> tuple[ClapPromptEncoder, MelVAE]:
    """The prompt encoder and :class:`MelVAE` of an AudioLDM student folder (its own copies of the teacher's parts)."""
    from diffusers import AutoencoderKL
    from transformers import SpeechT5HifiGan

    from ..errors import StudentFormatError

    audio = meta.get("audio")
    if not isinstance(audio, dict) or not all(isinstance(audio.get(k), int) for k in ("frames", "mel_bins", "num_samples")):
        raise StudentFormatError(f"{path}: onestep.json of an AudioLDM student needs 'audio' with frames, mel_bins and num_samples")
    encoder = ClapPromptEncoder(path, (audio["frames"], audio["mel_bins"]), device=device)
    vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
    vocoder = SpeechT5HifiGan.from_pretrained(path / "vocoder", use_safetensors=True)
    return encoder, MelVAE(vae, vocoder, int(audio["num_samples"])).to(device)


__all__ = [
    "AUDIOLDM_GUIDANCE",
    "AUDIOLDM_PARTS",
    "CLAP_TEXT_ENCODERS",
    "MUSICLDM_GUIDANCE",
    "AUDIO_OPTIONS",
    "ClapPromptEncoder",
    "MEL_RANGE",
    "MelVAE",
    "audio_folder_data",
    "audio_shape",
    "is_audioldm",
    "load_audioldm_teacher",
    "load_mel",
    "mel_settings",
    "slaney_mel_filterbank",
    "student_audio_parts",
]
