"""Text-to-image teachers: Stable Diffusion (SD1.5 / SD2.1, eps or v prediction) and SDXL
pipeline folders on disk, in latent space; and the folder checks the SD3 loader shares.

A teacher folder is what ``pipeline.save_pretrained`` writes: ``model_index.json``, ``unet/``
(a ``UNet2DConditionModel``), ``vae/`` (``AutoencoderKL``), ``text_encoder/`` + ``tokenizer/``
(CLIP) and ``scheduler/``; SDXL adds ``text_encoder_2/`` (with projection: pooled embeddings)
and ``tokenizer_2/``. A text-to-video folder (diffusers' ``TextToVideoSDPipeline``: the SD parts with a
``UNet3DConditionModel``) loads the same way, its samples latent clips ``(C, F, h, w)`` decoded frame by
frame. Everything loads with ``from_pretrained(path)`` from safetensors; nothing
reaches a hub and no remote code runs.

Latent space throughout (:mod:`onestep.teachers.latents`): the generator, the fake score and the
teacher work on VAE latents; the text conditioning (:class:`onestep.teachers.text.TextConditioning`)
is encoded as the diffusers pipelines encode prompts. Student pipeline folders are written by
:mod:`onestep.pipeline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import files
from ..errors import ConfigError, TeacherError
from ..schedule import NoiseSchedule
from .base import RealSampler, Teacher, _sha256_of, dtype_option, refuse_pickles
from .latents import LatentVAE, image_folder_data
from .prompt_cache import cache_dtype
from .text import PromptEncoder, TextConditioning, text_conditioning

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = SD_PARTS + ("text_encoder_2", "tokenizer_2")
DEFAULT_FRAMES = 16
"""Frames of a text-to-video teacher's clips unless ``num_frames`` says otherwise (``TextToVideoSDPipeline``'s default)."""


def read_model_index(path: Path) -> dict[str, Any]:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise TeacherError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    return read_json_object(index_file)


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON file holding one object (a diffusers ``model_index.json`` or ``config.json``); a
    :class:`TeacherError` naming the file when it is not valid JSON or not an object."""
    return files.read_json_object(file, TeacherError)


def component_class(index: dict[str, Any], part: str) -> str | None:
    entry = index.get(part)
    if isinstance(entry, list) and len(entry) == 2:
        return entry[1]
    return None if entry is None else str(entry)


def is_text_to_video(index: dict[str, Any]) -> bool:
    """A latent text-to-video folder: a ``UNet3DConditionModel`` with a text encoder (``TextToVideoSDPipeline``)."""
    return component_class(index, "unet") == "UNet3DConditionModel" and component_class(index, "text_encoder") is not None


def is_sdxl(index: dict[str, Any]) -> bool:
    return component_class(index, "text_encoder_2") is not None or "XL" in str(index.get("_class_name", ""))


def check_parts(path: Path, index: dict[str, Any]) -> tuple[str, ...]:
    """The parts the folder must hold; raise naming the first one that is missing."""
    parts = SDXL_PARTS if is_sdxl(index) else SD_PARTS
    needs = f"a {'SDXL' if parts is SDXL_PARTS else 'Stable Diffusion'} folder needs {', '.join(parts)}"
    return require_parts(path, index, parts, "text-to-image", needs)


def require_parts(path: Path, index: dict[str, Any], parts: tuple[str, ...], kind: str, needs: str) -> tuple[str, ...]:
    """Check that ``model_index.json`` names each of ``parts`` and its folder exists, and that the
    weight folders hold no pickles; raise a :class:`TeacherError` naming the first missing part
    (``needs`` says what a ``kind`` folder must hold)."""
    for part in parts:
        if component_class(index, part) is None or not (path / part).is_dir():
            raise TeacherError(f"{path}: the {kind} pipeline has no '{part}' component ({needs})")
    for part in parts:
        if not part.startswith(("tokenizer", "scheduler")):
            refuse_pickles(path / part)
    return parts


