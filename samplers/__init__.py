"""Sampling: one-step and K-step students, DDIM for teachers. Plain functions.

Modules:

- :mod:`~onestep.samplers.student`: students from seeds (one or K steps, class or text
  conditions), and the teacher's guided DDIM on the same seeds.
- :mod:`~onestep.samplers.ddim`: DDIM timesteps and the deterministic DDIM sampler.
- :mod:`~onestep.samplers.noise`: one generator per seed, so sample ``i`` is the same in any batch.
- :mod:`~onestep.samplers.nasa`: negative prompts by NASA (negative-away steering in cross-attention).
- :mod:`~onestep.samplers.commands`: ``onestep sample`` (a student folder into PNGs and ``samples.npz``).
"""

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
