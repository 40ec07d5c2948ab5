"""Teachers: the built-in ones (``digits``, ``gmm-*``) and diffusers checkpoints on disk.

:func:`load_teacher` turns a name or a local path into a :class:`Teacher`: a frozen
backbone with its schedule, prediction type, conditioning and sample shape. Weights load
only from safetensors. A Hugging Face Hub id (``owner/name``) resolves to a folder of the
Hugging Face cache only when the user allows it (:mod:`onestep.teachers.hub`); nothing else
reaches a model hub.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conditioning import Cond, Conditioning, conditioning_from_dict
from ..errors import ConfigError, TeacherError
from ..files import PICKLE_SUFFIXES
from ..schedule import NoiseSchedule
from .base import RealSampler, Teacher, _sha256_of, refuse_pickles

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_TEACHER = ASSETS / "digits-teacher"


def save_unet_teacher(out: str | Path, unet: nn.Module, scheduler_config: dict, meta: dict | None = None) -> Path:
    """Write a ``UNet2DModel`` teacher as a diffusers DDPM pipeline folder (``unet/``, ``scheduler/``,
    ``model_index.json``), plus ``onestep_teacher.json`` holding ``meta`` (conditioning, default guidance)."""
    import diffusers
    from diffusers import DDPMScheduler

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    DDPMScheduler(**scheduler_config).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", type(unet).__name__],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if meta is not None:
        (out / "onestep_teacher.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_teacher(spec: str | Path, allow_hub: bool | None = None, **text_options) -> Teacher:
    """Load a teacher by built-in name (``digits``, ``sounds``, ``gmm-ring8``, ``gmm-ring8-unbalanced``,
    ``gmm-grid25``) or from a local diffusers pipeline folder (``model_index.json`` with a
    ``unet`` and a ``scheduler``), or, with ``allow_hub`` (or ``ONESTEP_ALLOW_HUB=1``), a Hugging
    Face Hub id (``owner/name``: :func:`onestep.teachers.hub.resolve_hub_teacher`, safetensors only,
    from the cache when offline); the teacher is then named by its id.

    Text-to-image folders (a ``UNet2DConditionModel`` with VAE, text encoder(s) and
    tokenizer(s): SD1.5, SD2.1, SDXL) and text-to-video ones (``TextToVideoSDPipeline``: a ``UNet3DConditionModel``
    with VAE, text encoder and tokenizer; option ``num_frames``) load through
    :func:`onestep.teachers.sd.load_text_to_image_teacher`,
    flow-matching SD3 folders (an ``SD3Transformer2DModel``) through
    :func:`onestep.teachers.sd3.load_sd3_teacher`, SD x4 upscaler folders (``StableDiffusionUpscalePipeline``)
    through :func:`onestep.teachers.upscaler.load_upscaler_teacher` (options ``prompt``, ``noise_level``,
    ``resolution``, ``real_images``), AudioLDM folders (``AudioLDMPipeline``: a CLAP text encoder and a vocoder)
    through :func:`onestep.teachers.audioldm.load_audioldm_teacher` (option ``audio_length_in_s``);
    the text-to-image ones take ``text_options`` (``prompts``, ``validation_prompts``, ``negative_prompt``, ``resolution``,
    ``real_images``, ``cache_text_embeddings``, ``text_cache_dtype``, ``device``, ``prompt_column``, ``weights_dtype``,
    ``text_compute``);
    other teachers ignore them, and refuse the upscaler's, ``num_frames`` and ``audio_length_in_s``."""
    s = str(spec)
    if s.startswith("gmm-") or s in ("digits", "digits-sr", "sounds"):
        _refuse_foreign_options(text_options, s)
    if s.startswith("gmm-"):
        return _gmm_teacher(s)
    if s == "digits":
        return _pipeline_teacher(DIGITS_TEACHER, name="digits")
    if s == "digits-sr":
        from .sr import DIGITS_SR_TEACHER

        return _pipeline_teacher(DIGITS_SR_TEACHER, name="digits-sr")
    if s == "sounds":  # the built-in audio teacher (mel spectrograms of synthetic sounds)
        from .sounds import load_sounds_teacher

        return load_sounds_teacher()
    from .clips import is_video_teacher_folder, load_clips_teacher

    if s == "digit-clips" or is_video_teacher_folder(s):  # video (UNet3DConditionModel): the built-in one or a folder
        _refuse_foreign_options(text_options, s)
        return load_clips_teacher() if s == "digit-clips" else load_clips_teacher(Path(s).expanduser(), name=s)
    path = Path(s).expanduser()
    name = str(path)
    if not path.exists():
        from .hub import is_hub_id, resolve_hub_teacher

        if not is_hub_id(s):
            raise TeacherError(
                f"teacher {s!r} is neither a built-in teacher (digits, digits-sr, sounds, digit-clips, gmm-ring8, gmm-ring8-unbalanced, gmm-grid25), "
                "an existing path, nor a Hugging Face Hub id (owner/name); point teacher: (or --teacher) at your local "
                "diffusers pipeline folder"
            )
        path, name = resolve_hub_teacher(s, allow_hub), s
    if (path / "model_index.json").is_file():
        from .sd import component_class, is_text_to_video, load_text_to_image_teacher, read_model_index

        index = read_model_index(path)
        from .upscaler import UPSCALER_OPTIONS, is_upscaler, load_upscaler_teacher

        if is_upscaler(index):  # StableDiffusionUpscalePipeline: image-conditioned, in latent space
            _refuse_foreign_options(text_options, name, keep=UPSCALER_OPTIONS)
            return load_upscaler_teacher(path, name=name, **text_options)
        from .audioldm import AUDIO_OPTIONS, is_audioldm, load_audioldm_teacher

        if is_audioldm(index):  # AudioLDMPipeline: text-to-audio, latents of mel spectrograms
            _refuse_foreign_options(text_options, name, keep=AUDIO_OPTIONS)
            return load_audioldm_teacher(path, name=name, **text_options)
        _refuse_foreign_options(text_options, name, keep=VIDEO_OPTIONS if is_text_to_video(index) else ())
        if component_class(index, "unet") == "UNet2DConditionModel" or is_text_to_video(index):
            return load_text_to_image_teacher(path, name=name, **text_options)
        if component_class(index, "transformer") == "SD3Transformer2DModel":
            from .sd3 import load_sd3_teacher

            return load_sd3_teacher(path, name=name, **text_options)
    _refuse_foreign_options(text_options, name)
    return _pipeline_teacher(path, name=name)


