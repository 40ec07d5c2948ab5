"""The built-in super-resolution teacher ``digits-sr`` and image-conditioned teachers on disk.

``digits-sr`` is a diffusers ``UNet2DModel`` DDPM teacher with ``in_channels = 2``: the noisy 16x16
digit and its condition, the 4x4 low-res digit (an area average of 4x4 blocks) upsampled back to
16x16 with bicubic interpolation, concatenated along the channels (the layout of diffusers'
``StableDiffusionUpscalePipeline``, see :class:`onestep.conditioning.ImageConditioning`). It is
trained by :mod:`onestep.teachers.train_digits_sr` on the first :data:`TRAIN_SPLIT` digits of
scikit-learn's set; the rest are held out for evaluation (:func:`digits_sr_split`).

A pipeline folder whose ``onestep_teacher.json`` says ``"conditioning": {"kind": "image", ...}``
loads as an image-conditioned teacher: its sample shape has the UNet's ``out_channels``, its
conditions come from the data the metadata names (``"data": "digits-sr"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..conditioning import ImageConditioning, conditioning_from_dict
from ..errors import TeacherError
from .train_digits import SCHEDULER_CONFIG  # the digits teacher's schedule

DIGITS_SR_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "digits-sr-teacher"
#: digits [0, TRAIN_SPLIT) train the teacher and the student; [TRAIN_SPLIT, 1797) are held out
TRAIN_SPLIT = 1500
SCALE = 4

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=2,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 48, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)
TEACHER_META = dict(
    format_version=1,
    conditioning=dict(kind="image", image_channels=1, scale=SCALE, upsample=True),
    guidance_scale=1.0,
    clip_sample=1.0,
    data="digits-sr",
)


def digits_sr_split(split: str = "train") -> torch.Tensor:
    """High-res digits ``(N, 1, 16, 16)`` in [-1, 1]: ``"train"`` (the first 1500) or ``"test"`` (the 297 held out)."""
    from ..digits import digits_dataset

    x, _ = digits_dataset()
    if split == "train":
        return x[:TRAIN_SPLIT]
    if split == "test":
        return x[TRAIN_SPLIT:]
    raise ValueError(f"split must be 'train' or 'test', not {split!r}")


def digits_sr_conditioning(split: str = "train") -> tuple[ImageConditioning, torch.Tensor]:
    """The ``digits-sr`` conditioning over a split's conditions, and that split's high-res digits (paired by index)."""
    hr = digits_sr_split(split)
    cond = ImageConditioning(**{k: v for k, v in TEACHER_META["conditioning"].items() if k != "kind"})
    return cond.with_images(cond.condition_of(hr)["image"]), hr


def image_teacher_parts(meta: dict[str, Any], path: Path):
    """``(conditioning, real_data)`` of an image-conditioned teacher folder from its metadata: with
    ``"data": "digits-sr"`` the training split's conditions and paired ``(high-res, condition)`` draws;
    otherwise a conditioning without a set (give conditions yourself) and no real data."""
    if meta.get("data") == "digits-sr":
        cond, hr = digits_sr_conditioning("train")

        def draw(n: int, generator: torch.Generator):
            idx = torch.randint(0, len(hr), (n,), generator=generator)
            return hr[idx], cond.from_labels(idx)

        return cond, draw
    try:
        cond = conditioning_from_dict(meta["conditioning"])
    except TypeError as e:
        raise TeacherError(f"{path / 'onestep_teacher.json'}: bad image conditioning ({e})") from e
    return cond, None


__all__ = ["DIGITS_SR_TEACHER", "SCALE", "SCHEDULER_CONFIG", "TRAIN_SPLIT", "digits_sr_conditioning", "digits_sr_split", "image_teacher_parts"]
