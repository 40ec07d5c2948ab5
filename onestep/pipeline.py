"""Student pipeline folders: what makes a text-to-image student (SD / SDXL / SD3) a complete
diffusers pipeline folder, and what reads one back.

:func:`write_pipeline_parts` copies the teacher's VAE, text encoder(s) and tokenizer(s) beside the
student network and adds a scheduler that gives the student's own timesteps (an ``LCMScheduler``
for UNet students, a ``FlowMatchEulerDiscreteScheduler`` with ``stochastic_sampling`` for SD3
ones) and ``model_index.json``, so ``DiffusionPipeline.from_pretrained(folder)`` samples the
student without onestep; :func:`student_text_parts` rebuilds the text conditioning and the VAE
from such a folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import StudentFormatError
from .files import PICKLE_SUFFIXES
from .schedule import FLOW_SCHEDULERS, NoiseSchedule
from .teachers.audioldm import AUDIOLDM_PARTS, is_audioldm, student_audio_parts
from .teachers.latents import LatentVAE
from .teachers.sd import SD_PARTS, SDXL_PARTS, is_sdxl, is_text_to_video, read_model_index
from .teachers.sd3 import T5_MAX_LENGTH, SD3PromptEncoder, is_sd3, sd3_parts
from .teachers.text import DEFAULT_VALIDATION_PROMPTS, PromptEncoder, TextConditioning


def student_scheduler(meta: dict[str, Any]):
    """An ``LCMScheduler`` whose ``set_timesteps(K)`` gives the student's own timesteps for its K
    (``len(timesteps)``) and whose step is the student's: x0 from the prediction, re-noised with
    fresh noise to the next timestep, the last x0 returned. ``timestep_scaling`` is large enough
    that LCM's boundary scalings are exactly ``c_skip = 0``, ``c_out = 1`` in float32.

    For flow-matching (SD3) students, a ``FlowMatchEulerDiscreteScheduler`` with
    ``stochastic_sampling`` (see :func:`student_scheduler_config`)."""
    from diffusers import LCMScheduler

    if meta["schedule"].get("_class_name") in FLOW_SCHEDULERS:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(**student_scheduler_config(meta))
    schedule = dict(meta["schedule"])
    T = NoiseSchedule.from_scheduler_config(schedule).num_train_timesteps
    ts = [int(t) for t in meta["timesteps"]]
    original = _lcm_original_steps(ts, T)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    return LCMScheduler(
        **{k: schedule[k] for k in keys if schedule.get(k) is not None},
        original_inference_steps=original or len(ts),
        timestep_scaling=1e7,
        prediction_type=meta["prediction_type"],
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,  # unused by LCMScheduler; 1 keeps the SD pipelines from warning about an old config
    )


def _lcm_original_steps(timesteps: list[int], T: int) -> int | None:
    """LCMScheduler's ``original_inference_steps`` N for which ``set_timesteps(K)`` picks exactly these
    timesteps (None when no N does: pass ``timesteps=`` to the pipeline then)."""
    import numpy as np

    k = len(timesteps)
    for n in [k, timesteps[0] + 1] + list(range(k, min(T, 1000) + 1)):
        if not k <= n <= T:
            continue
        step = T // n
        origin = (np.arange(1, n + 1) * step - 1)[::-1]
        idx = np.floor(np.linspace(0, n, num=k, endpoint=False)).astype(np.int64)
        if [int(t) for t in origin[idx]] == list(timesteps):
            return n
    return None


def write_student_index(
    src: Path, out: Path, index: dict[str, Any], parts: list[str], meta: dict[str, Any], model: str, model_class: str,
    null_parts: list[str], extra: dict[str, Any],
) -> None:
    """The pipeline around a student network in ``out/<model>``: copy ``parts`` from the teacher's folder ``src``
    (no pickle files), write a scheduler for the student's timesteps unless one is there, and ``model_index.json``:
    the teacher's ``index`` with its settings kept, the copied parts, the student ``model_class``, the scheduler,
    ``null_parts`` set to ``[None, None]`` and ``extra`` entries."""
    for part in parts:
        shutil.copytree(src / part, out / part, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*[f"*{s}" for s in PICKLE_SUFFIXES]))
    scheduler_dir = out / "scheduler"
    if not (scheduler_dir / "scheduler_config.json").is_file():
        student_scheduler(meta).save_pretrained(scheduler_dir)
    sched_cls = json.loads((scheduler_dir / "scheduler_config.json").read_text())["_class_name"]
    new_index = {k: v for k, v in index.items() if k.startswith("_") or not isinstance(v, list)}
    new_index |= {part: index[part] for part in parts} | {part: [None, None] for part in null_parts} | extra
    new_index[model] = ["diffusers", model_class]
    new_index["scheduler"] = ["diffusers", sched_cls]
    (out / "model_index.json").write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n")


def write_pipeline_parts(out: Path, teacher, meta: dict[str, Any], generator_subfolder: str = "unet") -> None:
    """Make the student folder a diffusers pipeline: copy VAE, text encoder(s) and tokenizer(s) from
    the teacher's folder (and an AudioLDM teacher's vocoder, its audio settings added to ``meta["audio"]``),
    add a scheduler for the student's timesteps (unless one is there) and ``model_index.json``, and the student network under a single-file name too:
    ``student_unet.safetensors`` (SD / SDXL) or ``student_transformer.safetensors`` (SD3), a hard link to
    the weights file (no second copy on disk) unless the weights are sharded."""
    src = Path(teacher.meta["pipeline_folder"])
    index = read_model_index(src)
    if is_sd3(index):
        model, model_class, all_parts = "transformer", "SD3Transformer2DModel", sd3_parts(src, index)
    elif is_audioldm(index):  # AudioLDMPipeline: the vocoder too, and the clip's audio settings in onestep.json
        # (MusicLDMPipeline: also CLAP's feature extractor, which its pipeline ranks several waveforms a prompt with)
        has_features = (index.get("feature_extractor") or [None])[0] is not None
        model, model_class = "unet", "UNet2DConditionModel"
        all_parts = AUDIOLDM_PARTS + (("feature_extractor",) if has_features else ())
        meta["audio"] = dict(teacher.meta["audio"])
    else:
        unet_class = "UNet3DConditionModel" if is_text_to_video(index) else "UNet2DConditionModel"  # TextToVideoSDPipeline: SD's parts
        model, model_class, all_parts = "unet", unet_class, SDXL_PARTS if is_sdxl(index) else SD_PARTS
    if generator_subfolder != model:
        raise ValueError(f"the student {model_class} must sit in {model}/ for diffusers to find it")
    parts = [p for p in all_parts if p not in (model, "scheduler")]
    optional = [p for p in ("safety_checker", "feature_extractor", "image_encoder", "text_encoder_3", "tokenizer_3") if p in index and p not in parts]
    extra = {"requires_safety_checker": False} if "requires_safety_checker" in index else {}
    write_student_index(src, out, index, parts, meta, model, model_class, optional, extra)
    weights = sorted((out / generator_subfolder).glob("*.safetensors"))
    single = out / f"student_{model}.safetensors"
    if len(weights) == 1:  # the same bytes under a second name: a hard link, not a second copy on disk
        try:
            os.link(weights[0], single)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(weights[0], single)
    else:  # sharded: gather into one file
        from safetensors.torch import load_file, save_file

        state: dict[str, torch.Tensor] = {}
        for w in weights:
            state.update(load_file(str(w)))
        save_file(state, str(single))


def student_text_parts(path: Path, meta: dict[str, Any], device: torch.device | str = "cpu") -> tuple[TextConditioning, LatentVAE]:
    """The text conditioning and VAE of a text-to-image (or text-to-audio: a :class:`~onestep.teachers.audioldm.MelVAE`)
    student folder (its own copies of the teacher's parts)."""
    from diffusers import AutoencoderKL

    cm = meta["conditioning"]
    n = int(cm.get("text_encoders") or 1)
    family = cm.get("family") or ("sdxl" if n == 2 else "sd")
    parts = ("vae", "text_encoder", "tokenizer") + tuple(x for i in range(2, n + 1) for x in (f"text_encoder_{i}", f"tokenizer_{i}"))
    for part in parts + (("vocoder",) if family == "audioldm" else ()):
        if not (path / part).is_dir():
            raise StudentFormatError(f"{path}: a text-to-{'audio' if family == 'audioldm' else 'image'} student needs {part}/ "
                                     "(copied from the teacher at export)")
    size = cm.get("image_size") or [meta["sample_shape"][1] * 8] * 2
    vae = None
    if family == "audioldm":
        encoder, vae = student_audio_parts(path, meta, device)
    elif family == "sd3":
        encoder = SD3PromptEncoder(
            path, tuple(size), cm["joint_attention_dim"], t5=n == 3,
            max_sequence_length=cm.get("max_sequence_length", T5_MAX_LENGTH), device=device,
        )
    else:
        encoder = PromptEncoder(path, family == "sdxl", tuple(size), device=device)
    conditioning = TextConditioning(
        encoder=encoder,
        validation_prompts=list(cm.get("validation_prompts") or DEFAULT_VALIDATION_PROMPTS),
        negative_prompt=cm.get("negative_prompt"),
        zero_empty_prompt=bool(cm.get("zero_empty_prompt", False)),
    )
    if vae is None:
        vae = LatentVAE(AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)).to(device)
    return conditioning, vae


