"""The built-in text-to-video-style teacher ``digit-clips``: a class-conditional ``UNet3DConditionModel``.

The layout of diffusers' ``TextToVideoSDPipeline`` denoiser (a ``UNet3DConditionModel`` on samples
``(B, C, F, H, W)``, conditioned through cross-attention on ``encoder_hidden_states``), here in pixel
space on clips ``(1, 4, 16, 16)`` of a moving digit (:mod:`onestep.video`). The condition is the class
as one one-hot token (:class:`onestep.conditioning.ClassTokenConditioning`; label 10 is the null class
used by guidance). Trained by :mod:`onestep.teachers.train_clips` on the ``"train"`` clips; the folder
under ``onestep/assets/clips-teacher`` is a DDPM pipeline folder (``unet/``, ``scheduler/``,
``model_index.json``) plus ``onestep_teacher.json`` (``"data": "digit-clips"``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..conditioning import ClassTokenConditioning, conditioning_from_dict
from ..errors import TeacherError
from ..video import FRAMES, NUM_CLASSES, SIZE, clips_dataset
from .base import Teacher, _sha256_of

CLIPS_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "clips-teacher"

UNET_CONFIG = dict(
    sample_size=SIZE,
    in_channels=1,
    out_channels=1,
    # cross-attention (the class token) at the 8x8 level on the way down and up, besides the mid block
    down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),
    up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"),
    block_out_channels=(32, 48),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=NUM_CLASSES + 1,
    attention_head_dim=8,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True)
TEACHER_META = dict(
    format_version=1,
    conditioning=dict(kind="class_tokens", num_classes=NUM_CLASSES, null_class=NUM_CLASSES),
    guidance_scale=2.0,
    clip_sample=1.0,
    data="digit-clips",
    frames=FRAMES,
    modality="video",
)


def clips_sampler(split: str = "train", seed: int = 0):
    """Draws ``(clips, condition)`` from the split's clips (one clip per digit, fixed by ``seed``)."""
    d = clips_dataset(split, seed=seed)
    cond = ClassTokenConditioning(num_classes=NUM_CLASSES, null_class=NUM_CLASSES)

    def draw(n: int, generator: torch.Generator):
        idx = torch.randint(0, len(d["clips"]), (n,), generator=generator)
        return d["clips"][idx], cond.from_labels(d["labels"][idx])

    return draw


def load_clips_teacher(path: str | Path = CLIPS_TEACHER, name: str = "digit-clips") -> Teacher:
    """A ``UNet3DConditionModel`` DDPM pipeline folder as a :class:`Teacher` (sample shape ``(C, F, H, W)``;
    ``onestep_teacher.json`` gives the frames, the class-token conditioning and, with
    ``"data": "digit-clips"``, the training clips as ``real_data``)."""
    from diffusers import UNet3DConditionModel

    from . import load_unet_and_schedule

    path = Path(path)
    if not (path / "unet").is_dir() or not (path / "scheduler").is_dir():
        raise TeacherError(f"{path}: a video teacher folder needs unet/ and scheduler/")
    unet, sched_cfg, schedule, meta = load_unet_and_schedule(path, UNet3DConditionModel)
    conditioning = conditioning_from_dict(meta.get("conditioning", TEACHER_META["conditioning"]))
    if not isinstance(conditioning, ClassTokenConditioning) or unet.config.cross_attention_dim != conditioning.num_classes + 1:
        raise TeacherError(
            f"{path}: pixel-space video teachers are class-token models (onestep_teacher.json with class_tokens conditioning, "
            "cross_attention_dim = num_classes + 1); a latent text-to-video pipeline needs vae/, text_encoder/ and tokenizer/"
        )
    cfg = unet.config
    return Teacher(
        name=name,
        backbone=unet,
        schedule=schedule,
        prediction_type=sched_cfg.get("prediction_type", "epsilon"),
        conditioning=conditioning,
        sample_shape=(cfg.in_channels, int(meta.get("frames", FRAMES)), cfg.sample_size, cfg.sample_size),
        guidance_scale=float(meta.get("guidance_scale", 1.0)),
        clip=meta.get("clip_sample", 1.0 if sched_cfg.get("clip_sample", False) else None),
        sha256=_sha256_of(list((path / "unet").glob("*.safetensors"))),
        real_data=clips_sampler() if meta.get("data") == "digit-clips" else None,
        meta=meta,
    )


def is_video_teacher_folder(spec: str | Path) -> bool:
    """True for a local pixel-space pipeline folder whose ``unet`` is a ``UNet3DConditionModel`` (no text encoder:
    latent text-to-video folders load through :func:`onestep.teachers.sd.load_text_to_image_teacher`)."""
    from .sd import component_class, is_text_to_video, read_model_index

    path = Path(spec).expanduser()
    if not (path / "model_index.json").is_file():
        return False
    try:
        index = read_model_index(path)
    except TeacherError:  # not valid JSON, or not an object: not a folder this loader takes
        return False
    return component_class(index, "unet") == "UNet3DConditionModel" and not is_text_to_video(index)


__all__ = ["CLIPS_TEACHER", "SCHEDULER_CONFIG", "TEACHER_META", "UNET_CONFIG", "clips_sampler", "is_video_teacher_folder", "load_clips_teacher"]
