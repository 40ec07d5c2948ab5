"""onestep: distil diffusion models into one-step (and few-step) generators.

The core lives here (schedules, the denoiser interface, conditioning and guidance, the
triad, teachers, configs, student export); methods live in :mod:`onestep.trainers`,
sampling in :mod:`onestep.samplers`.
"""

__version__ = "0.1.0"