#: Loader options only text-to-video folders take (checked by the text-to-image loader that loads them).
VIDEO_OPTIONS = ("num_frames",)


def _refuse_foreign_options(options: dict, name: str, keep: tuple[str, ...] = ()) -> None:
    """Drop from ``options`` the options only some teachers take (the SD x4 upscaler's ``prompt`` and
    ``noise_level``, text-to-video's ``num_frames``, AudioLDM's ``audio_length_in_s``), all but ``keep``; refuse
    any of them that was set."""
    from .audioldm import AUDIO_OPTIONS
    from .upscaler import UPSCALER_OPTIONS

    for keys, what in ((UPSCALER_OPTIONS, "options of SD x4 upscaler teachers"), (VIDEO_OPTIONS, "an option of text-to-video teachers"),
                       (AUDIO_OPTIONS, "an option of text-to-audio (AudioLDM) teachers")):
        given = sorted(k for k in keys if k not in keep and options.pop(k, None) is not None)
        if given:
            raise TeacherError(f"{', '.join(given)}: {what}; {name} is not one")

def load_unet_and_schedule(path: Path, unet_class: type) -> tuple[nn.Module, dict[str, Any], NoiseSchedule, dict[str, Any]]:
    """A pixel pipeline folder's denoiser (``unet/``, safetensors only), its scheduler config and noise schedule,
    and its ``onestep_teacher.json`` (empty without one), every failure a :class:`TeacherError`."""
    from .sd import read_json_object, read_scheduler_config

    refuse_pickles(path / "unet")
    try:
        unet = unet_class.from_pretrained(path / "unet", use_safetensors=True)
    except (OSError, EnvironmentError) as e:
        raise TeacherError(f"{path / 'unet'}: cannot load the {unet_class.__name__} ({e})") from e
    sched_cfg = read_scheduler_config(path)
    try:
        schedule = NoiseSchedule.from_scheduler_config(sched_cfg)
    except ConfigError as e:
        raise TeacherError(f"{path / 'scheduler'}: {e}") from e
    meta_file = path / "onestep_teacher.json"
    return unet, sched_cfg, schedule, read_json_object(meta_file) if meta_file.exists() else {}



