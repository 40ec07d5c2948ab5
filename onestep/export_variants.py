"""What a student folder holds besides the student itself, for plain diffusers users.

- a half-precision *variant* of the generator's weights (``export_variant: fp16`` or ``bf16``):
  ``unet/diffusion_pytorch_model.fp16.safetensors`` beside the float32 file, the layout
  ``from_pretrained(..., variant="fp16", torch_dtype=torch.float16)`` reads (:func:`write_variant`);
- for a LoRA generator of a Stable Diffusion / SDXL teacher, its adapters as a diffusers LoRA file,
  ``lora/pytorch_lora_weights.safetensors``, for the teacher's own pipeline
  (``pipe.load_lora_weights``), as LCM-LoRA and DMD2-LoRA ship (:func:`write_diffusers_lora`;
  :func:`diffusers_lora_blocker` says when a run's adapters cannot be written that way);
- the ``README.md`` model card, which shows how to load each of these (:func:`model_card`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import StudentFormatError
from .weights import StateDict, save_model

#: ``export_variant`` -> the dtype of the variant's weights (diffusers' variant names).
VARIANT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: The values ``export_variant`` takes.
EXPORT_VARIANTS = ("none", *VARIANT_DTYPES)
#: Where a student folder keeps its diffusers LoRA file (relative to the folder).
LORA_SUBFOLDER = "lora"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def write_variant(net: nn.Module, folder: str | Path, variant: str, state: StateDict | None = None) -> None:
    """Save ``net`` (a diffusers model, already saved in float32 to ``folder``) once more as the
    diffusers weight variant ``variant`` (``fp16`` or ``bf16``): its weights cast to that dtype in
    ``diffusion_pytorch_model.<variant>.safetensors`` (sharded as diffusers shards) beside the float32
    file, which stays the default. ``state``: the weights to write instead of ``net``'s own."""
    if variant not in VARIANT_DTYPES:
        raise StudentFormatError(f"unknown weight variant {variant!r}: expected one of {sorted(VARIANT_DTYPES)}")
    save_model(net, folder, variant=variant, dtype=VARIANT_DTYPES[variant], state=state)


def diffusers_lora_blocker(
    generator: nn.Module, teacher, average_with: str | None = None, init_generator: str | Path | None = None
) -> str | None:
    """Why a LoRA generator's adapters cannot be written as a diffusers LoRA file for the teacher's
    pipeline; None when they can.

    The file adds the adapters to the teacher's own UNet, so it reproduces the exported student only
    when the student is exactly that: a ``UNet2DConditionModel`` (SD / SDXL) with the teacher's config
    and base weights, plus the adapters and nothing else. Not so for other teachers, for a student
    with an added input (a consistency student's guidance embedding), for an export averaged with
    another student (``export_average_with``) and for a generator whose base weights came from
    ``init_generator``."""
    from diffusers import UNet2DConditionModel

    def public(config) -> dict[str, Any]:
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    if teacher.conditioning.kind != "text" or not isinstance(teacher.backbone, UNet2DConditionModel):
        return "diffusers LoRA files are written for Stable Diffusion / SDXL teachers (a UNet2DConditionModel) only"
    if not isinstance(generator, UNet2DConditionModel) or public(generator.config) != public(teacher.backbone.config):
        return "the student's UNet is not the teacher's (e.g. an added guidance embedding); a LoRA of the teacher cannot express it"
    if average_with is not None:
        return f"the export is averaged with {average_with} (export_average_with); the teacher plus the adapters is not that average"
    if init_generator is not None:
        from safetensors import safe_open

        from .weights import weights_file

        with safe_open(str(weights_file(init_generator)), "pt") as f:
            if any("lora_" not in k for k in f.keys()):
                return f"init_generator {init_generator} replaced the generator's base weights; the LoRA would apply to the teacher's"
    return None


def write_diffusers_lora(out: str | Path, layers: dict[str, torch.Tensor]) -> Path:
    """Write ``layers`` (:func:`onestep.lora.lora_layers_for_diffusers` of a UNet) as
    ``<out>/lora/pytorch_lora_weights.safetensors``, with diffusers' own writer: the UNet's keys under
    ``unet.``, which ``StableDiffusionPipeline`` and ``StableDiffusionXLPipeline.load_lora_weights`` read."""
    from diffusers import StableDiffusionPipeline

    folder = Path(out) / LORA_SUBFOLDER
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    return folder / LORA_WEIGHT_NAME