def student_scheduler_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``FlowMatchEulerDiscreteScheduler`` settings of an SD3 student folder: the teacher's
    ``num_train_timesteps`` and ``shift`` (so ``scheduler.timesteps`` are the transformer inputs
    onestep feeds) and ``stochastic_sampling`` (each step predicts x0 and re-noises it to the next
    sigma with fresh noise, onestep's K-step rule; the last step returns x0)."""
    schedule = meta["schedule"]
    return {
        "num_train_timesteps": int(schedule["num_train_timesteps"]),
        "shift": float(schedule.get("shift", 1.0)),
        "stochastic_sampling": True,
    }


def pipeline_sigmas(meta: dict[str, Any]) -> list[float]:
    """What to pass as ``sigmas=`` to the student pipeline so that its K steps are the student's
    timesteps: the unshifted ``(t + 1) / T`` (the scheduler applies the shift itself). Not needed
    for a one-step student at ``t = T - 1``: ``num_inference_steps=1`` alone gives sigma 1."""
    T = int(meta["schedule"]["num_train_timesteps"])
    return [(int(t) + 1) / T for t in meta["timesteps"]]


__all__ = [
    "pipeline_sigmas",
    "student_scheduler",
    "student_scheduler_config",
    "student_text_parts",
    "write_pipeline_parts",
]
