"""One-step and K-step sampling of a student generator (plain functions)."""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from onestep.conditioning import Cond, Conditioning, index_cond
from onestep.denoiser import Denoiser

from .noise import per_sample_noise, seed_generators


class SampleSpec(Protocol):
    """What sampling needs to know about a model: a teacher or a loaded student has these."""

    sample_shape: tuple[int, ...]
    conditioning: Conditioning
    clip: float | None


def student_sample(
    generator: Denoiser,
    timesteps: list[int],
    noise: torch.Tensor,
    cond: Cond = None,
    renoise: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
    clip: float | None = None,
) -> torch.Tensor:
    """Run a student through ``timesteps``: predict x0, re-noise it to the next timestep, repeat.

    The first step takes pure noise labelled ``timesteps[0]`` (as in training). Between
    steps ``x = a_next x0 + s_next e`` with fresh ``e = renoise(shape)``. Returns the last
    x0 prediction. ``len(timesteps)`` model calls, no more.
    """
    if hasattr(generator, "trajectory_sample"):  # students with their own rule between steps (CTM's gamma-sampling)
        return generator.trajectory_sample(timesteps, noise, cond, renoise=renoise, clip=clip)
    x = noise
    n = x.shape[0]
    schedule = generator.schedule if hasattr(generator, "schedule") else generator.module.schedule
    for i, t in enumerate(timesteps):
        tt = torch.full((n,), int(t), dtype=torch.long, device=x.device)
        x0 = generator(x, tt, cond)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if i == len(timesteps) - 1:
            return x0
        nxt = torch.full((n,), int(timesteps[i + 1]), dtype=torch.long, device=x.device)
        if getattr(generator, "ddim_between_steps", False):
            # Segment consistency students (MLCM) move along the DDIM line: no fresh noise.
            x = schedule.add_noise(x0, schedule.eps_from_x0(x0, x, tt), nxt)
            continue
        if renoise is None:
            raise ValueError("K-step sampling needs a renoise function for the fresh noise between steps")
        x = schedule.add_noise(x0, renoise(tuple(x.shape)), nxt)
    return x


def _by_seed(
    spec: SampleSpec,
    seeds: list[int] | range,
    labels: list[int] | None,
    device: torch.device | str,
    batch_size: int,
    run: Callable[[torch.Tensor, Cond, list[torch.Generator]], torch.Tensor],
) -> tuple[torch.Tensor, Cond]:
    """Call ``run(noise, cond, generators)`` over batches; each sample's noise comes from its own seed."""
    seeds = list(seeds)
    cond_all = spec.conditioning.from_labels(labels if labels is not None else [0] * len(seeds), device)
    outs = []
    for i in range(0, len(seeds), batch_size):
        gens = seed_generators(seeds[i : i + batch_size])
        noise = per_sample_noise(gens, spec.sample_shape, device)
        cond = index_cond(cond_all, slice(i, i + len(gens)))
        outs.append(run(noise, cond, gens).cpu())
    return torch.cat(outs), cond_all


