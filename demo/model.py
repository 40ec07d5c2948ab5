"""What the demo runs, without gradio: load a student (and a teacher) once, check a request, sample, time.

The sampling goes through the same functions as ``onestep sample``
(:func:`~onestep.samplers.student.sample_student_from_seeds`, and
:func:`~onestep.samplers.student.teacher_sample_from_seeds` for the side-by-side teacher), so
the demo has no inference path of its own. Sample ``i`` of a request uses seed ``seed + i``,
as in ``onestep sample``: the same seed gives the same image in both.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.logging import get_logger

from onestep.errors import OnestepError
from onestep.export import Student, load_student
from onestep.quickstart import TEACHER_STEPS
from onestep.runtime import default_device, timed
from onestep.teachers import Teacher, load_teacher
from onestep.viz import save_samples_picture, to_uint8

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
    """``"class"``, ``"text"`` or ``"none"``: which inputs the page shows for this student."""
    return student.conditioning.kind


def check_teacher_matches(student: Student, teacher: Teacher) -> None:
    """Raise unless ``teacher`` draws the same kind of sample as ``student`` (shape and conditioning)."""
    if tuple(teacher.sample_shape) != tuple(student.sample_shape):
        raise DemoInputError(
            f"teacher {teacher.name} draws samples of shape {tuple(teacher.sample_shape)}, the student "
            f"{student.path} of shape {tuple(student.sample_shape)}; pass the teacher the student was distilled from"
        )
    s, t = student.conditioning, teacher.conditioning
    if (s.kind, s.num_classes) != (t.kind, t.num_classes):
        raise DemoInputError(
            f"teacher {teacher.name} is conditioned on {t.kind} ({t.num_classes} classes), the student on "
            f"{s.kind} ({s.num_classes} classes); pass the teacher the student was distilled from"
        )
    if student.meta.get("teacher", {}).get("sha256") not in (None, "", teacher.sha256):
        logger.warning(f"the student {student.path} was distilled from another teacher than {teacher.name} (weights differ)")


class DemoModel:
    """A student (and optionally a teacher) loaded once, with the demo's limits and its one sampling call.

    Sampling holds a lock: requests run one at a time, so a latency is never measured while
    another request shares the cores (or the GPU).
    """

    def __init__(self, student: Student, teacher: Teacher | None = None, device: torch.device | str | None = None):
        from accelerate import PartialState

        PartialState()  # accelerate's logger needs the (single-process) state to exist
        self.device = torch.device(device) if device is not None else default_device()
        self.teacher = teacher
        self._teacher_denoiser = teacher.denoiser().to(self.device) if teacher is not None else None
        self._lock = threading.Lock()
        self.student = student
        if teacher is not None:
            check_teacher_matches(student, teacher)

    @classmethod
    def load(cls, student_dir: str | Path, teacher: str | Path | None = None, device: torch.device | str | None = None, warm_up: bool = True) -> DemoModel:
        """Load the student folder (and the teacher: a built-in name or a diffusers folder) once.

        ``warm_up`` samples one image so that the first request's latency is not the first call's.
        """
        device = torch.device(device) if device is not None else default_device()
        student = load_student(student_dir, device=device)
        model = cls(student, load_teacher(teacher) if teacher is not None else None, device)
        if warm_up and model.kind != "text":
            model.run(DemoRequest(num_images=1, steps=1, teacher_steps=1))
        return model

    # What the page shows for this student -------------------------------------------------------

    @property
    def kind(self) -> str:
        return student_kind(self.student)

    @property
    def is_points(self) -> bool:
        """2D students: one scatter picture of ``num_images`` points instead of images."""
        return len(self.student.sample_shape) == 1

    @property
    def num_classes(self) -> int:
        return self.student.conditioning.num_classes if self.kind == "class" else 0

    @property
    def max_steps(self) -> int:
        """Steps the student supports: its trained timesteps, or up to 4 for a one-step student."""
        k = len(self.student.timesteps)
        return ONE_STEP_STUDENT_MAX_STEPS if k == 1 else k

    @property
    def max_count(self) -> int:
        return MAX_POINTS if self.is_points else MAX_IMAGES

    @property
    def audio(self) -> dict | None:
        """The student's audio settings (mel-spectrogram students of the ``sounds`` teacher), else None."""
        from onestep.audio import audio_meta_of

        return audio_meta_of(self.student.meta)

    def sound_of(self, x: torch.Tensor) -> tuple[int, np.ndarray] | None:
        """The first sample of ``x`` as ``(sample rate, int16 waveform)`` for ``gradio.Audio``, vocoded as
        ``onestep sample`` writes WAVs (:func:`onestep.audio.write_sounds`); None for non-audio students."""
        from onestep.audio import AUDIO_META, mel_to_waveform

        if self.audio is None:
            return None
        w = mel_to_waveform(x[:1].detach().float().cpu())[0].numpy()
        w = 0.9 * w / max(float(np.abs(w).max()), 1e-9)  # the peak level write_wav gives
        return int(AUDIO_META["sample_rate"]), np.round(w * 32767).astype(np.int16)

    def describe(self) -> str:
        """One line about the loaded models, for the page's header."""
        s = self.student
        cond = {"class": f"class-conditional ({self.num_classes} classes)", "text": "text-to-image", "none": "unconditional"}[self.kind]
        shape = "x".join(str(d) for d in s.sample_shape)
        k = len(s.timesteps)
        line = f"student `{s.path}`: {s.meta.get('method', '?')}, {k} step{'s' if k > 1 else ''} {s.timesteps}, {cond}, samples {shape}"
        if self.teacher is not None:
            line += f"; teacher `{self.teacher.name}` (DDIM, CFG {self.teacher.guidance_scale:g})"
        gpu = "GPU" if self.device.type == "cuda" else "CPU, no GPU"
        return f"{line}; device {self.device.type} ({gpu})"

    # Requests -----------------------------------------------------------------------------------

    def check(self, req: DemoRequest) -> None:
        """Raise :class:`DemoInputError` with a message for the page if ``req`` cannot be run."""
        if req.seed is None or not 0 <= int(req.seed) <= MAX_SEED:
            raise DemoInputError(f"seed must be a whole number in [0, {MAX_SEED}] (got {req.seed})")
        if req.steps is None or not 1 <= int(req.steps) <= self.max_steps:
            raise DemoInputError(f"steps must lie in [1, {self.max_steps}] for this student (got {req.steps})")
        what = "points" if self.is_points else "images"
        if req.num_images is None or not 1 <= int(req.num_images) <= self.max_count:
            raise DemoInputError(f"number of {what} must lie in [1, {self.max_count}] (got {req.num_images})")
        if self.teacher is not None and req.with_teacher and not 1 <= int(req.teacher_steps) <= MAX_TEACHER_STEPS:
            raise DemoInputError(f"teacher steps must lie in [1, {MAX_TEACHER_STEPS}] (got {req.teacher_steps})")
        if self.kind == "class":
            if req.label is not None and not 0 <= int(req.label) < self.num_classes:
                raise DemoInputError(f"class must lie in [0, {self.num_classes - 1}] (got {req.label})")
        elif req.label is not None:
            raise DemoInputError("a class was given, but this student is not class-conditional")
        if self.kind == "text":
            if not (req.prompt or "").strip():
                raise DemoInputError("the prompt is empty: type what the image should show")
            if len(req.prompt) > MAX_PROMPT_CHARS or len(req.negative_prompt or "") > MAX_PROMPT_CHARS:
                raise DemoInputError(f"prompts are limited to {MAX_PROMPT_CHARS} characters")
            if not 0.0 <= float(req.nasa_alpha) <= 1.0:
                raise DemoInputError(f"NASA alpha must lie in [0, 1] (got {req.nasa_alpha})")

    def labels_for(self, req: DemoRequest) -> list[int] | None:
        if self.kind != "class":
            return None
        n = int(req.num_images)
        return [int(req.label)] * n if req.label is not None else [i % self.num_classes for i in range(n)]

    def run(self, req: DemoRequest) -> DemoResult:
        """Check ``req``, then sample the student (and the teacher, same seeds and classes), timing each call."""
        result = self.run_student(req)
        if self.teacher is not None and req.with_teacher:
            self.run_teacher(req, result)
        return result

    def run_student(self, req: DemoRequest) -> DemoResult:
        """Check ``req`` and sample the student only (the page shows these before the teacher's)."""
        from onestep.samplers.student import sample_student_from_seeds

        self.check(req)
        seeds = list(range(int(req.seed), int(req.seed) + int(req.num_images)))
        if self.kind == "text":
            return self._run_text_student(req, seeds)
        labels = self.labels_for(req)
        with self._lock:
            s = self.student
            timesteps = s.timesteps_for(int(req.steps))
            (xs, _), sec = timed(sample_student_from_seeds, s.generator, s, timesteps, seeds, labels, device=self.device)
        return DemoResult(xs, sec, timesteps, seeds, labels, str(self.device))

    def _run_text_student(self, req: DemoRequest, seeds: list[int]) -> DemoResult:
        """Text-to-image students: the prompt for every image, a negative prompt through NASA
        (``sample_text_student``, the sampler ``onestep sample --prompt`` uses), decoded by the VAE."""
        from onestep.errors import OnestepError
        from onestep.samplers.student import sample_text_student

        negative = (req.negative_prompt or "").strip() or None
        alpha = float(req.nasa_alpha) if negative else 0.0
        if negative and alpha == 0:
            raise DemoInputError("a negative prompt acts through NASA here: set NASA alpha above 0 (0.1 for SD1.5, 0.2 for SD2.1)")
        with self._lock:
            s = self.student
            timesteps = s.timesteps_for(int(req.steps))
            try:
                xs, sec = timed(sample_text_student, s, [req.prompt.strip()], seeds, int(req.steps), negative, alpha, self.device)
            except OnestepError as e:
                raise DemoInputError(str(e)) from e
        return DemoResult(xs, sec, timesteps, seeds, None, str(self.device))

    def run_teacher(self, req: DemoRequest, result: DemoResult) -> DemoResult:
        """Sample the teacher for the seeds and classes of ``result`` (the student's) and add them to it."""
        from onestep.samplers.student import teacher_sample_from_seeds

        if self.teacher is None:
            raise DemoInputError("this demo has no teacher: start it with --teacher to compare")
        if self.kind == "text":
            raise DemoInputError("the side-by-side teacher is not available for text-to-image students yet")
        self.check(req)
        t = self.teacher
        with self._lock:
            xt, sec = timed(
                teacher_sample_from_seeds, self._teacher_denoiser, t, result.seeds, result.labels, int(req.teacher_steps),
                t.guidance_scale, device=self.device,
            )
        result.teacher_samples, result.teacher_seconds = xt, sec
        result.teacher_steps, result.teacher_guidance_scale = int(req.teacher_steps), t.guidance_scale
        return result

    def swap_student(self, student_dir: str | Path) -> None:
        """Replace the student by another folder; on any error the current one stays loaded."""
        if not str(student_dir).strip():
            raise DemoInputError("the student folder is empty: give the path of a folder with onestep.json and generator/")
        student = load_student(str(student_dir).strip(), device=self.device)
        if self.teacher is not None:
            check_teacher_matches(student, self.teacher)
        with self._lock:
            self.student = student
        logger.info(f"demo now serves the student {student.path}")


def gallery_items(x: torch.Tensor, seeds: list[int], labels: list[int] | None, title: str = "") -> list[tuple[np.ndarray, str]]:
    """Images as ``(H, W[, C])`` uint8 arrays at their own resolution, captioned with class and seed;
    2D samples as one scatter picture (drawn by :func:`onestep.viz.save_samples_picture`)."""
    if x.ndim == 2:
        from PIL import Image

        with tempfile.TemporaryDirectory() as d:
            path = save_samples_picture(x, Path(d) / "scatter.png", title=title)
            pic = np.asarray(Image.open(path).convert("RGB"))
        return [(pic, f"{len(x)} points, seeds {seeds[0]}-{seeds[-1]}")]
    items = []
    for i, img in enumerate(to_uint8(x)):
        caption = f"class {labels[i]}, seed {seeds[i]}" if labels is not None else f"seed {seeds[i]}"
        items.append((img[..., 0] if img.shape[-1] == 1 else img, caption))
    return items
