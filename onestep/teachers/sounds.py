"""The built-in audio teacher ``sounds``: a class-conditional mel-spectrogram diffusion model.

A diffusers ``UNet2DModel`` DDPM teacher of the six synthetic sound classes of :mod:`onestep.audio`
(label 6 is the null class used by guidance), on normalised log-mel spectrograms ``(1, 32, 16)`` in
[-1, 1] (32 mel bands x 16 frames of 32 ms: 0.48 s at 8 kHz). It is trained by
:mod:`onestep.teachers.train_sounds` on the ``"train"`` split of :func:`onestep.audio.sounds_dataset`;
the ``"test"`` split is held out for scoring (:mod:`onestep.eval.audio`). Its ``onestep_teacher.json``
says ``"data": "sounds"`` and holds an ``"audio"`` object (sample rate, STFT and mel settings): samples
are mel spectrograms that :func:`onestep.audio.mel_to_waveform` turns into sound.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..audio import AUDIO_META, N_MELS, FRAMES, NUM_CLASSES

SOUNDS_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "sounds-teacher"

UNET_CONFIG = dict(
    sample_size=(N_MELS, FRAMES),
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 48, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    num_class_embeds=NUM_CLASSES + 1,
    norm_num_groups=8,
    attention_head_dim=32,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
)
TEACHER_META = dict(
    format_version=1,
    conditioning=dict(kind="class", num_classes=NUM_CLASSES, null_class=NUM_CLASSES),
    guidance_scale=2.0,
    clip_sample=1.0,
    data="sounds",
    modality="audio",
    audio=AUDIO_META,
)


def load_sounds_teacher(path: Path = SOUNDS_TEACHER, name: str = "sounds"):
    """The ``sounds`` teacher (a :class:`onestep.teachers.Teacher`) with its training data as ``real_data``."""
    from . import _pipeline_teacher
    from ..audio import sounds_dataset

    teacher = _pipeline_teacher(path, name=name)
    x_all, y_all = sounds_dataset("train")

    def draw(n: int, generator: torch.Generator):
        idx = torch.randint(0, len(x_all), (n,), generator=generator)
        return x_all[idx], y_all[idx]

    return dataclasses.replace(teacher, real_data=draw)


__all__ = ["SCHEDULER_CONFIG", "SOUNDS_TEACHER", "TEACHER_META", "UNET_CONFIG", "load_sounds_teacher"]
