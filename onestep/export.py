"""Students on disk.

A student is a folder written only with safetensors::

    student/
      generator/                 # diffusers save_pretrained: config.json + *.safetensors
      onestep.json               # how to sample it, with or without onestep

``onestep.json`` holds the format version, the method, the teacher and its hash, the
prediction type, the schedule (a diffusers scheduler config), the sampling timesteps,
the conditioning, the sample shape and the clamp range. With it, plain diffusers can
sample a ``UNet2DModel`` student::

    unet = UNet2DModel.from_pretrained("student/generator")
    x = noise                                   # N(0, I), shape sample_shape
    for i, t in enumerate(meta["timesteps"]):
        eps = unet(x, t, class_labels=y).sample
        x0 = (x - sqrt(1 - abar[t]) * eps) / sqrt(abar[t])      # prediction_type epsilon
        x = x0 if last else sqrt(abar[t_next]) * x0 + sqrt(1 - abar[t_next]) * fresh_noise

Text-to-image students (teachers that are Stable Diffusion / SDXL pipeline folders) are also a
complete diffusers pipeline folder: the UNet in ``unet/`` (``onestep.json`` says so in
``generator_subfolder``), ``vae/``, ``text_encoder*/``, ``tokenizer*/`` copied from the teacher,
``scheduler/`` set to the student's timesteps, ``model_index.json``, and the UNet once more as
one file, ``student_unet.safetensors`` (diffusers key names); see :mod:`onestep.pipeline`.
Students of flow-matching SD3 teachers are the same with the ``SD3Transformer2DModel`` in
``transformer/`` (and ``student_transformer.safetensors``), ``text_encoder_3/`` + ``tokenizer_3/``
when the teacher has a T5, and a ``FlowMatchEulerDiscreteScheduler`` with ``stochastic_sampling``
(:mod:`onestep.pipeline`); ``onestep.json`` adds ``pipeline_sigmas``, the ``sigmas=`` that make
the pipeline's steps the student's timesteps. Students of SD x4 upscaler teachers are
``StableDiffusionUpscalePipeline`` folders (:mod:`onestep.upscaler_export`).

With ``export_variant`` the generator's weights are also written in fp16 or bf16 as a diffusers
variant (``unet/diffusion_pytorch_model.fp16.safetensors``), and a LoRA generator of an SD / SDXL
teacher also leaves its adapters as a diffusers LoRA file for the teacher's pipeline
(``lora/pytorch_lora_weights.safetensors``); see :mod:`onestep.export_variants`, which also writes
the folder's ``README.md`` model card.

Consistency students also record ``consistency`` (parameterisation, grid, timesteps for 1, 2, 4
and 8 steps) and ``guidance`` (how the student takes its guidance scale); see
:mod:`onestep.consistency`. ``UNet2DConditionModel`` ones on LCM's grid get
``scheduler/``, an ``LCMScheduler`` config. CTM students record ``ctm`` (grid, jump input, nu, gamma,
timesteps by number of steps); see :mod:`onestep.ctm`. BOOT students record ``boot`` (the label at which
the network's output becomes the sample, the training grid); see :mod:`onestep.boot`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .conditioning import Conditioning, conditioning_from_dict
from .denoiser import Denoiser
from .errors import OnestepError, StudentFormatError
from .export_variants import model_card, write_diffusers_lora, write_variant
from .files import read_json_object
from .pipeline import pipeline_sigmas, student_text_parts, write_pipeline_parts
from .schedule import PREDICTION_TYPES, NoiseSchedule
from .teachers import PICKLE_SUFFIXES, Teacher
from .upscaler_export import student_upscaler_parts, write_upscaler_pipeline
from .weights import STUDENT_SUBFOLDERS, StateDict, save_model

FORMAT_VERSION = 1
META_FILE = "onestep.json"


def _model_classes() -> dict[str, type]:
    """The only classes a student may name (no import by string from a file)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel, UNet3DConditionModel

    from .teachers.gmm import MLPDenoiser

    return {
        "UNet2DModel": UNet2DModel,
        "UNet2DConditionModel": UNet2DConditionModel,
        "UNet3DConditionModel": UNet3DConditionModel,
        "SD3Transformer2DModel": SD3Transformer2DModel,
        "MLPDenoiser": MLPDenoiser,
    }


