"""One CLIP wrapper: a frozen local ``CLIPModel``, its tokenizer, and its image processor's steps in torch.

Everything in onestep that reads images with CLIP goes through :class:`ClipEncoder`: SwiftBrush
v2's clamped CLIP loss (:class:`onestep.trainers.vsd.ClampedClipLoss`, whose gradient flows back
into the images) and the CLIP score (:mod:`onestep.eval.clip`).

Image preprocessing (:class:`ClipPreprocessing`) is the CLIP image processor's own, read from the
folder's ``preprocessor_config.json`` with ``transformers.CLIPImageProcessor`` and carried out on
tensors so that it is differentiable: resize the shorter side to the processor's ``size`` with its
``resample`` (PIL's bicubic and bilinear filters are torch's antialiased ones; like PIL on a uint8
image, a horizontal then a vertical pass, each clamped to 0..255), centre-crop to ``crop_size``, rescale by
``rescale_factor`` and normalise with ``image_mean`` / ``image_std``. Without a preprocessor config
the folder gets OpenAI CLIP's preprocessing at the model's own ``image_size``: bicubic resize of
the shorter side to it, centre crop to a square, OpenAI's mean and std. Images come in as uint8
(0..255) or as floats in [-1, 1] (``(x + 1) * 127.5`` is the pixel value; no rounding).

Loading (:func:`load_clip`) takes a local folder only, reads safetensors only (pickle files are
refused with a message), and never runs remote code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import OnestepError
from .files import transformers_model_folder

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: PIL resample codes (as in ``preprocessor_config.json``) -> ``F.interpolate`` modes. PIL filters
#: with the kernel widened by the downscale factor; torch does the same with ``antialias=True``
#: (bicubic with a = -0.5, as PIL). Lanczos, box and Hamming have no torch kernel.
RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _get(d: Any, key: str) -> Any:
    """A field of a size dict (transformers 4: ``dict``; 5: ``SizeDict``)."""
    if d is None:
        return None
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


@dataclass(frozen=True)
class ClipPreprocessing:
    """The steps of a CLIP image processor, carried out on tensors (differentiable).

    Attributes:
        size: shorter side after resizing (``size.shortest_edge``), or ``(height, width)``; None: no resize.
        resample: PIL resample code (3: bicubic, 2: bilinear, 0: nearest).
        crop: ``(height, width)`` of the centre crop; None: no crop.
        rescale_factor: multiplies the 0..255 pixel values (1/255); None: no rescale.
        mean, std: per-channel normalisation; None: no normalisation.
    """

    size: int | tuple[int, int] | None
    resample: int = 3
    crop: tuple[int, int] | None = None
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
    std: tuple[float, ...] | None = OPENAI_CLIP_STD

    def __post_init__(self):
        if self.size is not None and self.resample not in RESAMPLE_MODES:
            name = _RESAMPLE_NAMES.get(self.resample, str(self.resample))
            raise OnestepError(
                f"CLIP preprocessing: resample {name!r} has no differentiable torch version; onestep supports "
                "bicubic (3), bilinear (2) and nearest (0): set \"resample\" in preprocessor_config.json"
            )

    @classmethod
    def openai(cls, image_size: int) -> "ClipPreprocessing":
        """OpenAI CLIP's preprocessing at ``image_size``: bicubic shorter side, centre crop, OpenAI mean/std."""
        return cls(size=image_size, resample=3, crop=(image_size, image_size))

    @classmethod
    def from_processor(cls, processor: Any) -> "ClipPreprocessing":
        """The steps of a ``transformers.CLIPImageProcessor`` (its ``do_*`` flags honoured)."""
        size = None
        if getattr(processor, "do_resize", True):
            s = processor.size
            if _get(s, "shortest_edge"):
                if _get(s, "longest_edge"):
                    raise OnestepError("CLIP preprocessing with both shortest_edge and longest_edge is not supported")
                size = int(_get(s, "shortest_edge"))
            elif _get(s, "height") and _get(s, "width"):
                size = (int(_get(s, "height")), int(_get(s, "width")))
            else:
                raise OnestepError(f"CLIP preprocessing: unsupported size {s}; give shortest_edge, or height and width")
        crop = None
        if getattr(processor, "do_center_crop", False):
            c = processor.crop_size
            crop = (int(_get(c, "height")), int(_get(c, "width")))
        normalise = getattr(processor, "do_normalize", True)
        return cls(
            size=size,
            resample=int(processor.resample) if processor.resample is not None else 2,
            crop=crop,
            rescale_factor=float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else None,
            mean=tuple(float(m) for m in processor.image_mean) if normalise else None,
            std=tuple(float(s) for s in processor.image_std) if normalise else None,
        )

    @classmethod
    def from_folder(cls, path: str | Path, image_size: int) -> "ClipPreprocessing":
        """The folder's ``preprocessor_config.json`` read by ``CLIPImageProcessor``, else :meth:`openai`."""
        path = Path(path)
        if not (path / "preprocessor_config.json").is_file():
            return cls.openai(image_size)
        from transformers import CLIPImageProcessor

        try:
            processor = CLIPImageProcessor.from_pretrained(path)
        except (OSError, TypeError, ValueError) as e:
            raise OnestepError(f"{path / 'preprocessor_config.json'}: not a readable CLIP image processor config: {e}") from e
        return cls.from_processor(processor)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after the resize (as transformers computes it: the longer side truncated)."""
        if self.size is None:
            return height, width
        if isinstance(self.size, tuple):
            return self.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if width <= height else (self.size, new_long)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 1 or 3, H, W)`` uint8 (0..255) or float in [-1, 1] -> float32 ``pixel_values``, differentiably."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise OnestepError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
        # Pixel values 0..255, as the processor sees a uint8 image; grey repeated to RGB.
        x = images.float() if images.dtype == torch.uint8 else (images.float().clamp(-1, 1) + 1) * 127.5
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.size is not None:
            x = self._resize(x, *self.output_size(*x.shape[-2:]))
        if self.crop is not None:
            x = _center_crop(x, *self.crop)
        if self.rescale_factor is not None:
            x = x * self.rescale_factor
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def _resize(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """PIL's resize of a uint8 image: a horizontal pass, then a vertical one, each saturated to 0..255."""
        mode = RESAMPLE_MODES[self.resample]
        kwargs = {} if mode == "nearest-exact" else {"antialias": True, "align_corners": False}
        if width != x.shape[-1]:
            x = F.interpolate(x, size=(x.shape[-2], width), mode=mode, **kwargs).clamp(0, 255)
        if height != x.shape[-2]:
            x = F.interpolate(x, size=(height, width), mode=mode, **kwargs).clamp(0, 255)
        return x


