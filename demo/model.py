"""What the demo runs, without gradio: load a student (and a teacher) once, check a request, sample, time.

The sampling goes through the same functions as ``onestep sample``
(:func:`~onestep.samplers.student.sample_student_from_seeds`, and
:func:`~onestep.samplers.student.teacher_sample_from_seeds` for the side-by-side teacher), so
the demo has no inference path of its own. Sample ``i`` of a request uses seed ``seed + i``,
as in ``onestep sample``: the same seed gives the same image in both.

Super-resolution students (image-conditioned: ``digits-sr``'s, an SD x4 upscaler's) take a low-res image
(an upload, resized to the student's low-res size; without one, ``digits-sr`` students use its held-out
digits) through :func:`~onestep.samplers.student.super_resolve`, the sampler of ``onestep sample --image``;
the page shows the input and its bicubic upsampling beside them. Video students (5-D samples) show each
clip as one strip of frames.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger

from onestep.export import Student, load_student
from onestep.runtime import default_device, timed
from onestep.teachers import Teacher, load_teacher

from .request import (
    MAX_IMAGES,
    MAX_POINTS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_TEACHER_STEPS,
    ONE_STEP_STUDENT_MAX_STEPS,
    DemoInputError,
    DemoRequest,
    DemoResult,
    check_teacher_matches,
    image_to_tensor,
    student_kind,
)

logger = get_logger(__name__)

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
        if warm_up and model.kind != "text" and (model.kind != "image" or model.has_example_images):
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
        """The student's audio settings (students of the ``sounds`` teacher or of an AudioLDM one), else None."""
        from onestep.audio import audio_meta_of

        return audio_meta_of(self.student.meta)

    def sound_of(self, x: torch.Tensor) -> tuple[int, np.ndarray] | None:
        """The first sample of ``x`` as ``(sample rate, int16 waveform)`` for ``gradio.Audio``, vocoded as
        ``onestep sample`` writes WAVs (:func:`onestep.audio.waveforms_of`); None for non-audio students."""
        from onestep.audio import waveforms_of

        if self.audio is None:
            return None
        waves, rate = waveforms_of(x[:1].detach().float().cpu(), self.audio, self.student.vae)
        w = waves[0].numpy()
        w = 0.9 * w / max(float(np.abs(w).max()), 1e-9)  # the peak level write_wav gives
        return int(rate), np.round(w * 32767).astype(np.int16)

    def describe(self) -> str:
        """One line about the loaded models, for the page's header."""
        s = self.student
        cond = {"class": f"class-conditional ({self.num_classes} classes)", "text": "text-to-audio" if self.audio else "text-to-image",
                "none": "unconditional",
                "image": f"super-resolution (x{getattr(s.conditioning, 'scale', '?')}, low-res {self.lowres_size[1]}x{self.lowres_size[0]} inputs)"
                if self.kind == "image" else ""}[self.kind]
        shape = "x".join(str(d) for d in s.sample_shape)
        k = len(s.timesteps)
        line = f"student `{s.path}`: {s.meta.get('method', '?')}, {k} step{'s' if k > 1 else ''} {s.timesteps}, {cond}, samples {shape}"
        if self.teacher is not None:
            line += f"; teacher `{self.teacher.name}` (DDIM, CFG {self.teacher.guidance_scale:g})"
        gpu = "GPU" if self.device.type == "cuda" else "CPU, no GPU"
        return f"{line}; device {self.device.type} ({gpu})"

    @property
    def lowres_size(self) -> tuple[int, int]:
        """Super-resolution students: the ``(h, w)`` an input is resized to (an upscaler's latents sit at the
        low-res size; a pixel student's output is ``scale`` times it)."""
        cond, (h, w) = self.student.conditioning, self.student.sample_shape[-2:]
        return (h, w) if not cond.upsample else (max(1, h // cond.scale), max(1, w // cond.scale))

    @property
    def has_example_images(self) -> bool:
        """Students of the built-in ``digits-sr`` teacher: its held-out digits stand in for an upload."""
        return self.kind == "image" and (self.student.meta.get("teacher") or {}).get("name") == "digits-sr"

    def lowres_for(self, req: DemoRequest) -> torch.Tensor:
        """The low-res inputs of a super-resolution request, ``(M, C, h, w)`` in [-1, 1]: the upload resized (area
        average, or bicubic when it is smaller) to :attr:`lowres_size`, or ``digits-sr``'s first held-out digits."""
        import torch.nn.functional as F

        cond = self.student.conditioning
        if req.image is None:
            if not self.has_example_images:
                raise DemoInputError("upload a low-res image: this student has no built-in examples")
            from onestep.teachers.sr import digits_sr_split

            return cond.degrade(digits_sr_split("test")[: int(req.num_images)])
        x = image_to_tensor(req.image, cond.image_channels)
        if tuple(x.shape[-2:]) != self.lowres_size:
            smaller = x.shape[-2] < self.lowres_size[0] or x.shape[-1] < self.lowres_size[1]
            x = F.interpolate(x, size=self.lowres_size, mode="bicubic" if smaller else "area", **({"align_corners": False} if smaller else {}))
        return x.clamp(-1, 1)

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
        if self.kind != "image" and req.image is not None:
            raise DemoInputError("an image was given, but this student does not take a low-res image")
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
        if self.kind == "image":
            return self._run_image_student(req, seeds)
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

    def _run_image_student(self, req: DemoRequest, seeds: list[int]) -> DemoResult:
        """Super-resolution students: sample ``i`` upscales input ``i mod M`` with seed ``seed + i``
        (:func:`~onestep.samplers.student.super_resolve`, the sampler of ``onestep sample --image``)."""
        from onestep.samplers.student import super_resolve

        lowres = self.lowres_for(req)
        with self._lock:
            s = self.student
            timesteps = s.timesteps_for(int(req.steps))
            xs, sec = timed(super_resolve, s, lowres, seeds, int(req.steps), self.device)
        return DemoResult(xs, sec, timesteps, seeds, None, str(self.device), lowres=lowres)

    def run_teacher(self, req: DemoRequest, result: DemoResult) -> DemoResult:
        """Sample the teacher for the seeds and classes of ``result`` (the student's) and add them to it."""
        from onestep.samplers.student import on_lowres, teacher_sample_from_seeds

        if self.teacher is None:
            raise DemoInputError("this demo has no teacher: start it with --teacher to compare")
        if self.kind == "text":
            raise DemoInputError("the side-by-side teacher is not available for text-to-image students yet")
        self.check(req)
        t, labels = self.teacher, result.labels
        if self.kind == "image":
            if self.student.meta.get("upscaler") is not None:
                raise DemoInputError("the side-by-side teacher is not available for SD x4 upscaler students yet")
            t, labels = on_lowres(self.teacher, result.lowres, len(result.seeds))  # as super_resolve conditions the student
        with self._lock:
            xt, sec = timed(
                teacher_sample_from_seeds, self._teacher_denoiser, t, result.seeds, labels, int(req.teacher_steps),
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