#: Where a text-to-image pipeline keeps its denoiser, by class (diffusers looks there).
PIPELINE_SUBFOLDERS = {"UNet2DConditionModel": "unet", "SD3Transformer2DModel": "transformer"}


def export_student(
    out: str | Path,
    generator: nn.Module,
    teacher: Teacher,
    method: str,
    timesteps: list[int],
    prediction_type: str | None = None,
    extra: dict[str, Any] | None = None,
    variant: str | None = None,
    lora_layers: dict[str, torch.Tensor] | None = None,
    state: StateDict | None = None,
) -> Path:
    """Write ``generator`` (a diffusers model) and its sampling metadata to ``out``.

    ``prediction_type`` is what the generator outputs (default: the teacher's). ``variant``
    (``fp16`` / ``bf16``): also its weights in that dtype as a diffusers variant. ``lora_layers``
    (:func:`onestep.lora.lora_layers_for_diffusers` of the generator before its adapters were merged):
    also ``lora/pytorch_lora_weights.safetensors`` for the teacher's pipeline; ``extra["diffusers_lora"]``
    describes them for the model card (see :mod:`onestep.export_variants`). ``state``: the weights to
    write instead of ``generator``'s own (the same keys, possibly :class:`~onestep.weights.Deferred`,
    computed as they are written); ``generator`` then gives the config and class.
    """
    out = Path(out)
    cls_name = type(generator).__name__
    if cls_name not in _model_classes():
        raise StudentFormatError(f"cannot export a {cls_name}: expected one of {sorted(_model_classes())}")
    out.mkdir(parents=True, exist_ok=True)
    text_to_image = teacher.conditioning.kind == "text"
    upscaler = teacher.meta.get("upscaler") if teacher.vae is not None else None  # an SD x4 upscaler's: a pipeline folder too
    subfolder = PIPELINE_SUBFOLDERS.get(cls_name, "unet") if text_to_image or upscaler else "generator"  # where diffusers pipelines look
    save_model(generator, out / subfolder, state=state)
    meta = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "model_class": cls_name,
        "teacher": {"name": teacher.name, "sha256": teacher.sha256},
        "prediction_type": prediction_type or teacher.trainable_prediction_type,
        "schedule": teacher.schedule.to_dict(),
        "timesteps": [int(t) for t in timesteps],
        "conditioning": teacher.conditioning.to_dict(),
        "sample_shape": list(teacher.sample_shape),
        "clip": teacher.clip,
        "guidance": None,
        "generator_subfolder": subfolder,
        "sampling": "x = N(0, I); for each timestep t: x0 = generator(x, t, cond) converted from prediction_type; "
        "re-noise x0 to the next timestep with fresh noise; the last x0 is the sample",
    }
    if text_to_image and teacher.schedule.kind == "flow":
        meta["pipeline_sigmas"] = pipeline_sigmas(meta)
    if extra:
        meta.update(extra)
    if meta.get("consistency") and cls_name == "UNet2DConditionModel":
        write_lcm_scheduler(out / "scheduler", meta)
    if meta.get("boot") and text_to_image and teacher.schedule.kind != "flow":  # its one step in a diffusers pipeline
        from .boot import write_boot_scheduler

        write_boot_scheduler(out / "scheduler", meta)
    if text_to_image:
        write_pipeline_parts(out, teacher, meta, subfolder)
    if upscaler:  # a StableDiffusionUpscalePipeline folder; adds meta["upscaler"]
        write_upscaler_pipeline(out, teacher, meta)
    if variant:  # after the pipeline parts: student_unet.safetensors is the float32 file alone
        write_variant(generator, out / subfolder, variant, state=state)
        meta["weight_variants"] = [variant]
    if lora_layers:
        file = write_diffusers_lora(out, lora_layers)
        meta["diffusers_lora"] = {**(meta.get("diffusers_lora") or {}), "file": file.relative_to(out).as_posix()}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(model_card(meta))
    return out


def record_metrics(student: str | Path, metrics: dict[str, Any]) -> None:
    """Add what was measured of a student (``metrics``: name -> value, plus ``samples`` / ``reference``)
    to its ``onestep.json`` and model card; each file is replaced whole."""
    from .files import write_text

    out = Path(student)
    meta = json.loads((out / META_FILE).read_text())
    meta["metrics"] = {**(meta.get("metrics") or {}), **metrics}
    write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    write_text(out / "README.md", model_card(meta))


