"""The :class:`Teacher` record every loader returns (built-in teachers and diffusers folders), and
the checks the loaders share on weight files: hashing them and refusing pickles.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..conditioning import Cond, Conditioning
from ..denoiser import Denoiser
from ..errors import TeacherError
from ..files import PICKLE_SUFFIXES
from ..schedule import NoiseSchedule

RealSampler = Callable[[int, torch.Generator], tuple[torch.Tensor, Cond]]


@dataclass
class Teacher:
    """A frozen teacher and what is needed to distil it.

    Attributes:
        name: built-in name or the path it was loaded from.
        backbone: the network (frozen; ``requires_grad`` off).
        schedule: its noise schedule.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        conditioning: how it is conditioned (and the null condition for guidance).
        sample_shape: shape of one sample, e.g. ``(1, 16, 16)`` or ``(2,)``.
        guidance_scale: a sensible default CFG scale for sampling it.
        clip: clamp x0 predictions to ``[-clip, clip]`` when sampling (None: no clamp).
        sha256: a hash of its weights (or of its analytic definition).
        real_data: draws ``(x0, cond)`` from the teacher's training data, if there is any.
        student_factory: builds a fresh student backbone when the generator cannot be a
            copy of the teacher (analytic teachers); None means "copy the teacher".
        student_prediction_type: what such fresh networks predict (default: the teacher's).
            Analytic teachers use ``v_prediction``: an eps-predicting generator at t = T-1
            would amplify its errors by s_T / a_T (about 150 for the gmm schedule).
        analytic: True when the teacher has no weights (exact score).
        vae: for latent teachers (text-to-image), the frozen autoencoder between images and
            the latents the teacher works on (:class:`onestep.teachers.latents.LatentVAE`); None for
            pixel-space teachers.
    """

    name: str
    backbone: nn.Module
    schedule: NoiseSchedule
    prediction_type: str
    conditioning: Conditioning
    sample_shape: tuple[int, ...]
    guidance_scale: float = 1.0
    clip: float | None = None
    sha256: str = ""
    real_data: RealSampler | None = None
    student_factory: Callable[[], nn.Module] | None = None
    student_prediction_type: str | None = None
    analytic: bool = False
    meta: dict = field(default_factory=dict)
    vae: nn.Module | None = None

    def __post_init__(self):
        supported = ("flow",) if self.schedule.kind == "flow" else ("epsilon", "v_prediction", "sample")
        if self.prediction_type not in supported:
            raise TeacherError(
                f"teacher {self.name}: prediction_type {self.prediction_type!r} (its scheduler config) is not supported "
                f"with a {'flow-matching' if self.schedule.kind == 'flow' else 'DDPM-style'} schedule; expected one of {', '.join(supported)}"
            )
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        if self.vae is not None:
            self.vae.requires_grad_(False).eval()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images from samples: the VAE decode of latents, or the samples themselves."""
        return x if self.vae is None else self.vae.decode(x)

    def denoiser(self) -> Denoiser:
        return Denoiser(self.backbone, self.schedule, self.prediction_type)

    @property
    def trainable_prediction_type(self) -> str:
        """Prediction type of the networks :meth:`new_backbone` builds."""
        return self.student_prediction_type or self.prediction_type

    def new_backbone(self) -> nn.Module:
        """A trainable network shaped for this teacher: a copy of it, or a fresh student; float32 (its
        optimizer keeps float32 masters) whatever dtype the teacher's weights were loaded in."""
        net = self.student_factory() if self.student_factory is not None else copy.deepcopy(self.backbone)
        net.float()
        net.requires_grad_(True)
        net.train()
        return net


def dtype_option(dtype: torch.dtype | None) -> dict[str, Any]:
    """``from_pretrained``'s keyword for loading weights in ``dtype`` (none for None / float32)."""
    return {} if dtype in (None, torch.float32) else {"torch_dtype": dtype}


def _sha256_of(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def refuse_pickles(folder: Path) -> None:
    """Raise if ``folder`` holds pickle weights and no safetensors (we never unpickle)."""
    pickles = [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles and not list(folder.rglob("*.safetensors")):
        raise TeacherError(
            f"{folder} holds only pickle weights ({pickles[0].name}); onestep loads safetensors only. "
            "Convert it once with diffusers: Model.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )


__all__ = ["RealSampler", "Teacher", "dtype_option", "refuse_pickles"]
