"""SD x4 upscaler teachers: diffusers' ``StableDiffusionUpscalePipeline`` folders on disk, as
image-conditioned latent teachers (super-resolution; TAD-SR distils them).

The layout, as ``pipeline_stable_diffusion_upscale.py`` runs it:

- the low-res RGB image, in [-1, 1], sits at the *latent* resolution ``(h, w)``; the VAE decodes the
  ``(4, h, w)`` latents to ``(3, f h, f w)`` pixels (``f = 2 ** (len(vae.block_out_channels) - 1)``, 4
  for the real upscaler), so the condition is not upsampled (``upsample=False``, ``scale = f``);
- before it is concatenated to the latents (``unet.in_channels = 4 + 3 = 7``) the low-res image is
  noised by ``low_res_scheduler.add_noise(image, noise, noise_level)`` with fresh noise, and the UNet
  takes ``class_labels = noise_level`` (default 20, at most ``max_noise_level``);
- the prompt embedding (``encoder_hidden_states``, the CLIP text encoder's last hidden state) and the
  noise level are the same for a whole batch: the ``fixed`` entries of :class:`UpscalerConditioning`;
- the VAE's scaling factor is 0.08333: the pipeline sets it to that whatever the VAE's config says,
  and so does :func:`upscaler_parts`.

The teacher is unguided (guidance scale 1, no unconditional branch): TAD-SR samples its teacher
without guidance. A condition is ``{"image": noised low-res, "class_labels": (B,) noise level,
"encoder_hidden_states": (B, L, D)}``; :func:`onestep.denoiser.call_backbone` concatenates the image and
passes the rest as keywords, exactly the pipeline's ``unet(cat([latents, image]), t,
encoder_hidden_states=..., class_labels=noise_level)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..conditioning import ImageConditioning, cond_to
from ..errors import ConfigError, TeacherError
from ..files import IMAGE_SUFFIXES
from ..schedule import NoiseSchedule
from .base import Teacher, _sha256_of, dtype_option
from .latents import LatentVAE, encode_image_folder, load_image
from .sd import read_json_object, read_model_index, read_scheduler_config, require_parts
from .text import PromptEncoder


def _warn(msg: str) -> None:
    """A warning through accelerate's logger (main process only), or plain logging before accelerate starts."""
    from accelerate.logging import get_logger

    try:
        get_logger(__name__).warning(msg)
    except RuntimeError:  # no accelerate state yet (a teacher loaded outside a trainer)
        import logging

        logging.getLogger(__name__).warning(msg)

PIPELINE_CLASS = "StableDiffusionUpscalePipeline"
UPSCALER_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler")
#: the pipeline's defaults: ``__call__(noise_level=20)``, ``__init__(max_noise_level=350)``
DEFAULT_NOISE_LEVEL = 20
DEFAULT_MAX_NOISE_LEVEL = 350
#: the loader options only an upscaler takes (:func:`onestep.teachers.load_teacher` refuses them elsewhere)
UPSCALER_OPTIONS = ("prompt", "noise_level")
#: the VAE scaling factor the pipeline forces (``vae.register_to_config(scaling_factor=0.08333)``)
UPSCALER_SCALING_FACTOR = 0.08333


def is_upscaler(index: dict[str, Any]) -> bool:
    """A ``model_index.json`` of an SD x4 upscaler pipeline (its class, or a ``low_res_scheduler`` part)."""
    return index.get("_class_name") == PIPELINE_CLASS or "low_res_scheduler" in index