def write_lcm_scheduler(out: str | Path, meta: dict[str, Any]) -> Path | None:
    """Write an ``LCMScheduler`` config for a consistency student, so that plain diffusers samples
    it in K steps (``scheduler.set_timesteps(K)`` picks the same timesteps as onestep).

    Only a student whose grid is LCM's own (``N`` points up to ``T - 1``, N dividing T) can be
    described this way; for others nothing is written and None returned (their timesteps stay
    in ``onestep.json``).
    """
    from diffusers import LCMScheduler

    from onestep.consistency import lcm_grid

    cm = meta["consistency"]
    schedule = dict(meta["schedule"])
    T = NoiseSchedule.from_scheduler_config(schedule).num_train_timesteps
    n = len(cm["grid"])
    if cm["parameterisation"] != "lcm" or T % n or cm["grid"] != lcm_grid(T, n):
        return None
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    scheduler = LCMScheduler(
        **{k: schedule[k] for k in keys if schedule.get(k) is not None},
        original_inference_steps=n,
        timestep_scaling=cm["timestep_scaling"],
        prediction_type=meta["prediction_type"],
        clip_sample=meta.get("clip") is not None,
        clip_sample_range=float(meta.get("clip") or 1.0),
        set_alpha_to_one=True,
    )
    scheduler.save_pretrained(out)
    return Path(out)


@dataclass
class Student:
    """A loaded student: its generator as an x0 :class:`Denoiser` and its metadata."""

    path: Path
    generator: Denoiser
    timesteps: list[int]
    conditioning: Conditioning
    sample_shape: tuple[int, ...]
    clip: float | None
    meta: dict[str, Any] = field(default_factory=dict)
    vae: nn.Module | None = None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images from samples: the VAE decode for latent (text-to-image) students, else ``x``."""
        return x if self.vae is None else self.vae.decode(x)

    @property
    def schedule(self) -> NoiseSchedule:
        return self.generator.schedule

    @property
    def max_steps(self) -> int:
        return len(self.timesteps)

    def timesteps_for(self, steps: int | None) -> list[int]:
        """The sampling timesteps for ``steps`` model calls (default: the trained ones)."""
        if steps is None or steps == len(self.timesteps):
            return list(self.timesteps)
        if self.meta.get("boot"):
            raise StudentFormatError("a BOOT student samples in exactly one step (its signal at the lowest time)")
        cm = self.meta.get("consistency") or self.meta.get("ctm")
        if cm:
            from onestep.consistency import lcm_timesteps

            if cm.get("parameterisation") == "segments":
                raise StudentFormatError(f"this multistep consistency student samples in exactly {len(self.timesteps)} steps")
            return lcm_timesteps(cm["grid"], steps, cm.get("first_step_timestep"))
        if steps < 1:
            raise StudentFormatError("steps must be at least 1")
        if steps < len(self.timesteps):
            return list(self.timesteps[:steps])
        if len(self.timesteps) == 1:
            # A one-step student may still be run for more steps: denoise, re-noise at evenly spaced labels.
            t0 = self.timesteps[0]
            return [int(round(t0 * (steps - i) / steps)) for i in range(steps)]
        raise StudentFormatError(f"this student was trained for at most {len(self.timesteps)} steps, not {steps}")


def _generator_from_meta(backbone: nn.Module, schedule: NoiseSchedule, meta: dict[str, Any]) -> Denoiser:
    """The x0 view of a student: a plain :class:`Denoiser`, a consistency student's ``f``, a CTM student or a
    BOOT student's signal (the network's output converted at ``boot.signal_timestep``, :mod:`onestep.boot`)."""
    if meta.get("boot"):
        from .boot import BOOTDenoiser

        return BOOTDenoiser(backbone, schedule, meta["prediction_type"], meta["boot"]["signal_timestep"])
    if meta.get("ctm"):
        from onestep.ctm import CTMDenoiser, JumpInput

        ctm = meta["ctm"]
        return CTMDenoiser(
            backbone, schedule, meta["prediction_type"], JumpInput(**ctm["jump_input"]), ctm["nu"], ctm["gamma"], clip=meta.get("clip")
        )
    cm = meta.get("consistency")
    if not cm:
        return Denoiser(backbone, schedule, meta["prediction_type"])
    from onestep.consistency import ConsistencyDenoiser, GuidanceInput

    guidance = GuidanceInput(**meta["guidance"]) if meta.get("guidance") else None
    return ConsistencyDenoiser(
        backbone, schedule, meta["prediction_type"], cm["parameterisation"], cm["sigma_data"], cm["timestep_scaling"], guidance
    )


def _check_safetensors(file: Path) -> None:
    """Raise :class:`StudentFormatError` unless ``file`` is a whole safetensors file (its header parses and
    covers the file: a truncated file fails here)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types (header, I/O)
        raise StudentFormatError(f"{file}: not a whole safetensors file ({e}); the student is damaged: export it again") from e