def load_text_to_image_teacher(
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
    num_frames: int | None = None,
):
    """Load a Stable Diffusion / SDXL (or SD-layout text-to-video) pipeline folder as a latent
    :class:`~onestep.teachers.Teacher`.

    Args:
        path: the pipeline folder.
        name: what the teacher is called in logs and student metadata.
        prompts: the training prompt set: a file or folder (text, JSONL, JSON / COCO captions, CSV,
            parquet, a ``datasets`` folder; see :func:`onestep.prompts.read_prompts`) or a list.
        validation_prompts: prompts for previews (a file or a list; default: a fixed list).
        negative_prompt: replaces the empty prompt as guidance's unconditional branch.
        resolution: image side in pixels (default: the UNet's ``sample_size`` times the VAE factor).
        real_images: a folder of images with captions, for methods with a GAN term or real data.
        cache_text_embeddings: encode the prompt set once into the on-disk prompt cache (the text
            encoders are frozen; :mod:`onestep.teachers.prompt_cache`), else every batch anew.
        text_cache_dtype: storage dtype of that cache (None: float32; a run's frozen dtype halves it);
            the text encoders load in it too.
        device: where the text encoders and the VAE run while caching.
        prompt_column: the field / column of ``prompts`` holding the prompt (default: caption, prompt or text).
        weights_dtype: what the UNet's weights load in (None: float32). A run whose every copy of the
            UNet is frozen (LoRA fake score and LoRA generator) loads it in its frozen dtype, so the
            float32 weights are never all in memory (SDXL: 10.3 GB).
        text_compute: what text encoders loaded in bf16 / fp16 compute in: ``"storage"`` or ``"float32"``
            (:mod:`onestep.precision`).
        num_frames: text-to-video folders: frames per clip (default :data:`DEFAULT_FRAMES`); refused for images.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet3DConditionModel

    index = read_model_index(path)
    check_parts(path, index)
    xl, video = is_sdxl(index), is_text_to_video(index)
    if num_frames is not None and (not video or isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
        raise ConfigError(f"num_frames must be a whole number >= 1 (got {num_frames!r})" if video else
                          f"num_frames: an option of text-to-video teachers; {path} is a text-to-image pipeline")
    if video and real_images:
        raise ConfigError(f"real_images: {path} is a text-to-video teacher, and real_images are still images, not clips")
    try:
        unet_class = UNet3DConditionModel if video else UNet2DConditionModel
        unet = unet_class.from_pretrained(path / "unet", use_safetensors=True, **dtype_option(weights_dtype))
        vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
    except (OSError, ValueError) as e:
        raise TeacherError(f"{path}: cannot load the UNet or the VAE ({e})") from e
    if xl and getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise TeacherError(f"{path}: an SDXL folder needs a UNet with addition_embed_type 'text_time'")
    sched_cfg = read_scheduler_config(path)
    schedule = NoiseSchedule.from_scheduler_config(sched_cfg)
    latent_vae = LatentVAE(vae)
    f = latent_vae.scale_factor
    side = int(resolution) if resolution else int(unet.config.sample_size) * f
    if side % f:
        raise ConfigError(f"resolution {side} is not a multiple of the VAE's factor {f}")
    conditioning, real_data = text_teacher_data(
        PromptEncoder(path, xl, (side, side), device=device, dtype=cache_dtype(text_cache_dtype), compute=text_compute), latent_vae, side, device, prompts=prompts,
        validation_prompts=validation_prompts, negative_prompt=negative_prompt, real_images=real_images,
        cache_text_embeddings=cache_text_embeddings, zero_empty_prompt=bool(xl and index.get("force_zeros_for_empty_prompt", False)),
        text_cache_dtype=text_cache_dtype, prompt_column=prompt_column,
    )
    frames = (int(num_frames or DEFAULT_FRAMES),) if video else ()
    meta = {"pipeline": index.get("_class_name"), "pipeline_folder": str(path.resolve()), "sdxl": xl, "resolution": side}
    return Teacher(
        name=name,
        backbone=unet,
        schedule=schedule,
        prediction_type=sched_cfg.get("prediction_type", "epsilon"),
        conditioning=conditioning,
        sample_shape=(int(unet.config.in_channels), *frames, side // f, side // f),
        # the pipelines' defaults: TextToVideoSDPipeline 9, SDXL 5, SD 7.5
        guidance_scale=9.0 if video else 5.0 if xl else 7.5,
        clip=None,  # latents are not clamped
        sha256=_sha256_of(list((path / "unet").glob("*.safetensors"))),
        real_data=real_data,
        meta=meta | ({"modality": "video", "frames": frames[0]} if video else {}),
        vae=latent_vae,
    )


def read_scheduler_config(path: Path) -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` of a pipeline folder; a :class:`TeacherError` when missing."""
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise TeacherError(f"{path}: scheduler/scheduler_config.json is missing")
    return read_json_object(sched_file)


def text_teacher_data(
    encoder: PromptEncoder, vae: LatentVAE, side: int, device: torch.device | str = "cpu", *, prompts: str | list[str] | None = None,
    validation_prompts: str | list[str] | None = None, negative_prompt: str | None = None, real_images: str | None = None,
    cache_text_embeddings: bool = True, zero_empty_prompt: bool = False, text_cache_dtype: torch.dtype | str | None = None,
    prompt_column: str | None = None,
) -> tuple[TextConditioning, RealSampler | None]:
    """What the text-to-image loaders share: the teacher's :class:`TextConditioning` (prompt options as
    in :func:`load_text_to_image_teacher`), prepared, and its real-data sampler over ``real_images``
    (None without one)."""
    conditioning = text_conditioning(
        encoder, prompts, validation_prompts, negative_prompt, cache_text_embeddings, zero_empty_prompt=zero_empty_prompt,
        cache_dtype=text_cache_dtype, prompt_column=prompt_column,
    )
    real_data = None
    if real_images:
        real_data = image_folder_data(real_images, conditioning, vae, side, device=device)
    conditioning.prepare()
    return conditioning, real_data


__all__ = [
    "SDXL_PARTS",
    "SD_PARTS",
    "check_parts",
    "component_class",
    "DEFAULT_FRAMES",
    "is_sdxl",
    "is_text_to_video",
    "load_text_to_image_teacher",
    "read_json_object",
    "read_model_index",
    "read_scheduler_config",
    "require_parts",
    "text_teacher_data",
]