def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """transformers' centre crop: zero padding (left/top gets the smaller half) when the image is smaller."""
    h, w = x.shape[-2:]
    if height > h or width > w:
        ph, pw = max(height - h, 0), max(width - w, 0)
        x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
        h, w = x.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top : top + height, left : left + width]


def pooled_embeds(out: Any) -> torch.Tensor:
    """The projected embeddings a ``get_*_features`` call returns: a tensor or, in newer transformers, an output
    object holding them (CLIP's and CLAP's)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise OnestepError(f"unexpected CLIP / CLAP output {type(out).__name__}")


class ClipEncoder(nn.Module):
    """A frozen ``CLIPModel`` with its tokenizer and its image preprocessing.

    Args:
        model: a ``transformers.CLIPModel`` (frozen and put in eval mode here).
        tokenizer: its ``CLIPTokenizer``, or None (then only token ids can be given).
        preprocessing: how images become ``pixel_values``; default :meth:`ClipPreprocessing.openai`
            at the model's ``image_size``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, preprocessing: ClipPreprocessing | None = None):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing or ClipPreprocessing.openai(int(model.config.vision_config.image_size))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The model's ``pixel_values`` for ``images`` (uint8, or float in [-1, 1]), on its device."""
        return self.preprocessing(images.to(self.device))

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings (``get_image_features``), differentiable in ``images``."""
        return pooled_embeds(self.model.get_image_features(pixel_values=self.pixels(images)))

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``: padded and truncated to the text model's positions (77 for CLIP)."""
        if self.tokenizer is None:
            raise OnestepError("the CLIP model folder has no tokenizer (vocab.json and merges.txt): save its CLIPTokenizer there")
        limit = min(int(self.model.config.text_config.max_position_embeddings), self.tokenizer.model_max_length)
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected text embeddings (``get_text_features``)."""
        return pooled_embeds(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    def cosine(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``cos(E_img(images[i]), E_txt(tokens[i]))`` for each ``i``, in float32."""
        img = self.image_embeds(images)
        txt = self.text_embeds(input_ids.to(self.device), None if attention_mask is None else attention_mask.to(self.device))
        return F.cosine_similarity(img.float(), txt.float(), dim=-1)

    def prompt_cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """:meth:`cosine` against prompt strings, tokenised with the model's own tokenizer."""
        return self.cosine(images, *self.tokenize(prompts))


def load_clip(path: str | Path, device: torch.device | str = "cpu", need_tokenizer: bool = True, what: str = "--clip-model") -> ClipEncoder:
    """Load a local ``CLIPModel`` folder as a :class:`ClipEncoder`.

    The weights must be safetensors (pickle files are refused, and no remote code runs); the
    ``CLIPTokenizer`` is read from the folder or its ``tokenizer/``; the preprocessing from its
    ``preprocessor_config.json`` (:meth:`ClipPreprocessing.from_folder`).

    Args:
        path: the folder (a local path; nothing is downloaded).
        need_tokenizer: raise when there is no tokenizer (else the encoder has ``tokenizer=None``).
        what: how errors name the folder (``--clip-model``, ``clip_model``).
    """
    from transformers import CLIPModel, CLIPTokenizer

    path = transformers_model_folder(path, what, "CLIPModel")
    tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    tokenizer = None
    if (tok_dir / "vocab.json").is_file() or (tok_dir / "tokenizer.json").is_file():
        try:
            tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        except (OSError, TypeError, ValueError) as e:
            raise OnestepError(f"{tok_dir}: no loadable CLIPTokenizer (vocab.json + merges.txt): {e}") from e
    elif need_tokenizer:
        raise OnestepError(f"{what} {path}: no CLIP tokenizer there (vocab.json and merges.txt, or tokenizer/); save its CLIPTokenizer there")
    # An explicit model class: no auto_map, so no code from the folder runs; safetensors only.
    model = CLIPModel.from_pretrained(path, use_safetensors=True)
    preprocessing = ClipPreprocessing.from_folder(path, int(model.config.vision_config.image_size))
    return ClipEncoder(model, tokenizer, preprocessing).to(device)


__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ClipEncoder", "ClipPreprocessing", "load_clip", "pooled_embeds"]