def read_student_meta(path: str | Path) -> dict[str, Any]:
    """The ``onestep.json`` of student folder ``path``, its fields checked for kind (a
    :class:`StudentFormatError` naming the file and the field otherwise). Nothing is loaded."""
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise StudentFormatError(f"{path} is not a onestep student: {META_FILE} is missing")
    meta = read_json_object(meta_file, StudentFormatError)
    version = meta.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        newer = "; it was written by a newer onestep: upgrade onestep" if _is_int(version) and version > FORMAT_VERSION else ""
        raise StudentFormatError(f"{meta_file}: unsupported format_version {version!r} (expected {FORMAT_VERSION}){newer}")
    classes = sorted(_model_classes())
    checks = {
        "generator_subfolder": (lambda v: v in STUDENT_SUBFOLDERS, "'generator', 'unet' or 'transformer'"),
        "model_class": (lambda v: v in classes, f"one of {classes}"),
        "prediction_type": (lambda v: v in PREDICTION_TYPES, f"one of {PREDICTION_TYPES}"),
        "schedule": (lambda v: isinstance(v, dict), "a diffusers scheduler config (an object)"),
        "timesteps": (lambda v: isinstance(v, list) and v and all(_is_int(t) and t >= 0 for t in v), "a non-empty list of integers >= 0"),
        "conditioning": (lambda v: isinstance(v, dict), "an object with a 'kind'"),
        "sample_shape": (lambda v: isinstance(v, list) and v and all(_is_int(n) and n > 0 for n in v), "a non-empty list of positive integers"),
        "clip": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 3e38), "null or a positive number (below 3e38)"),
    }
    optional = {"generator_subfolder": "generator", "clip": None}
    for name, (ok, expected) in checks.items():
        value = meta.get(name, optional.get(name, ...))
        if value is ... or not ok(value):
            got = "it is missing" if value is ... else f"got {value!r}"
            raise StudentFormatError(f"{meta_file}: {name} must be {expected} ({got})")
    for name in ("teacher", "config", "consistency", "guidance", "ctm", "boot", "upscaler"):
        if meta.get(name) is not None and not isinstance(meta[name], dict):
            raise StudentFormatError(f"{meta_file}: {name} must be an object or null (got {meta[name]!r})")
    return meta


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_fits(meta_file: Path, meta: dict[str, Any], backbone: nn.Module, conditioning: Conditioning | None) -> None:
    """``sample_shape`` and ``conditioning`` of ``onestep.json`` must be what ``backbone`` takes: ``[sample_dim]`` for
    an MLP, ``[channels, *sample_size]`` for a UNet2DModel, else its channels with H and W multiples of its patch
    size; class labels (and the null class) within its class embeddings, and none for a network without."""
    shape, cfg = list(meta["sample_shape"]), backbone.config
    # an image condition is concatenated to the input: the samples have the channels left
    channels = (cfg.get("in_channels") or 0) - (conditioning.image_channels if conditioning is not None and conditioning.kind == "image" else 0)
    if "sample_dim" in cfg:
        ok, expected = shape == [cfg.sample_dim], f"[{cfg.sample_dim}]"
    elif meta["model_class"] == "UNet2DModel":
        size = list(cfg.sample_size) if isinstance(cfg.sample_size, (list, tuple)) else [cfg.sample_size] * 2
        ok, expected = shape == [channels, *size], str([channels, *size])
    elif meta["model_class"] == "UNet3DConditionModel":  # video: [channels, frames, H, W]
        ok = len(shape) == 4 and shape[0] == channels and shape[2] == shape[3] == cfg.sample_size
        expected = f"[{channels}, F, {cfg.sample_size}, {cfg.sample_size}]"
    else:
        f = cfg.get("patch_size") or 1
        ok = len(shape) == 3 and shape[0] == channels and shape[1] % f == 0 and shape[2] % f == 0
        expected = f"[{channels}, H, W] with H and W multiples of {f}"
    if not ok:
        raise StudentFormatError(f"{meta_file}: sample_shape {shape} does not fit the {meta['model_class']} generator (expected {expected})")
    if conditioning is None or meta.get("upscaler") is not None:  # text: the pipeline's own parts; the upscaler's class labels: its noise level
        return
    embeds = cfg.get("num_class_embeds") or 0
    c = conditioning
    if c.kind == "class_tokens" and (not _is_int(c.num_classes) or cfg.get("cross_attention_dim") != c.num_classes + 1):
        raise StudentFormatError(f"{meta_file}: class tokens of {c.num_classes} classes (and the null one) do not fit a "
                                 f"cross_attention_dim of {cfg.get('cross_attention_dim')}")
    in_table = _is_int(c.num_classes) and _is_int(c.null_class) and 1 <= c.num_classes <= embeds and 0 <= c.null_class < embeds
    if (c.kind == "class") != bool(embeds) or (embeds and not in_table):
        raise StudentFormatError(
            f"{meta_file}: conditioning {c.to_dict()} does not fit the generator ({embeds} class embeddings: "
            f"{'class conditioning with num_classes and null_class below that' if embeds else 'unconditional'})"
        )