@dataclass
class UpscalerConditioning(ImageConditioning):
    """The SD x4 upscaler's condition: a low-res RGB image at the latents' size, noised by the
    ``low_res_scheduler`` at ``noise_level`` every time a condition is made (fresh noise, as the pipeline
    does), plus the fixed prompt embedding and noise level (``class_labels``).

    ``images`` are the *clean* low-res images in [-1, 1]; :meth:`condition` makes a condition from
    low-res images and the noise to add to them, :meth:`sample` draws both with a generator,
    :meth:`from_labels` picks images by index (noise from a generator seeded 0: previews repeat).

    Attributes:
        noise_level: the low-res image's noise level (``class_labels``).
        prompt: the prompt whose embedding is in ``fixed``.
        low_res_scheduler: the pipeline's ``DDPMScheduler`` that noises the low-res image.
    """

    image_channels: int = 3
    upsample: bool = False
    noise_level: int = DEFAULT_NOISE_LEVEL
    prompt: str = ""
    low_res_scheduler: Any = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.upsample:
            raise ConfigError("the SD x4 upscaler's low-res image sits at the latents' size: upsample must be false")
        if self.low_res_scheduler is None:
            raise ConfigError("an upscaler conditioning needs the pipeline's low_res_scheduler")

    def noised(self, lowres: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``low_res_scheduler.add_noise(lowres, noise, noise_level)``: the pipeline's own call."""
        level = torch.tensor([self.noise_level], dtype=torch.long, device=lowres.device)
        return self.low_res_scheduler.add_noise(lowres.float(), noise.to(lowres.device).float(), level)

    def condition(self, lowres: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The condition of clean low-res images ``(B, 3, h, w)`` in [-1, 1] with ``noise`` added to them."""
        return super()._with_fixed(self.noised(lowres, noise))

    def _with_fixed(self, img: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        noise = torch.randn(img.shape, generator=generator)
        return self.condition(img, noise)

    def _need_images(self) -> torch.Tensor:
        if self.images is None:
            raise ConfigError(
                "this SD x4 upscaler conditioning has no low-res images: training makes them from real_images: (a folder "
                "of high-res images); sampling takes them from --image"
            )
        return self.images

    def degrade(self, hr: torch.Tensor) -> torch.Tensor:
        """Low-res images of high-res images ``hr`` in [-1, 1]: bicubic, antialiased, ``1 / scale`` the size."""
        import torch.nn.functional as F

        size = (hr.shape[-2] // self.scale, hr.shape[-1] // self.scale)
        return F.interpolate(hr.float(), size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)

    def from_lowres(self, lowres: torch.Tensor, size=None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The condition of low-res images (they stay at their size), noised with noise from ``generator``."""
        return self._with_fixed(lowres.float(), generator)

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu"):
        images = self._need_images()
        idx = torch.randint(0, len(images), (n,), generator=generator)
        return cond_to(self._with_fixed(images[idx], generator), device)

    def from_labels(self, labels, device="cpu"):
        images = self._need_images()
        idx = torch.as_tensor(labels, dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(images)):
            raise ConfigError(f"image indices must lie in [0, {len(images) - 1}]")
        return cond_to(self._with_fixed(images[idx], torch.Generator().manual_seed(0)), device)


def upscaler_parts(
    folder: Path, prompt: str, noise_level: int, max_noise_level: int, size: int | None = None, device: torch.device | str = "cpu",
    text_dtype: torch.dtype = torch.float32, text_compute: str = "storage",
) -> tuple[UpscalerConditioning, LatentVAE]:
    """The conditioning (prompt embedded, noise level checked) and the VAE of an upscaler pipeline folder
    (a teacher's, or a student's copy of its parts). ``size``: the high-res side in pixels (for the
    record only: the SD text encoder takes no image size)."""
    from diffusers import AutoencoderKL, DDPMScheduler

    if not isinstance(noise_level, int) or isinstance(noise_level, bool) or not 0 <= noise_level <= max_noise_level:
        raise ConfigError(f"noise_level must be an integer in [0, {max_noise_level}] (the pipeline's max_noise_level), got {noise_level!r}")
    if not isinstance(prompt, str):
        raise ConfigError(f"the upscaler's prompt must be a string (got {prompt!r})")
    try:
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)
    except (OSError, ValueError) as e:
        raise TeacherError(f"{folder}: cannot load the VAE ({e})") from e
    if getattr(vae.config, "scaling_factor", None) != UPSCALER_SCALING_FACTOR:  # what the pipeline's __init__ does
        _warn(f"{folder / 'vae'}: scaling_factor {vae.config.scaling_factor} set to {UPSCALER_SCALING_FACTOR}, as the upscale pipeline does")
        vae.register_to_config(scaling_factor=UPSCALER_SCALING_FACTOR)
    low_cfg_file = folder / "low_res_scheduler" / "scheduler_config.json"
    if not low_cfg_file.is_file():
        raise TeacherError(f"{folder}: low_res_scheduler/scheduler_config.json is missing")
    low_cfg = {k: v for k, v in read_json_object(low_cfg_file).items() if not k.startswith("_")}
    low_res_scheduler = DDPMScheduler.from_config(low_cfg)
    if noise_level >= low_res_scheduler.config.num_train_timesteps:
        raise ConfigError(f"noise_level {noise_level} is past the low_res_scheduler's {low_res_scheduler.config.num_train_timesteps} timesteps")
    latent_vae = LatentVAE(vae).to(device)
    side = int(size or 0) or 1
    encoder = PromptEncoder(folder, False, (side, side), device=device, dtype=text_dtype, compute=text_compute)
    emb = encoder.encode([prompt])["encoder_hidden_states"]
    encoder.release()
    conditioning = UpscalerConditioning(
        image_channels=3, scale=latent_vae.scale_factor, upsample=False, noise_level=noise_level, prompt=prompt,
        low_res_scheduler=low_res_scheduler, fixed={"encoder_hidden_states": emb, "class_labels": torch.tensor([noise_level])},
    )
    return conditioning, latent_vae


def image_files(folder: str | Path) -> list[Path]:
    """The images of a folder (sorted by name); captions are not needed (the prompt is fixed)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"real_images {folder} is not a folder (give a folder of high-res images)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"real_images {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def upscaler_real_data(folder: str | Path, conditioning: UpscalerConditioning, vae: LatentVAE, side: int, device="cpu"):
    """Paired data of a folder of high-res images: each image (resized on its short side and centre-cropped
    to ``side``) gives the target, its VAE latents (cached on disk, :func:`encode_image_folder`), and its
    condition, the image degraded to ``side / scale`` (bicubic) then noised per draw. Returns the
    conditioning over those low-res images and ``draw(n, generator) -> (latents, condition)``."""
    files = image_files(folder)
    latents = encode_image_folder([(p, "") for p in files], vae, side, device)
    lowres = torch.cat([conditioning.degrade(load_image(p, side)[None]) for p in files])
    conditioning = conditioning.with_images(lowres)

    def draw(n: int, generator: torch.Generator):
        idx = torch.randint(0, len(latents), (n,), generator=generator)
        return latents[idx], conditioning.condition(lowres[idx], torch.randn(lowres[idx].shape, generator=generator))

    return conditioning, draw


def load_upscaler_teacher(
    path: Path,
    name: str,
    prompt: str = "",
    noise_level: int = DEFAULT_NOISE_LEVEL,
    resolution: int | None = None,
    real_images: str | None = None,
    device: torch.device | str = "cpu",
    weights_dtype: torch.dtype | None = None,
    text_cache_dtype: torch.dtype | str | None = None,
    text_compute: str = "storage",
    prompts: Any = None,
    negative_prompt: str | None = None,
    **ignored: Any,
) -> Teacher:
    """Load a ``StableDiffusionUpscalePipeline`` folder as an image-conditioned latent teacher.

    Args:
        path: the pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
            ``low_res_scheduler/``, ``model_index.json`` with ``max_noise_level``).
        name: what the teacher is called.
        prompt: the one prompt every condition carries (the pipeline's ``prompt``; default empty).
        noise_level: the low-res image's noise level (the pipeline's ``noise_level``, default 20).
        resolution: the high-res side in pixels (default: the UNet's ``sample_size`` times the VAE factor);
            the low-res side is that divided by the VAE factor.
        real_images: a folder of high-res images: the paired (latents, low-res condition) data TAD-SR needs.
        device: where the text encoder and the VAE run while loading.
        weights_dtype: what the UNet's weights load in (None: float32).
        text_cache_dtype, text_compute: the text encoder's dtype and compute (see the text-to-image loader).
        prompts, negative_prompt: text-to-image options; an upscaler refuses them (one fixed ``prompt``, no guidance).
    """
    from diffusers import UNet2DConditionModel

    from .prompt_cache import cache_dtype

    if prompts is not None or negative_prompt:
        raise ConfigError(f"{path} is an SD x4 upscaler: it takes one fixed prompt (prompt:), not prompts: or negative_prompt:")
    index = read_model_index(path)
    require_parts(path, index, UPSCALER_PARTS, "SD x4 upscaler", "a StableDiffusionUpscalePipeline folder needs " + ", ".join(UPSCALER_PARTS))
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True, **dtype_option(weights_dtype))
    except (OSError, ValueError) as e:
        raise TeacherError(f"{path}: cannot load the UNet ({e})") from e
    cfg = unet.config
    if not (cfg.num_class_embeds or cfg.class_embed_type):
        raise TeacherError(f"{path}: the upscaler's UNet has no class embedding to take the noise level (class_labels)")
    sched_cfg = read_scheduler_config(path)
    schedule = NoiseSchedule.from_scheduler_config(sched_cfg)
    max_level = int(index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL))
    conditioning, vae = upscaler_parts(path, prompt, noise_level, max_level, resolution, device, cache_dtype(text_cache_dtype), text_compute)
    f, latent_channels = vae.scale_factor, int(vae.vae.config.latent_channels)
    if cfg.in_channels != latent_channels + 3 or cfg.out_channels != latent_channels:
        raise TeacherError(
            f"{path}: the UNet takes {cfg.in_channels} channels and gives {cfg.out_channels}; an upscaler's takes the "
            f"{latent_channels} latent channels plus the 3 of the low-res image and gives {latent_channels}"
        )
    side = int(resolution) if resolution else int(cfg.sample_size) * f
    if side % f:
        raise ConfigError(f"resolution {side} is not a multiple of the VAE's factor {f}")
    real_data = None
    if real_images:
        conditioning, real_data = upscaler_real_data(real_images, conditioning, vae, side, device)
    return Teacher(
        name=name,
        backbone=unet,
        schedule=schedule,
        prediction_type=sched_cfg.get("prediction_type", "epsilon"),
        conditioning=conditioning,
        sample_shape=(latent_channels, side // f, side // f),
        guidance_scale=1.0,
        clip=None,  # latents are not clamped
        sha256=_sha256_of(list((path / "unet").glob("*.safetensors"))),
        real_data=real_data,
        meta={
            "pipeline": index.get("_class_name"), "pipeline_folder": str(path.resolve()), "resolution": side,
            "upscaler": {"noise_level": noise_level, "prompt": prompt, "max_noise_level": max_level},
        },
        vae=vae,
    )


__all__ = [
    "DEFAULT_NOISE_LEVEL",
    "PIPELINE_CLASS",
    "UPSCALER_PARTS",
    "UpscalerConditioning",
    "image_files",
    "is_upscaler",
    "load_upscaler_teacher",
    "upscaler_parts",
    "upscaler_real_data",
]
