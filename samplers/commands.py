"""``onestep sample``: what the command does, called by :mod:`onestep.cli`: sample a student folder
into PNGs and ``samples.npz``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from onestep.audio import audio_meta_of, write_sounds
from onestep.errors import OnestepError
from onestep.export import load_student
from onestep.runtime import default_device
from onestep.viz import save_clip_gifs, save_samples_picture, to_uint8

from .student import sample_student_from_seeds, sample_text_student, super_resolve


def sample_to_folder(
    student_dir: str | Path,
    out: str | Path,
    num_samples: int,
    steps: int | None = None,
    seed: int = 0,
    label: int | None = None,
    batch_size: int = 256,
    prompts: list[str] | None = None,
    negative_prompt: str | None = None,
    nasa_alpha: float = 0.0,
    device: str | None = None,
    gamma: float | None = None,
    nu: float | None = None,
    images: str | Path | None = None,
) -> Path:
    """Sample ``num_samples`` images (or 2D points) from a student; sample ``i`` uses seed ``seed + i``.

    Text-to-image students take ``prompts`` (sample ``i`` gets ``prompts[i % len(prompts)]``) and
    optionally a ``negative_prompt`` applied with NASA at scale ``nasa_alpha``; their latents are
    decoded with the student folder's VAE, and ``samples.npz`` holds the images.

    Writes ``samples.npz`` (``samples``: raw float32, ``labels``, ``seeds``), one PNG per image
    (``sample_00000.png``, ...) and ``grid.png`` (a scatter plot for 2D students); audio (mel-spectrogram)
    students also get ``sample_00000.wav``, ... (:func:`onestep.audio.write_sounds`); video students one looping
    ``clip_00000.gif`` per clip instead of the PNGs, and ``grid.png`` one clip a row. ``gamma`` and ``nu``
    override a CTM student's gamma- and nu-sampling (:mod:`onestep.ctm`). Image-conditioned
    (super-resolution) students take ``images``, a folder of low-resolution images (or one image file):
    sample ``i`` super-resolves image ``i mod n`` (files sorted by name); ``labels`` in ``samples.npz``
    are those indices.
    """
    device = torch.device(device) if device else default_device()
    student = load_student(student_dir, device=device)
    timesteps = student.timesteps_for(steps)
    cond = student.conditioning
    if gamma is not None or nu is not None:
        if not hasattr(student.generator, "trajectory_sample"):
            raise OnestepError("--gamma and --nu are for CTM students (method ctm)")
        if gamma is not None and not 0 <= gamma <= 1:
            raise OnestepError(f"--gamma must lie in [0, 1] (got {gamma})")
        student.generator.gamma = student.generator.gamma if gamma is None else float(gamma)
        student.generator.nu = student.generator.nu if nu is None else float(nu)
    if cond.kind != "text" and (prompts or negative_prompt or nasa_alpha):
        raise OnestepError("--prompt, --negative-prompt and --nasa-alpha are for text-to-image students")
    if (images is not None) != (cond.kind == "image"):
        raise OnestepError("this student is image-conditioned: give --image FOLDER of low-res images" if images is None
                           else "--image is for image-conditioned (super-resolution) students")
    if cond.kind == "image":
        if label is not None:
            raise OnestepError("--class given, but this student is image-conditioned: use --image")
        lowres = read_lowres_images(images, cond.image_channels)
        labels = [i % len(lowres) for i in range(num_samples)]
    elif cond.kind == "text":
        if label is not None:
            raise OnestepError("--class given, but this student is text-to-image: use --prompt")
        if not prompts:
            raise OnestepError("this student is text-to-image: give --prompt TEXT (or --prompts FILE)")
        labels = None
    elif cond.kind == "class":
        if label is not None and not 0 <= label < cond.num_classes:
            raise OnestepError(f"--class must lie in [0, {cond.num_classes - 1}] (got {label})")
        labels = [label] * num_samples if label is not None else [i % cond.num_classes for i in range(num_samples)]
    else:
        if label is not None:
            raise OnestepError("--class given, but this student is unconditional")
        labels = None
    seeds = list(range(seed, seed + num_samples))
    if cond.kind == "text":
        x = sample_text_student(
            student, prompts, seeds, steps, negative_prompt, nasa_alpha, device=device, batch_size=min(batch_size, 16)
        )
    elif cond.kind == "image":  # super-resolution (an SD x4 upscaler: decoded, as StableDiffusionUpscalePipeline gives them for these seeds)
        x = super_resolve(student, lowres, seeds, steps, device=device, batch_size=batch_size)
    else:
        x, _ = sample_student_from_seeds(student.generator, student, timesteps, seeds, labels, device=device, batch_size=batch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        out / "samples.npz",
        samples=x.float().numpy(),
        labels=np.asarray(labels if labels is not None else [-1] * num_samples),
        seeds=np.asarray(seeds),
    )
    if x.ndim == 4:
        from PIL import Image

        for i, img in enumerate(to_uint8(x)):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out / f"sample_{i:05d}.png")
    if x.ndim == 5:  # video: each clip as a looping GIF
        save_clip_gifs(x, out)
    save_samples_picture(x, out / "grid.png", title=f"{student.meta.get('method', '')} student, {len(timesteps)} step(s)")
    audio = audio_meta_of(student.meta)
    if audio is not None:  # mel-spectrogram students: also sample_00000.wav, ... (the toy vocoder, or an AudioLDM student's own)
        write_sounds(x, out, audio=audio, vae=student.vae)
    (out / "sampling.json").write_text(
        json.dumps(
            {"student": str(student.path), "timesteps": timesteps, "seeds": [seeds[0], seeds[-1]], "label": label,
             "prompts": prompts, "negative_prompt": negative_prompt, "nasa_alpha": nasa_alpha},
            indent=2,
        )
        + "\n"
    )
    return out


def read_lowres_images(path: str | Path, channels: int) -> torch.Tensor:
    """The images of a folder (sorted by name) or one image file as ``(N, channels, h, w)`` floats in [-1, 1]
    (grey for one channel, RGB for three); all must have one size."""
    from PIL import Image

    from onestep.files import IMAGE_SUFFIXES

    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
    if not files:
        raise OnestepError(f"--image {path}: no image files there")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise OnestepError(f"this student's condition has {channels} channels; --image reads grey (1) or RGB (3) images")
    arrays = [np.asarray(Image.open(f).convert(mode), dtype=np.float32) for f in files]
    if len({a.shape for a in arrays}) > 1:
        raise OnestepError(f"--image {path}: the images differ in size; give low-res images of one size")
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
    return x / 127.5 - 1
