"""Flow-matching text-to-image teachers: Stable Diffusion 3 (SD3 / SD3.5-style) pipeline folders.

A teacher folder is what ``StableDiffusion3Pipeline.save_pretrained`` writes: ``model_index.json``,
``transformer/`` (an ``SD3Transformer2DModel``), ``vae/`` (``AutoencoderKL`` with a
``shift_factor``), ``text_encoder/`` + ``tokenizer/`` and ``text_encoder_2/`` + ``tokenizer_2/``
(CLIP encoders with projections), optionally ``text_encoder_3/`` + ``tokenizer_3/`` (T5), and
``scheduler/`` (``FlowMatchEulerDiscreteScheduler``). Everything loads with
``from_pretrained(path, use_safetensors=True)``; nothing reaches a hub and no remote code runs.

What differs from the UNet teachers of :mod:`onestep.teachers.sd` is small, and everything else
(cached text conditioning and prompt files, :mod:`onestep.teachers.text`; the latent VAE and
real-image latents, :mod:`onestep.teachers.latents`; the student pipeline folder,
:mod:`onestep.pipeline`) is shared with them:

- the schedule is :class:`onestep.schedule.FlowMatchSchedule` (``x_t = (1 - sigma) x_0 + sigma eps``,
  prediction type ``"flow"``, the transformer fed ``sigma * T``);
- a condition is ``encoder_hidden_states`` (the CLIP tokens of both encoders, their penultimate
  hidden states side by side, zero-padded to the T5 width, followed by the T5 tokens, or by zeros
  when the folder has no T5) and ``pooled_projections`` (both CLIP projections side by side), which
  is how ``StableDiffusion3Pipeline`` encodes prompts, so an exported student gives the same images
  in plain diffusers;
- the empty prompt is encoded like any other (SD3 does not zero it); the default guidance scale is
  the pipeline's 7.0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, TeacherError
from ..schedule import FlowMatchSchedule, NoiseSchedule
from .base import Teacher, _sha256_of, dtype_option
from .latents import LatentVAE
from .prompt_cache import cache_dtype
from .sd import component_class, read_model_index, read_scheduler_config, require_parts, text_teacher_data
from .text import PromptEncoder

SD3_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
T5_PARTS = ("text_encoder_3", "tokenizer_3")
#: ``StableDiffusion3Pipeline``'s default ``max_sequence_length``: the number of T5 tokens (or zero rows).
T5_MAX_LENGTH = 256


def is_sd3(index: dict[str, Any]) -> bool:
    return component_class(index, "transformer") == "SD3Transformer2DModel"


def sd3_parts(path: Path, index: dict[str, Any]) -> tuple[str, ...]:
    """The parts an SD3 folder holds (T5 included when ``model_index.json`` names one); raise a
    :class:`TeacherError` naming the first that is missing, or holding only pickle weights."""
    has_t5 = component_class(index, "text_encoder_3") is not None or component_class(index, "tokenizer_3") is not None
    parts = SD3_PARTS + (T5_PARTS if has_t5 else ())
    needs = f"an SD3 folder needs {', '.join(SD3_PARTS)}; {' and '.join(T5_PARTS)} are optional, but both or neither"
    return require_parts(path, index, parts, "SD3", needs)


class SD3PromptEncoder(PromptEncoder):
    """Encodes prompts as ``StableDiffusion3Pipeline.encode_prompt`` does (one prompt for all three
    encoders, no clip skip); loads its text encoders lazily.

    Args:
        folder: the pipeline folder (``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``,
            ``tokenizer_2/``; ``text_encoder_3/`` + ``tokenizer_3/`` when ``t5``).
        size: image size ``(H, W)`` in pixels (recorded only; SD3 has no size conditioning).
        joint_attention_dim: the transformer's text width (T5's ``d_model``): the CLIP tokens are
            zero-padded to it, and it sizes the zero T5 tokens when the folder has no T5.
        t5: whether the folder has a T5 encoder.
        max_sequence_length: T5 tokens per prompt (the pipeline's default 256).
        device: where the encoders run.
        dtype, compute: what the encoders' weights load in and compute in (:class:`~onestep.teachers.text.PromptEncoder`).
    """

    family = "sd3"

    def __init__(
        self,
        folder: str | Path,
        size: tuple[int, int],
        joint_attention_dim: int,
        t5: bool,
        max_sequence_length: int = T5_MAX_LENGTH,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        compute: str = "storage",
    ):
        super().__init__(folder, xl=False, size=size, device=device, dtype=dtype, compute=compute)
        self.joint_attention_dim = int(joint_attention_dim)
        self.t5 = bool(t5)
        self.max_sequence_length = int(max_sequence_length)

    @property
    def text_encoders(self) -> int:
        return 3 if self.t5 else 2

    def describe(self) -> dict[str, Any]:
        return {
            "text_encoders": self.text_encoders,
            "family": self.family,
            "joint_attention_dim": self.joint_attention_dim,
            "max_sequence_length": self.max_sequence_length,
        }

    def _components(self) -> list[tuple[str, str, type, type]]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        names = [
            ("tokenizer", "text_encoder", CLIPTokenizer, CLIPTextModelWithProjection),
            ("tokenizer_2", "text_encoder_2", CLIPTokenizer, CLIPTextModelWithProjection),
        ]
        if self.t5:
            names.append(("tokenizer_3", "text_encoder_3", T5TokenizerFast, T5EncoderModel))
        return names

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        parts = self._load()
        # Both CLIP tokenizers pad to the first one's length (the pipeline's tokenizer_max_length).
        length = parts[0][0].model_max_length
        hidden, pooled = [], []
        for tok, enc in parts[:2]:
            ids = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
            out = enc(ids.to(self.device), output_hidden_states=True)
            pooled.append(out[0])  # the projection (text_embeds)
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1).float()
        if self.t5:
            tok, enc = parts[2]
            ids = tok(
                prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                add_special_tokens=True, return_tensors="pt",
            ).input_ids
            t5 = enc(ids.to(self.device))[0].float()
        else:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim, device=clip.device)
        if clip.shape[-1] > t5.shape[-1]:
            raise TeacherError(f"{self.folder}: the CLIP embeddings ({clip.shape[-1]}) are wider than the T5 ones ({t5.shape[-1]})")
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=1).cpu(),
            "pooled_projections": torch.cat(pooled, dim=-1).float().cpu(),
        }


def load_sd3_teacher(
    path: Path, name: str, resolution: int | None = None, device: torch.device | str = "cpu",
    weights_dtype: torch.dtype | None = None, text_compute: str = "storage", **text_options,
):
    """Load an SD3 pipeline folder as a latent flow-matching :class:`~onestep.teachers.Teacher`.

    The arguments are those of :func:`onestep.teachers.sd.load_text_to_image_teacher` (``text_options``:
    ``prompts``, ``validation_prompts``, ``negative_prompt``, ``real_images``, ``cache_text_embeddings``,
    ``text_cache_dtype``; the text encoders load in that dtype and compute as ``text_compute`` says), and
    ``weights_dtype``, the transformer's.
    ``resolution`` defaults to the transformer's ``sample_size`` times the VAE factor and must be
    a multiple of the VAE factor times the patch size.
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    index = read_model_index(path)
    parts = sd3_parts(path, index)
    try:
        transformer = SD3Transformer2DModel.from_pretrained(path / "transformer", use_safetensors=True, **dtype_option(weights_dtype))
        vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
    except (OSError, ValueError) as e:
        raise TeacherError(f"{path}: cannot load the transformer or the VAE ({e})") from e
    schedule = NoiseSchedule.from_scheduler_config(read_scheduler_config(path))
    if not isinstance(schedule, FlowMatchSchedule):
        raise TeacherError(f"{path}: an SD3 folder needs a FlowMatchEulerDiscreteScheduler, not {schedule.config.get('_class_name')}")
    latent_vae = LatentVAE(vae)
    f = latent_vae.scale_factor
    patch = int(transformer.config.patch_size)
    side = int(resolution) if resolution else int(transformer.config.sample_size) * f
    if side % (f * patch):
        raise ConfigError(f"resolution {side} is not a multiple of the VAE factor times the patch size ({f} x {patch})")
    encoder = SD3PromptEncoder(
        path, (side, side), int(transformer.config.joint_attention_dim), t5="text_encoder_3" in parts, device=device,
        dtype=cache_dtype(text_options.get("text_cache_dtype")), compute=text_compute,
    )
    conditioning, real_data = text_teacher_data(encoder, latent_vae, side, device, **text_options)
    return Teacher(
        name=name,
        backbone=transformer,
        schedule=schedule,
        prediction_type="flow",
        conditioning=conditioning,
        sample_shape=(int(transformer.config.in_channels), side // f, side // f),
        guidance_scale=7.0,  # StableDiffusion3Pipeline's default
        clip=None,  # latents are not clamped
        sha256=_sha256_of(list((path / "transformer").glob("*.safetensors"))),
        real_data=real_data,
        meta={"pipeline": index.get("_class_name"), "pipeline_folder": str(path.resolve()), "sd3": True, "resolution": side},
        vae=latent_vae,
    )


__all__ = ["SD3_PARTS", "SD3PromptEncoder", "T5_MAX_LENGTH", "is_sd3", "load_sd3_teacher", "sd3_parts"]
