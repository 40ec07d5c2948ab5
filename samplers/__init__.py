"""Sampling: one-step and K-step students, DDIM for teachers. Plain functions."""

from .ddim import ddim_sample, ddim_timesteps
from .noise import per_sample_noise, seed_generators
from .nasa import nasa, nasa_pipeline_call
from .student import sample_student_from_seeds, sample_text_student, student_sample, teacher_sample_from_seeds

__all__ = [
    "ddim_sample",
    "ddim_timesteps",
    "nasa",
    "nasa_pipeline_call",
    "per_sample_noise",
    "seed_generators",
    "sample_student_from_seeds",
    "sample_text_student",
    "student_sample",
    "teacher_sample_from_seeds",
]
