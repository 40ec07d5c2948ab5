"""Conditioning and the project's one classifier-free-guidance convention.

Guidance everywhere in onestep is ``out = uncond + s * (cond - uncond)``: ``s = 1``
means no guidance, ``s = 0`` is the unconditional model. A negative prompt simply
replaces the unconditional branch. Other papers' conventions are converted here and
nowhere else (LCM writes ``x_c + w (x_c - x_u)``, i.e. our ``s = w + 1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import ConfigError

Cond = torch.Tensor | dict[str, torch.Tensor] | None


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance, ``uncond + scale * (cond - uncond)``.

    ``scale`` may be a float or a per-sample tensor of shape ``(B,)``.
    """
    if isinstance(scale, torch.Tensor) and scale.ndim == 1:
        scale = scale.reshape(-1, *([1] * (cond.ndim - 1))).to(cond)
    return uncond + scale * (cond - uncond)


def lcm_w_to_scale(w: float | torch.Tensor) -> float | torch.Tensor:
    """LCM's guidance ``x_c + w (x_c - x_u)`` in our convention: ``s = w + 1``."""
    return w + 1


def scale_to_lcm_w(scale: float | torch.Tensor) -> float | torch.Tensor:
    return scale - 1


def cat_cond(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditionings along the batch (for one batched CFG pass)."""
    if a is None and b is None:
        return None
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def cond_to(c: Cond, device) -> Cond:
    """Move a condition (a tensor, a dict of tensors or None) to ``device``."""
    if c is None:
        return None
    if isinstance(c, dict):
        return {k: v.to(device) for k, v in c.items()}
    return c.to(device)


def index_cond(c: Cond, idx: torch.Tensor | slice) -> Cond:
    if c is None:
        return None
    if isinstance(c, dict):
        return {k: v[idx] for k, v in c.items()}
    return c[idx]


@dataclass
class Conditioning:
    """What the teacher is conditioned on.

    ``kind`` is ``"none"`` (unconditional) or ``"class"`` (integer labels
    ``0 .. num_classes-1`` with ``null_class`` as the unconditional label used by
    guidance). ``"image"`` is :class:`ImageConditioning` (a low-resolution image concatenated to the
    backbone's input channels). ``"text"`` is :class:`onestep.teachers.text.TextConditioning` (conditions are
    dicts of prompt embeddings).
    """

    kind: str = "none"
    num_classes: int = 0
    null_class: int | None = None

    def __post_init__(self):
        if self.kind not in ("none", "class", "text", "image", "class_tokens"):
            raise ConfigError(f"unknown conditioning kind {self.kind!r}; expected 'none', 'class', 'class_tokens', 'text' or 'image'")
        if self.kind in ("class", "class_tokens") and (self.num_classes < 1 or self.null_class is None):
            raise ConfigError("class conditioning needs num_classes >= 1 and a null_class for guidance")

    @property
    def guidable(self) -> bool:
        return self.kind == "class"

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Cond:
        """Random conditions for a batch of ``n`` generator inputs."""
        if self.kind == "none":
            return None
        return torch.randint(0, self.num_classes, (n,), generator=generator).to(device)

    def null(self, n: int, device="cpu") -> Cond:
        """The unconditional branch for guidance."""
        if self.kind == "none":
            return None
        return torch.full((n,), self.null_class, dtype=torch.long, device=device)

    def from_labels(self, labels: list[int] | torch.Tensor, device="cpu") -> Cond:
        if self.kind == "none":
            return None
        labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ConfigError(f"class labels must lie in [0, {self.num_classes - 1}]")
        return labels

    def drop(self, cond: Cond, p: float, generator: torch.Generator | None = None) -> Cond:
        """Replace each condition by the null condition with probability ``p``."""
        if self.kind == "none" or p <= 0:
            return cond
        mask = torch.rand(cond.shape[0], generator=generator) < p
        return torch.where(mask.to(cond.device), torch.full_like(cond, self.null_class), cond)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_classes": self.num_classes, "null_class": self.null_class}


#: The key of a dict condition whose tensor :func:`onestep.denoiser.call_backbone` concatenates to the
#: backbone's input channels (the low-resolution image of super-resolution teachers).
CONCAT_KEY = "image"


@dataclass
class ImageConditioning(Conditioning):
    """A low-resolution image, concatenated to the backbone's input channels (super-resolution).

    The layout of diffusers' ``StableDiffusionUpscalePipeline``: the backbone takes
    ``in_channels = sample channels + image_channels``; a condition is the dict
    ``{"image": (B, image_channels, H, W), **fixed}`` where ``fixed`` holds per-batch constants
    broadcast to every sample (the SD x4 upscaler's ``class_labels`` noise level and prompt
    embedding). ``sample`` draws conditions from ``images`` (the training set of conditions);
    ``from_labels`` takes indices into it (previews cycle through them); ``null`` is None: the
    unguided case (guidance scale 1), there is no unconditional branch.

    Attributes:
        image_channels: channels of the condition image.
        scale: the super-resolution factor (high-res size / low-res size).
        upsample: the condition is the low-res image upsampled (bicubic) to the sample's size (pixel
            teachers); False: it stays at the low-res size (the SD upscaler's latents are that size).
        images: the conditions as the backbone takes them, ``(N, image_channels, H, W)``; None for a
            loaded student (give them with :meth:`with_images` or :meth:`from_lowres`).
        fixed: per-batch constants added to every condition (each of batch size 1).
    """

    kind: str = "image"
    image_channels: int = 1
    scale: int = 4
    upsample: bool = True
    images: torch.Tensor | None = field(default=None, repr=False)
    fixed: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        super().__post_init__()
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.image_channels, self.scale))
        if not ints or self.image_channels < 1 or self.scale < 1 or not isinstance(self.upsample, bool):
            raise ConfigError("image conditioning needs integers image_channels >= 1 and scale >= 1, and upsample true or false")
        self.num_classes = 0 if self.images is None else len(self.images)

    @property
    def guidable(self) -> bool:
        return False

    def with_images(self, images: torch.Tensor) -> "ImageConditioning":
        """The same conditioning over another set of condition images (already as the backbone takes them)."""
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise ConfigError(f"condition images must be (N, {self.image_channels}, H, W), got {tuple(images.shape)}")
        return replace(self, images=images)

    def degrade(self, hr: torch.Tensor) -> torch.Tensor:
        """The low-res image of high-res images ``hr`` in [-1, 1]: an area average over ``scale x scale`` blocks."""
        import torch.nn.functional as F

        return F.interpolate(hr.float(), scale_factor=1 / self.scale, mode="area")

    def from_lowres(self, lowres: torch.Tensor, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """The condition of low-res images ``(B, C, h, w)`` in [-1, 1]: bicubic-upsampled to ``size``
        (default ``scale`` times larger) when ``upsample``, plus the fixed entries."""
        import torch.nn.functional as F

        img = lowres.float()
        if self.upsample:
            size = size or (lowres.shape[-2] * self.scale, lowres.shape[-1] * self.scale)
            img = F.interpolate(img, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
        return self._with_fixed(img)

    def condition_of(self, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        """The condition of high-res images: degrade, then :meth:`from_lowres` back to their size."""
        return self.from_lowres(self.degrade(hr), tuple(hr.shape[-2:]))

    def _with_fixed(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        n = img.shape[0]
        out = {CONCAT_KEY: img}
        for k, v in self.fixed.items():
            out[k] = v.to(img.device).expand(n, *v.shape[1:]) if v.ndim else v.to(img.device).expand(n)
        return out

    def _need_images(self) -> torch.Tensor:
        if self.images is None:
            raise ConfigError("this image conditioning has no condition images: give low-res images (e.g. --image FOLDER)")
        return self.images

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Cond:
        images = self._need_images()
        idx = torch.randint(0, len(images), (n,), generator=generator)
        return cond_to(self._with_fixed(images[idx]), device)

    def null(self, n: int, device="cpu") -> Cond:
        return None

    def from_labels(self, labels: list[int] | torch.Tensor, device="cpu") -> Cond:
        images = self._need_images()
        idx = torch.as_tensor(labels, dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(images)):
            raise ConfigError(f"image indices must lie in [0, {len(images) - 1}]")
        return cond_to(self._with_fixed(images[idx]), device)

    def drop(self, cond: Cond, p: float, generator: torch.Generator | None = None) -> Cond:
        return cond

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "image", "image_channels": self.image_channels, "scale": self.scale, "upsample": self.upsample}


@dataclass
class ClassTokenConditioning(Conditioning):
    """Class labels given to a cross-attention backbone (``UNet3DConditionModel``) as one token: the
    one-hot row ``(B, 1, num_classes + 1)`` of the label (the null class included), under the dict key
    ``encoder_hidden_states``; the backbone's cross-attention projections learn what each class means.
    A condition is ``{"encoder_hidden_states": tokens}``; :meth:`labels_of` reads the labels back."""

    kind: str = "class_tokens"

    def __post_init__(self):
        super().__post_init__()
        if self.null_class != self.num_classes:
            raise ConfigError("class-token conditioning takes the null class as the last token row: null_class = num_classes")

    @property
    def guidable(self) -> bool:
        return True

    def tokens(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        one_hot = torch.nn.functional.one_hot(labels.long(), self.num_classes + 1).float()
        return {"encoder_hidden_states": one_hot[:, None, :]}

    def labels_of(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return cond["encoder_hidden_states"][:, 0].argmax(-1)

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Cond:
        return cond_to(self.tokens(torch.randint(0, self.num_classes, (n,), generator=generator)), device)

    def null(self, n: int, device="cpu") -> Cond:
        return cond_to(self.tokens(torch.full((n,), self.null_class, dtype=torch.long)), device)

    def from_labels(self, labels: list[int] | torch.Tensor, device="cpu") -> Cond:
        return self.tokens(super().from_labels(labels, device))

    def drop(self, cond: Cond, p: float, generator: torch.Generator | None = None) -> Cond:
        if p <= 0:
            return cond
        labels = self.labels_of(cond)
        mask = (torch.rand(labels.shape[0], generator=generator) < p).to(labels.device)
        return self.tokens(torch.where(mask, torch.full_like(labels, self.null_class), labels))

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "kind": "class_tokens"}


def conditioning_from_dict(d: dict[str, Any]) -> Conditioning:
    """The conditioning a ``to_dict()`` describes (``onestep.json``, ``onestep_teacher.json``); text
    conditioning has its own loader (it needs the pipeline's encoders)."""
    if d.get("kind") == "image":
        return ImageConditioning(**{k: v for k, v in d.items() if k != "kind"})
    if d.get("kind") == "class_tokens":
        return ClassTokenConditioning(**{k: v for k, v in d.items() if k != "kind"})
    return Conditioning(**d)
