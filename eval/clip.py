"""CLIP score of images against their prompts, on :mod:`onestep.clip`'s CLIP wrapper.

Definition (the one torchmetrics uses): for each image ``I`` and its prompt ``T``,
``score = 100 * max(cos(E_I, E_T), 0)`` with ``E_I = CLIPModel.get_image_features``,
``E_T = CLIPModel.get_text_features`` (the projected embeddings); the reported CLIP score is
the mean over images, with its standard deviation and the per-image scores in ``metrics.json``.

Images are scored as they would be saved: floats in [-1, 1] are quantised to uint8 as
everywhere in onestep's evaluation (``round((x + 1) * 127.5)``, :func:`onestep.eval.images.as_uint8`).
They then get the CLIP image processor's own preprocessing (:class:`onestep.clip.ClipPreprocessing`:
the folder's ``preprocessor_config.json``, OpenAI CLIP's at the model's ``image_size`` without one),
the same that SwiftBrush v2's CLIP loss uses in training. Prompts are tokenised with the folder's
``CLIPTokenizer``, padded and truncated to the text model's positions (77 for CLIP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from onestep.clip import ClipEncoder, load_clip
from onestep.errors import OnestepError

from .images import as_uint8

CLIP_SCORE_DEFINITION = (
    "CLIP score = mean over images of 100 * max(cos(image_embeds, text_embeds), 0), "
    "with CLIPModel.get_image_features / get_text_features (as torchmetrics' CLIPScore)"
)


@torch.no_grad()
def clip_score(
    images: torch.Tensor,
    prompts: list[str],
    clip: ClipEncoder | str | Path,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """CLIP score of ``images[i]`` against ``prompts[i]`` (see :data:`CLIP_SCORE_DEFINITION`).

    Args:
        images: ``(N, 1 or 3, H, W)`` uint8 or float in [-1, 1].
        prompts: ``N`` strings.
        clip: a :class:`onestep.clip.ClipEncoder` or the path of a local CLIP model folder.

    Returns:
        ``{"clip_score": mean, "clip_score_std": std, "per_sample": [N floats]}``.
    """
    from tqdm.auto import tqdm

    if len(images) != len(prompts):
        raise OnestepError(f"{len(images)} images for {len(prompts)} prompts")
    encoder = clip if isinstance(clip, ClipEncoder) else load_clip(clip)
    scores = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="CLIP score", disable=not progress, leave=False):
        cos = encoder.prompt_cosine(as_uint8(images[i : i + batch_size]), prompts[i : i + batch_size])
        scores.append(100 * cos.clamp_min(0))
    s = torch.cat(scores).double().cpu()
    return {"clip_score": float(s.mean()), "clip_score_std": float(s.std()) if len(s) > 1 else 0.0, "per_sample": s.tolist()}


def open_pipeline(folder: str | Path, device: torch.device | str = "cpu", what: str = "CLIP scoring", kind: str = "images"):
    """Load a student folder that is a diffusers pipeline (``model_index.json``; safetensors only) onto
    ``device``, progress bar off. ``kind``: what it makes (``images``, ``audio``), for the error messages.
    Returns ``(pipeline, the onestep.json fields or {})``."""
    from diffusers import DiffusionPipeline

    from onestep.export import read_student_meta
    from onestep.files import PICKLE_SUFFIXES

    folder = Path(folder).expanduser()
    if not (folder / "model_index.json").is_file():
        raise OnestepError(
            f"{folder}: not a text-to-{'audio' if kind == 'audio' else 'image'} student (no model_index.json); {what} samples a "
            f"diffusers pipeline folder, or scores a folder of {'WAV files with --audio' if kind == 'audio' else 'images with --images'}"
        )
    pickles = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise OnestepError(f"{folder} holds pickle files ({', '.join(pickles[:3])}); onestep loads safetensors only")
    meta = read_student_meta(folder) if (folder / "onestep.json").is_file() else {}  # a damaged one: a clear error
    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, meta


@torch.no_grad()
@torch.no_grad()
def pipeline_outputs(
    pipe, prompts: list[str], steps: int, seed: int = 0, guidance_scale: float = 1.0, batch_size: int = 32, progress: bool = False,
    field: str = "images",
) -> torch.Tensor:
    """One output per prompt from a loaded pipeline (its ``field``: ``images``, or ``audios`` of a text-to-audio
    pipeline), as float tensors on CPU; output ``i`` uses seed ``seed + i`` (a CPU generator), so it does not
    depend on the batch size."""
    from tqdm.auto import tqdm

    outs = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress, leave=False):
        batch = prompts[i : i + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(seed + i + j) for j in range(len(batch))]
        out = pipe(prompt=batch, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens, output_type="pt")
        outs.append(getattr(out, field).float().cpu())
    return torch.cat(outs)


def pipeline_images(
    pipe, prompts: list[str], steps: int, seed: int = 0, guidance_scale: float = 1.0, batch_size: int = 32, progress: bool = False
) -> torch.Tensor:
    """One image per prompt from a loaded pipeline (:func:`pipeline_outputs`), float in [-1, 1] on CPU."""
    return pipeline_outputs(pipe, prompts, steps, seed, guidance_scale, batch_size, progress) * 2 - 1  # [0, 1] -> [-1, 1]


def pipeline_steps(meta: dict[str, Any], steps: int | None) -> int:
    """``steps``, else ``len(timesteps)`` of the student's ``onestep.json`` (1 when absent)."""
    return steps if steps is not None else len(meta.get("timesteps", [0]))


def pipeline_info(folder: str | Path, meta: dict[str, Any], steps: int) -> dict[str, Any]:
    """What an evaluation records about a pipeline student."""
    return {"path": str(Path(folder).expanduser()), "method": meta.get("method"), "teacher": meta.get("teacher"), "timesteps": meta.get("timesteps"), "steps": steps}


def sample_pipeline(
    folder: str | Path,
    prompts: list[str],
    steps: int | None = None,
    seed: int = 0,
    guidance_scale: float = 1.0,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Images of a text-to-image student folder that is a diffusers pipeline (``model_index.json``),
    one per prompt; image ``i`` uses seed ``seed + i``. ``steps`` defaults to ``len(timesteps)`` of the
    folder's ``onestep.json`` (1 when absent). Returns ``(float images in [-1, 1], student info)``."""
    pipe, meta = open_pipeline(folder, device)
    steps = pipeline_steps(meta, steps)
    x = pipeline_images(pipe, prompts, steps, seed=seed, guidance_scale=guidance_scale, batch_size=batch_size, progress=progress)
    return x, pipeline_info(folder, meta, steps)
