"""Conditioning and the project's one classifier-free-guidance convention.

Guidance everywhere in onestep is ``out = uncond + s * (cond - uncond)``: ``s = 1``
means no guidance, ``s = 0`` is the unconditional model. A negative prompt simply
replaces the unconditional branch. Other papers' conventions are converted here and
nowhere else (LCM writes ``x_c + w (x_c - x_u)``, i.e. our ``s = w + 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    guidance). ``"text"`` is :class:`onestep.teachers.text.TextConditioning` (conditions are
    dicts of prompt embeddings).
    """

    kind: str = "none"
    num_classes: int = 0
    null_class: int | None = None

    def __post_init__(self):
        if self.kind not in ("none", "class", "text"):
            raise ConfigError(f"unknown conditioning kind {self.kind!r}; expected 'none', 'class' or 'text'")
        if self.kind == "class" and (self.num_classes < 1 or self.null_class is None):
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