def model_card(meta: dict[str, Any]) -> str:
    """The student folder's ``README.md``: what it is (method, teacher, steps, guidance) and how to load it,
    in plain diffusers and in onestep, from its ``onestep.json``; also its half-precision variant and
    its diffusers LoRA file when it has them."""
    config = meta.get("config") or {}
    steps = len(meta["timesteps"])
    kind = meta["conditioning"].get("kind")
    lines = [
        f"# {'One' if steps == 1 else steps}-step student: {meta['method']} distillation of {meta['teacher']['name']}",
        "",
        f"- method: `{meta['method']}`; teacher: `{meta['teacher']['name']}` (sha256 `{meta['teacher'].get('sha256') or 'n/a'}`)",
        f"- sampling: {steps} step{'s' if steps > 1 else ''} at timesteps {meta['timesteps']}; network `{meta['model_class']}` "
        f"predicting `{meta['prediction_type']}`",
        f"- conditioning: {kind}; teacher guidance during training: {config.get('guidance_scale', 'n/a')} (the student needs none)",
    ]
    if config:
        lines.append(f"- trained for {config.get('max_steps')} iterations, batch {config.get('batch_size')}, seed {config.get('seed')}")
    lines += _metric_lines(meta.get("metrics") or {})
    lines += ["", "Written by onestep with safetensors only; `onestep.json` holds the full metadata.", "", "## Load it", ""]
    pipeline = meta["generator_subfolder"] in ("unet", "transformer")
    if meta.get("upscaler"):  # a StableDiffusionUpscalePipeline folder (onestep.upscaler_export)
        up = meta["upscaler"]
        lines += [
            "```python",
            "import torch",
            "from diffusers import StableDiffusionUpscalePipeline",
            "",
            'pipe = StableDiffusionUpscalePipeline.from_pretrained("path/to/this/folder")',
            f"image = pipe(prompt={up['prompt']!r}, image=low_res_image, num_inference_steps={steps}, guidance_scale=1.0,",
            f"             noise_level={up['noise_level']}, generator=torch.Generator().manual_seed(0)).images[0]",
            "```",
            "",
        ]
    elif pipeline and meta.get("audio"):  # an AudioLDMPipeline folder
        seconds = meta["audio"]["audio_length_in_s"]
        lines += [
            "```python",
            "from diffusers import DiffusionPipeline",
            "",
            'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")',
            f'audio = pipe("a dog barking", audio_length_in_s={seconds:g}, num_inference_steps={steps}, guidance_scale=1.0).audios[0]',
            f"# a float waveform at {meta['audio']['sample_rate']} Hz",
            "```",
            "",
        ]
    elif pipeline and meta["model_class"] == "UNet3DConditionModel":  # a TextToVideoSDPipeline folder
        lines += [
            "```python",
            "from diffusers import DiffusionPipeline",
            "",
            'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")',
            f'frames = pipe("a cat walking", num_frames={meta["sample_shape"][1]}, num_inference_steps={steps}, guidance_scale=1.0).frames[0]',
            "```",
            "",
        ]
    elif pipeline:
        lines += [
            "```python",
            "from diffusers import DiffusionPipeline",
            "",
            'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")',
            f'image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale=1.0).images[0]',
            "```",
            "",
        ]
    else:
        lines += [
            "```python",
            f"from diffusers import {meta['model_class']}",
            "",
            f'net = {meta["model_class"]}.from_pretrained("path/to/this/folder/generator")  # the network itself',
            "```",
            "",
        ]
    lines += [
        "With onestep (the same samples, per-seed):",
        "",
        "```bash",
        "onestep sample --student path/to/this/folder --num-samples 16 --output-dir samples/"
        + (" --image path/to/low-res-images/" if meta["conditioning"].get("kind") == "image" else ""),
        "```",
        "",
    ]
    return "\n".join(lines + _variant_lines(meta, pipeline) + _lora_lines(meta, steps))


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    """``onestep.json``'s ``metrics`` (the run's last periodic evaluation, or what the quickstart measured)."""
    where = {k: metrics[k] for k in ("step", "samples", "reference") if k in metrics}
    values = {k: v for k, v in metrics.items() if k not in where}
    if not values:
        return []
    shown = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}" for k, v in values.items())
    context = ", ".join(f"{k} {v}" for k, v in where.items())
    return [f"- measured: {shown}" + (f" ({context})" if context else "")]


def _variant_lines(meta: dict[str, Any], pipeline: bool) -> list[str]:
    lines = []
    for variant in meta.get("weight_variants") or []:
        dtype = {"fp16": "float16", "bf16": "bfloat16"}[variant]
        sub = meta["generator_subfolder"]
        load = (
            f'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", variant="{variant}", torch_dtype=torch.{dtype})'
            if pipeline
            else f'net = {meta["model_class"]}.from_pretrained("path/to/this/folder/{sub}", variant="{variant}", torch_dtype=torch.{dtype})'
        )
        lines += [
            f"## {variant} weights",
            "",
            f"`{sub}/diffusion_pytorch_model.{variant}.safetensors` holds the same weights in {dtype} (half the download); "
            "the float32 file stays the default:",
            "",
            "```python",
            "import torch",
            f"from diffusers import {'DiffusionPipeline' if pipeline else meta['model_class']}",
            "",
            load,
            "```",
            "",
        ]
    return lines


def _lora_lines(meta: dict[str, Any], steps: int) -> list[str]:
    lora = meta.get("diffusers_lora") or {}
    if not lora.get("file"):
        return []
    shape = f" (rank {lora['rank']}, alpha {lora['alpha']})" if "rank" in lora and "alpha" in lora else ""
    return [
        "## As a LoRA of the teacher",
        "",
        f"The generator trained as LoRA adapters{shape} on the teacher's UNet; "
        f"`{lora['file']}` holds them in diffusers' LoRA format (the alpha / rank scaling folded into the weights). "
        "Loaded into the teacher's own pipeline, with this folder's scheduler (the student's timesteps), "
        "they give this student's images:",
        "",
        "```python",
        "from diffusers import DiffusionPipeline, LCMScheduler",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("path/to/the/teacher")  # {meta["teacher"]["name"]}',
        f'pipe.load_lora_weights("path/to/this/folder/{LORA_SUBFOLDER}", weight_name="{LORA_WEIGHT_NAME}")',
        'pipe.scheduler = LCMScheduler.from_pretrained("path/to/this/folder", subfolder="scheduler")',
        f'image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale=1.0).images[0]',
        "```",
        "",
    ]


__all__ = [
    "EXPORT_VARIANTS",
    "LORA_SUBFOLDER",
    "LORA_WEIGHT_NAME",
    "VARIANT_DTYPES",
    "diffusers_lora_blocker",
    "model_card",
    "write_diffusers_lora",
    "write_variant",
]
