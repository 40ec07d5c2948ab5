"""What one click of the demo asks for and gets back, and the checks on what a user sends: the limits
of a request, an uploaded low-res image turned into a tensor, a side-by-side teacher that matches the
student. No model is loaded here (:mod:`onestep.demo.model` runs the requests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.logging import get_logger

from onestep.errors import OnestepError
from onestep.export import Student
from onestep.quickstart import TEACHER_STEPS
from onestep.teachers import Teacher
from onestep.teachers.latents import luma

logger = get_logger(__name__)

MAX_IMAGES = 16
"""At most this many images per request (image students)."""
MAX_POINTS = 5000
"""At most this many points per request (2D students draw one scatter picture)."""
ONE_STEP_STUDENT_MAX_STEPS = 4
"""A one-step student may be run for up to this many steps (denoise, re-noise; see ``Student.timesteps_for``)."""
MAX_TEACHER_STEPS = 200
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 1000
MAX_UPLOAD_SIDE = 4096
"""Uploaded low-res images larger than this on a side are refused (they are resized to the student's low-res size)."""


class DemoInputError(OnestepError):
    """A demo request the demo refuses (empty prompt, steps out of range, too many images, ...)."""


@dataclass
class DemoRequest:
    """One click of *Generate*.

    Args:
        label: class for class-conditional students; None draws classes ``0, 1, 2, ...`` in turn.
        prompt, negative_prompt, nasa_alpha: text-to-image students only (NASA: negative-away
            steering in the cross-attention, ``Z = Z+ - alpha Z-``).
        seed: seed of the first image; image ``i`` uses ``seed + i``.
        steps: student steps, 1 up to :attr:`DemoModel.max_steps`.
        num_images: images (points for 2D students), 1 up to :attr:`DemoModel.max_count`.
        teacher_steps: DDIM steps of the side-by-side teacher.
        with_teacher: also sample the teacher (when the demo has one).
        image: super-resolution students: the low-res image, a ``(H, W)`` or ``(H, W, C)`` uint8 array (what
            ``gradio.Image`` gives); resized to the student's low-res size. None: built-in examples, if any.
    """

    label: int | None = None
    prompt: str = ""
    negative_prompt: str = ""
    nasa_alpha: float = 0.0
    seed: int = 0
    steps: int = 1
    num_images: int = 4
    teacher_steps: int = TEACHER_STEPS
    with_teacher: bool = True
    image: Any = None


@dataclass
class DemoResult:
    """Samples and timings of one request. Seconds are wall time around the sampler call."""

    student_samples: torch.Tensor
    student_seconds: float
    timesteps: list[int]
    seeds: list[int]
    labels: list[int] | None
    device: str
    teacher_samples: torch.Tensor | None = None
    teacher_seconds: float | None = None
    teacher_steps: int | None = None
    teacher_guidance_scale: float | None = None
    lowres: torch.Tensor | None = None
    """Super-resolution: the low-res inputs ``(M, C, h, w)`` in [-1, 1]; sample ``i`` upscales input ``i mod M``."""

    def latency(self) -> dict[str, Any]:
        """Milliseconds per image for the student (and teacher), the speed-up, and the device."""
        n = len(self.seeds)
        out: dict[str, Any] = {
            "device": self.device,
            "gpu": self.device.startswith("cuda"),
            "num_images": n,
            "student": {
                "steps": len(self.timesteps),
                "timesteps": self.timesteps,
                "ms_total": self.student_seconds * 1e3,
                "ms_per_image": self.student_seconds * 1e3 / n,
            },
            "teacher": None,
            "speedup": None,
        }
        if self.teacher_seconds is not None:
            out["teacher"] = {
                "steps": self.teacher_steps,
                "guidance_scale": self.teacher_guidance_scale,
                "ms_total": self.teacher_seconds * 1e3,
                "ms_per_image": self.teacher_seconds * 1e3 / n,
            }
            out["speedup"] = self.teacher_seconds / max(self.student_seconds, 1e-9)
        return out


def student_kind(student: Student) -> str:
    """``"class"``, ``"text"``, ``"image"`` or ``"none"``: which inputs the page shows for this student
    (class-token students, the video teachers', pick a class like class-label ones)."""
    kind = student.conditioning.kind
    return "class" if kind == "class_tokens" else kind


def image_to_tensor(image: Any, channels: int) -> torch.Tensor:
    """An uploaded image (``(H, W)`` or ``(H, W, C)`` array, uint8 0-255 or float 0-1) as ``(1, channels, H, W)``
    in [-1, 1]: grey from colour by luma, colour from grey by repeating, an alpha channel dropped."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or min(arr.shape[:2]) < 1:
        raise DemoInputError(f"the low-res image must be a grey or RGB picture, got an array of shape {arr.shape}")
    if max(arr.shape[:2]) > MAX_UPLOAD_SIDE:
        raise DemoInputError(f"the low-res image is {arr.shape[1]}x{arr.shape[0]}; at most {MAX_UPLOAD_SIDE} pixels a side")
    x = torch.from_numpy(arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0))
    x = x[None] if x.ndim == 2 else x[..., :3].permute(2, 0, 1)
    if channels == 1 and x.shape[0] == 3:
        x = luma(x)
    elif channels == 3 and x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x.clamp(0, 1) * 2 - 1).unsqueeze(0)


def check_teacher_matches(student: Student, teacher: Teacher) -> None:
    """Raise unless ``teacher`` draws the same kind of sample as ``student`` (shape and conditioning)."""
    if tuple(teacher.sample_shape) != tuple(student.sample_shape):
        raise DemoInputError(
            f"teacher {teacher.name} draws samples of shape {tuple(teacher.sample_shape)}, the student "
            f"{student.path} of shape {tuple(student.sample_shape)}; pass the teacher the student was distilled from"
        )
    s, t = student.conditioning, teacher.conditioning
    classes = lambda c: 0 if c.kind == "image" else c.num_classes  # noqa: E731  (an image teacher counts its training inputs)
    if (s.kind, classes(s)) != (t.kind, classes(t)) or getattr(s, "image_channels", None) != getattr(t, "image_channels", None):
        raise DemoInputError(
            f"teacher {teacher.name} is conditioned on {t.kind} ({t.num_classes} classes), the student on "
            f"{s.kind} ({s.num_classes} classes); pass the teacher the student was distilled from"
        )
    if student.meta.get("teacher", {}).get("sha256") not in (None, "", teacher.sha256):
        logger.warning(f"the student {student.path} was distilled from another teacher than {teacher.name} (weights differ)")


__all__ = [
    "check_teacher_matches",
    "DemoInputError",
    "DemoRequest",
    "DemoResult",
    "image_to_tensor",
    "MAX_IMAGES",
    "MAX_POINTS",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "MAX_TEACHER_STEPS",
    "MAX_UPLOAD_SIDE",
    "ONE_STEP_STUDENT_MAX_STEPS",
    "student_kind",
]