def load_student(path: str | Path, device: torch.device | str = "cpu") -> Student:
    """Load a student folder written by :func:`export_student`. Refuses pickle files."""
    path = Path(path).expanduser()
    if not path.exists():
        raise StudentFormatError(f"student folder {path} does not exist")
    if not path.is_dir():
        raise StudentFormatError(f"{path} is not a folder; a student is a folder with onestep.json and generator/")
    meta_file = path / META_FILE
    meta = read_student_meta(path)
    subfolder = meta.get("generator_subfolder", "generator")
    gen_dir = path / subfolder
    if not gen_dir.is_dir():
        raise StudentFormatError(f"{path}: {subfolder}/ is missing")
    pickles = [p.name for p in gen_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise StudentFormatError(f"{gen_dir} holds pickle files ({', '.join(pickles)}); onestep loads safetensors only")
    weight_files = sorted(gen_dir.glob("*.safetensors"))
    if not weight_files:
        raise StudentFormatError(f"{gen_dir}: no .safetensors weights")
    for file in weight_files:  # a truncated or corrupt file: one clear error, not diffusers' traceback
        _check_safetensors(file)
    try:
        backbone = _model_classes()[meta["model_class"]].from_pretrained(gen_dir, use_safetensors=True).to(device).eval()
    except (OSError, ValueError, RuntimeError) as e:  # weights that do not fit the config, a broken config.json
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StudentFormatError(f"{gen_dir}: the generator does not load ({first}); export the student again") from e
    try:  # the parts onestep.json describes: a field of the wrong kind is named here, not deep in sampling
        schedule = NoiseSchedule.from_scheduler_config(meta["schedule"])
        if max(meta["timesteps"]) >= schedule.num_train_timesteps:
            raise StudentFormatError(f"timesteps {meta['timesteps']} must lie in [0, {schedule.num_train_timesteps - 1}]")
        generator = _generator_from_meta(backbone, schedule, meta).eval()
        conditioning = None if meta["conditioning"].get("kind") == "text" else conditioning_from_dict(meta["conditioning"])
    except (OnestepError, TypeError, ValueError, KeyError) as e:
        raise StudentFormatError(f"{meta_file}: {f'{e} is missing' if isinstance(e, KeyError) else e}") from e
    check_fits(meta_file, meta, backbone, conditioning)
    vae = None
    if conditioning is None:
        conditioning, vae = student_text_parts(path, meta, device)
    elif meta.get("upscaler") is not None:  # an SD x4 upscaler student: its prompt, noise level and VAE
        conditioning, vae = student_upscaler_parts(path, meta, device)
    if hasattr(generator, "null_cond"):  # CTM's nu-sampling runs the unconditional student too
        generator.null_cond = conditioning.null
    return Student(
        path=path,
        generator=generator,
        timesteps=[int(t) for t in meta["timesteps"]],
        conditioning=conditioning,
        sample_shape=tuple(meta["sample_shape"]),
        clip=meta.get("clip"),
        meta=meta,
        vae=vae,
    )
