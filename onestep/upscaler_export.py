"""Student folders of SD x4 upscaler teachers: a complete ``StableDiffusionUpscalePipeline`` folder.

:func:`write_upscaler_pipeline` copies the teacher's ``vae/``, ``text_encoder/``, ``tokenizer/`` and
``low_res_scheduler/`` beside the student UNet (``unet/``), writes a scheduler for the student's own
timesteps (the ``LCMScheduler`` of :func:`onestep.pipeline.student_scheduler`: ``set_timesteps(K)``
gives them, each step predicts x0 and the last returns it) and ``model_index.json`` (the teacher's,
``max_noise_level`` kept). Plain diffusers then samples the student::

    pipe = StableDiffusionUpscalePipeline.from_pretrained(folder)
    pipe(prompt, image=low_res, num_inference_steps=K, guidance_scale=1.0, noise_level=<onestep.json
         upscaler.noise_level>, generator=[torch.Generator().manual_seed(s) for s in seeds])

``guidance_scale=1.0`` matters (the pipeline's default, 9, runs the student twice with CFG, which it
was not trained for), and so does ``noise_level`` when it is not the pipeline's default 20. With the
same per-sample seeds, ``onestep sample --image`` gives the same latents: for each sample, the noise
added to the low-res image is drawn first from its generator, then the starting latents, as the
pipeline draws them. :func:`student_upscaler_parts` reads the conditioning and VAE back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import StudentFormatError
from .files import read_json_object
from .pipeline import write_student_index
from .teachers.upscaler import DEFAULT_MAX_NOISE_LEVEL, UpscalerConditioning, upscaler_parts
from .teachers.latents import LatentVAE

#: what a student folder copies from its teacher's (the UNet and the scheduler are the student's own)
COPIED_PARTS = ("vae", "text_encoder", "tokenizer", "low_res_scheduler")
OPTIONAL_PARTS = ("safety_checker", "feature_extractor", "watermarker")


def upscaler_call(meta: dict[str, Any]) -> str:
    """The diffusers call that samples an upscaler student folder (for ``onestep.json`` and the model card)."""
    up = meta["upscaler"]
    return (
        f"StableDiffusionUpscalePipeline.from_pretrained(folder)(prompt={up['prompt']!r}, image=low_res, "
        f"num_inference_steps={len(meta['timesteps'])}, guidance_scale=1.0, noise_level={up['noise_level']}, "
        "generator=[torch.Generator().manual_seed(s) for s in seeds])"
    )


def write_upscaler_pipeline(out: Path, teacher, meta: dict[str, Any]) -> None:
    """Make the student folder ``out`` (its UNet already in ``unet/``) a ``StableDiffusionUpscalePipeline``
    folder: the teacher's VAE, text encoder, tokenizer and low-res scheduler, a scheduler for the
    student's timesteps (unless one is there) and ``model_index.json``; records the teacher's upscaler
    settings and the diffusers call in ``meta["upscaler"]``."""
    meta["upscaler"] = dict(teacher.meta["upscaler"])
    meta["upscaler"]["diffusers_call"] = upscaler_call(meta)
    src = Path(teacher.meta["pipeline_folder"])
    index = read_json_object(src / "model_index.json", StudentFormatError)
    max_level = int(meta["upscaler"].get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL))
    write_student_index(src, out, index, list(COPIED_PARTS), meta, "unet", "UNet2DConditionModel", list(OPTIONAL_PARTS), {"max_noise_level": max_level})


def student_upscaler_parts(path: Path, meta: dict[str, Any], device: torch.device | str = "cpu") -> tuple[UpscalerConditioning, LatentVAE]:
    """The conditioning (prompt, noise level, low-res scheduler; no images: give them) and the VAE of an
    upscaler student folder, from its own copies of the teacher's parts."""
    for part in COPIED_PARTS:
        if not (path / part).is_dir():
            raise StudentFormatError(f"{path}: an SD x4 upscaler student needs {part}/ (copied from the teacher at export)")
    up = meta["upscaler"]
    if not isinstance(up, dict) or not isinstance(up.get("noise_level"), int) or not isinstance(up.get("prompt", ""), str):
        raise StudentFormatError(f"{path / 'onestep.json'}: upscaler must be an object with an integer noise_level and a prompt")
    side = int(meta["sample_shape"][-1]) * int(meta["conditioning"].get("scale", 4))
    return upscaler_parts(path, up.get("prompt", ""), up["noise_level"], int(up.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)), side, device)


__all__ = ["COPIED_PARTS", "student_upscaler_parts", "upscaler_call", "write_upscaler_pipeline"]
