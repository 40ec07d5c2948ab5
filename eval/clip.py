"""CLIP score of images against their prompts, with a local transformers ``CLIPModel``.

Definition (the one torchmetrics uses): for each image ``I`` and its prompt ``T``,
``score = 100 * max(cos(E_I, E_T), 0)`` with ``E_I = CLIPModel.get_image_features``,
``E_T = CLIPModel.get_text_features`` (the projected embeddings); the reported CLIP score is
the mean over images, with its standard deviation and the per-image scores in ``metrics.json``.

Image preprocessing: images are quantised to uint8 as everywhere in onestep
(``round((x + 1) * 127.5)`` for floats in [-1, 1]), grey images repeated to RGB, then scaled to
[0, 1], resized so the shorter side is the model's ``image_size`` (bicubic, antialiased),
centre-cropped to a square and normalised with the mean and std of the folder's
``preprocessor_config.json`` (OpenAI CLIP's when there is none). Prompts are tokenised with the
folder's ``CLIPTokenizer``, padded and truncated to the text model's positions (77 for CLIP).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from onestep.errors import OnestepError
from onestep.teachers.text import read_prompts  # noqa: F401  (eval clip reads prompt files)

CLIP_SCORE_DEFINITION = (
    "CLIP score = mean over images of 100 * max(cos(image_embeds, text_embeds), 0), "
    "with CLIPModel.get_image_features / get_text_features (as torchmetrics' CLIPScore)"
)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
@dataclass
class ClipBundle:
    """A CLIP model with what it needs to read images and prompts."""

    model: Any
    tokenizer: Any
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device


def load_clip(path: str | Path, device: torch.device | str = "cpu") -> ClipBundle:
    """Load a local ``CLIPModel`` folder (safetensors only) and its ``CLIPTokenizer`` (in the folder or
    its ``tokenizer/``)."""
    from transformers import CLIPModel, CLIPTokenizer

    from onestep.teachers import PICKLE_SUFFIXES

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise OnestepError(f"--clip-model {path}: not a CLIPModel folder (config.json missing); it must be a local path")
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        raise OnestepError(f"{path}: no .safetensors weights" + (f" ({', '.join(pickles)} refused: pickle files are not loaded)" if pickles else ""))
    model = CLIPModel.from_pretrained(path, use_safetensors=True).to(device).eval()
    tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    except (OSError, TypeError, ValueError) as e:
        raise OnestepError(f"{tok_dir}: no loadable CLIPTokenizer (vocab.json + merges.txt): {e}") from e
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return ClipBundle(model, tokenizer, int(model.config.vision_config.image_size), mean, std, torch.device(device))


def clip_pixels(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Images (uint8, or float in [-1, 1]) -> normalised ``(N, 3, size, size)`` CLIP input (see the module doc)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise OnestepError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.float() / 255.0
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def clip_score(
    images: torch.Tensor,
    prompts: list[str],
    clip: ClipBundle | str | Path,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """CLIP score of ``images[i]`` against ``prompts[i]`` (see :data:`CLIP_SCORE_DEFINITION`).

    Args:
        images: ``(N, 1 or 3, H, W)`` uint8 or float in [-1, 1].
        prompts: ``N`` strings.
        clip: a :class:`ClipBundle` or the path of a local CLIP model folder.

    Returns:
        ``{"clip_score": mean, "clip_score_std": std, "per_sample": [N floats]}``.
    """
    from tqdm.auto import tqdm

    if len(images) != len(prompts):
        raise OnestepError(f"{len(images)} images for {len(prompts)} prompts")
    b = clip if isinstance(clip, ClipBundle) else load_clip(clip)
    max_len = min(int(b.model.config.text_config.max_position_embeddings), b.tokenizer.model_max_length)
    scores = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="CLIP score", disable=not progress, leave=False):
        pix = clip_pixels(images[i : i + batch_size].cpu(), b.image_size, b.mean, b.std).to(b.device)
        tok = b.tokenizer(prompts[i : i + batch_size], padding="max_length", truncation=True, max_length=max_len, return_tensors="pt").to(b.device)
        img = _embeds(b.model.get_image_features(pixel_values=pix))
        txt = _embeds(b.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
        scores.append(100 * cos.clamp_min(0))
    s = torch.cat(scores).double().cpu()
    return {"clip_score": float(s.mean()), "clip_score_std": float(s.std()) if len(s) > 1 else 0.0, "per_sample": s.tolist()}


def _embeds(out) -> torch.Tensor:
    """transformers >= 5 may return a model output object; take its pooled embeddings."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise OnestepError(f"unexpected CLIP output {type(out).__name__}")


@torch.no_grad()
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
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    from onestep.teachers import PICKLE_SUFFIXES

    folder = Path(folder).expanduser()
    if not (folder / "model_index.json").is_file():
        raise OnestepError(
            f"{folder}: not a text-to-image student (no model_index.json); CLIP scoring samples a diffusers pipeline "
            "folder, or scores a folder of images with --images"
        )
    pickles = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise OnestepError(f"{folder} holds pickle files ({', '.join(pickles[:3])}); onestep loads safetensors only")
    meta = json.loads((folder / "onestep.json").read_text()) if (folder / "onestep.json").is_file() else {}
    if steps is None:
        steps = len(meta.get("timesteps", [0]))
    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    outs = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress, leave=False):
        batch = prompts[i : i + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(seed + i + j) for j in range(len(batch))]
        img = pipe(prompt=batch, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens, output_type="pt").images
        outs.append(img.float().cpu() * 2 - 1)  # [0, 1] -> [-1, 1]
    info = {"path": str(folder), "method": meta.get("method"), "teacher": meta.get("teacher"), "timesteps": meta.get("timesteps"), "steps": steps}
    return torch.cat(outs), info