@torch.no_grad()
def sample_student_from_seeds(
    generator: Denoiser,
    spec: SampleSpec,
    timesteps: list[int],
    seeds: list[int] | range,
    labels: list[int] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> tuple[torch.Tensor, Cond]:
    """Sample one image per seed. Each sample's starting and re-noising noise comes from its own
    seed, so the result for a seed does not depend on the batch size."""

    def run(noise, cond, gens):
        renoise = lambda shape: per_sample_noise(gens, shape[1:], device)  # noqa: E731
        return student_sample(generator, timesteps, noise, cond, renoise=renoise, clip=spec.clip)

    return _by_seed(spec, seeds, labels, device, batch_size, run)


@torch.no_grad()
def teacher_sample_from_seeds(
    teacher: Denoiser,
    spec: SampleSpec,
    seeds: list[int] | range,
    labels: list[int] | None = None,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM samples of a teacher, one per seed (same per-seed noise as :func:`sample_student_from_seeds`)."""
    from .ddim import ddim_sample

    def run(noise, cond, gens):
        uncond = spec.conditioning.null(noise.shape[0], device)
        return ddim_sample(
            teacher, noise, cond, uncond, num_steps=num_steps, guidance_scale=guidance_scale,
            clip=spec.clip, generators=gens, progress=progress,
        )

    return _by_seed(spec, seeds, labels, device, batch_size, run)[0]


@torch.no_grad()
def sample_text_student(
    student,
    prompts: list[str],
    seeds: list[int] | range,
    steps: int | None = None,
    negative_prompt: str | None = None,
    nasa_alpha: float = 0.0,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    decode: bool = True,
) -> torch.Tensor:
    """Images of a text-to-image student (a loaded :class:`onestep.export.Student`), one per seed;
    sample ``i`` gets ``prompts[i % len(prompts)]``. A negative prompt acts through NASA
    (:mod:`onestep.samplers.nasa`) with scale ``nasa_alpha``: a one-step student has no guidance
    branch to put it in. Returns images in ``[-1, 1]`` (or the latents with ``decode=False``)."""
    from onestep.errors import ConfigError

    from .nasa import nasa

    if student.conditioning.kind != "text":
        raise ConfigError("this student is not text-to-image: it takes no prompts")
    if not prompts:
        raise ConfigError("a text-to-image student needs at least one prompt")
    if negative_prompt and not nasa_alpha:
        raise ConfigError("a one-step student takes a negative prompt through NASA: set nasa_alpha > 0 (0.1 for SD1.5, 0.2 for SD2.1)")
    if nasa_alpha and not negative_prompt:
        raise ConfigError("nasa_alpha needs a negative prompt")
    seeds = list(seeds)
    labels = [prompts[i % len(prompts)] for i in range(len(seeds))]
    negative = student.conditioning.encode([negative_prompt]) if nasa_alpha else None
    if negative is not None and "encoder_hidden_states" not in negative:
        raise ConfigError("NASA acts on the UNet's cross-attention to the prompt, and this student's UNet (AudioLDM) attends to "
                          "no prompt tokens: sample it without a negative prompt")
    negative = negative["encoder_hidden_states"].to(device) if negative is not None else None
    with nasa(student.generator.backbone, negative, nasa_alpha):
        x, _ = sample_student_from_seeds(student.generator, student, student.timesteps_for(steps), seeds, labels, device, batch_size)
    if not decode or student.vae is None:
        return x
    return torch.cat([student.decode(x[i : i + batch_size].to(device)).clamp(-1, 1).cpu() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def sample_upscaler_student(
    student,
    lowres: torch.Tensor,
    seeds: list[int] | range,
    steps: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    decode: bool = True,
) -> torch.Tensor:
    """Images of an SD x4 upscaler student (a loaded :class:`onestep.export.Student` of an upscaler teacher),
    one per seed; sample ``i`` upscales ``lowres[i % len(lowres)]`` (``(N, 3, h, w)`` in [-1, 1]).

    Each sample's generator draws, in the pipeline's order, the noise added to its low-res image
    (``low_res_scheduler`` at the student's noise level) and then its starting latents (and any
    re-noising), so ``StableDiffusionUpscalePipeline`` given ``generator=[torch.Generator().manual_seed(s)
    for s in seeds]`` (and ``guidance_scale=1.0``) gives the same latents. Returns images in ``[-1, 1]``
    (or the latents with ``decode=False``)."""
    from onestep.errors import ConfigError

    cond = student.conditioning
    if not hasattr(cond, "condition"):
        raise ConfigError("this student is not an SD x4 upscaler student")
    if lowres.ndim != 4 or lowres.shape[1] != cond.image_channels or tuple(lowres.shape[-2:]) != tuple(student.sample_shape[-2:]):
        raise ConfigError(
            f"the low-res images must be (N, {cond.image_channels}, {student.sample_shape[-2]}, {student.sample_shape[-1]}) "
            f"for this student (the latents' size), got {tuple(lowres.shape)}"
        )
    seeds, timesteps = list(seeds), student.timesteps_for(steps)
    images = lowres[[i % len(lowres) for i in range(len(seeds))]].float()
    outs = []
    for i in range(0, len(seeds), batch_size):
        gens = seed_generators(seeds[i : i + batch_size])
        img = images[i : i + len(gens)].to(device)
        c = cond.condition(img, per_sample_noise(gens, tuple(img.shape[1:]), device))
        z = per_sample_noise(gens, student.sample_shape, device)
        renoise = lambda shape: per_sample_noise(gens, shape[1:], device)  # noqa: E731
        x = student_sample(student.generator, timesteps, z, c, renoise=renoise, clip=student.clip)
        outs.append((student.decode(x).clamp(-1, 1) if decode else x).cpu())
    return torch.cat(outs)


def on_lowres(spec, lowres: torch.Tensor, n: int):
    """``spec`` (a pixel super-resolution student or teacher) conditioned on low-res images ``(M, C, h, w)`` in
    [-1, 1], bicubic-upsampled to its sample size as training read them, and the labels of ``n`` samples:
    sample ``i`` on image ``i mod M``."""
    import dataclasses

    cond = spec.conditioning
    images = cond.from_lowres(lowres.float(), tuple(spec.sample_shape[-2:]))["image"]
    return dataclasses.replace(spec, conditioning=cond.with_images(images)), [i % len(lowres) for i in range(n)]


def super_resolve(
    student, lowres: torch.Tensor, seeds: list[int] | range, steps: int | None = None, device: torch.device | str = "cpu", batch_size: int = 64
) -> torch.Tensor:
    """High-res images of an image-conditioned (super-resolution) student, one per seed: sample ``i``
    super-resolves ``lowres[i % len(lowres)]`` (``(N, C, h, w)`` in [-1, 1]). An SD x4 upscaler student
    goes through :func:`sample_upscaler_student` (decoded, its low-res images noised per seed); a pixel
    student (``digits-sr``) reads them bicubic-upsampled to its sample size. Returns ``[-1, 1]`` images."""
    from onestep.errors import ConfigError

    cond = student.conditioning
    if cond.kind != "image":
        raise ConfigError(f"this student is conditioned on {cond.kind!r}, not on a low-res image")
    seeds = list(seeds)
    if student.meta.get("upscaler") is not None:
        return sample_upscaler_student(student, lowres, seeds, steps, device=device, batch_size=min(batch_size, 16))
    if lowres.ndim != 4 or lowres.shape[1] != cond.image_channels:
        raise ConfigError(f"low-res images must be (N, {cond.image_channels}, h, w), got {tuple(lowres.shape)}")
    spec, labels = on_lowres(student, lowres, len(seeds))
    x, _ = sample_student_from_seeds(student.generator, spec, student.timesteps_for(steps), seeds, labels, device=device, batch_size=batch_size)
    return x.clamp(-1, 1).cpu()