def _pipeline_teacher(path: Path, name: str) -> Teacher:
    from diffusers import UNet2DModel

    from .sd import read_model_index

    if not path.is_dir():
        raise TeacherError(f"teacher path {path} is not a folder (expected a diffusers pipeline folder)")
    if not (path / "model_index.json").exists() and (path / "config.json").is_file():
        raise TeacherError(
            f"{path} is a single diffusers model (config.json), not a pipeline folder: point the teacher at the "
            "folder holding model_index.json, unet/ and scheduler/"
        )
    index = read_model_index(path)
    for part in ("unet", "scheduler"):
        if part not in index or not (path / part).is_dir():
            raise TeacherError(f"{path}: the pipeline has no '{part}' component (need unet and scheduler)")
    unet_class = index["unet"][1] if isinstance(index["unet"], list) else str(index["unet"])
    if unet_class != "UNet2DModel":
        raise TeacherError(
            f"{path}: unet is a {unet_class}; this loader handles UNet2DModel pipelines "
            "(text-to-image pipelines load through the text-to-image teacher)"
        )
    unet, sched_cfg, schedule, meta = load_unet_and_schedule(path, UNet2DModel)
    cfg = unet.config
    if "conditioning" in meta:
        conditioning = conditioning_from_dict(meta["conditioning"])
    elif cfg.num_class_embeds:
        # Convention without metadata: the last class embedding is the null class.
        conditioning = Conditioning("class", cfg.num_class_embeds - 1, cfg.num_class_embeds - 1)
    else:
        conditioning = Conditioning("none")
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size, cfg.sample_size)
    real_data = _digits_sampler() if meta.get("data") == "digits" else None
    channels = cfg.in_channels
    if conditioning.kind == "image":  # the condition is concatenated to the input: samples have out_channels
        from .sr import image_teacher_parts

        conditioning, real_data = image_teacher_parts(meta, path)
        channels = cfg.out_channels
    clip = meta.get("clip_sample", 1.0 if sched_cfg.get("clip_sample", False) else None)
    return Teacher(
        name=name,
        backbone=unet,
        schedule=schedule,
        prediction_type=sched_cfg.get("prediction_type", "epsilon"),
        conditioning=conditioning,
        sample_shape=(channels, *size),
        guidance_scale=float(meta.get("guidance_scale", 1.0)),
        clip=clip,
        sha256=_sha256_of(list((path / "unet").glob("*.safetensors"))),
        real_data=real_data,
        meta=meta,
    )


def _digits_sampler() -> RealSampler:
    from ..digits import digits_dataset

    x_all, y_all = digits_dataset()

    def draw(n: int, generator: torch.Generator) -> tuple[torch.Tensor, Cond]:
        idx = torch.randint(0, len(x_all), (n,), generator=generator)
        return x_all[idx], y_all[idx]

    return draw


def _gmm_teacher(name: str) -> Teacher:
    from .gmm import GMM_SCHEDULER_CONFIG, GaussianMixtureScore, gmm_mixture, gmm_student

    means, stds, weights = gmm_mixture(name)
    schedule = NoiseSchedule.from_scheduler_config(GMM_SCHEDULER_CONFIG)
    backbone = GaussianMixtureScore(means, stds, weights, schedule.alphas_cumprod)

    def draw(n: int, generator: torch.Generator) -> tuple[torch.Tensor, Cond]:
        return backbone.sample(n, generator=generator)[0], None

    definition = json.dumps({"means": means.tolist(), "stds": stds.tolist(), "weights": weights.tolist()})
    return Teacher(
        name=name,
        backbone=backbone,
        schedule=schedule,
        prediction_type="epsilon",
        conditioning=Conditioning("none"),
        sample_shape=(2,),
        guidance_scale=1.0,
        clip=None,
        sha256=hashlib.sha256(definition.encode()).hexdigest(),
        real_data=draw,
        student_factory=lambda: gmm_student(name),
        student_prediction_type="v_prediction",
        analytic=True,
        meta={"mixture": name},
    )


__all__ = [
    "ASSETS",
    "DIGITS_TEACHER",
    "PICKLE_SUFFIXES",
    "RealSampler",
    "Teacher",
    "load_teacher",
    "refuse_pickles",
    "save_unet_teacher",
]
