"""onestep: distil diffusion models into one-step (and few-step) generators.

This package is the core every part shares; it imports nothing from the outer packages
(:mod:`onestep.trainers`, :mod:`onestep.samplers`, :mod:`onestep.eval`, :mod:`onestep.demo`)
except in its entry points, ``cli.py`` and ``quickstart.py``.

| module | holds |
|---|---|
| ``schedule`` | noise schedules (VP-DDPM, flow matching) and prediction-type conversions |
| ``denoiser`` | :class:`Denoiser`, any backbone as an x0 predictor, with guidance |
| ``conditioning`` | conditions (class, text, none), null conditions, the one CFG convention |
| ``triad`` | teacher, fake score (copy, LoRA or none) and generator |
| ``lora`` | the one home of LoRA: target layers, adding and merging adapters |
| ``consistency`` | consistency maths shared by training, sampling and export |
| ``teachers/`` | built-in teachers and diffusers loaders (``sd``, ``sd3``), text (``text``), latents (``latents``) |
| ``pipeline`` | student pipeline folders for SD / SDXL / SD3 students |
| ``export`` | student folders: write and load (safetensors only) |
| ``weights`` | weights I/O and the checkpoint reader evaluation needs |
| ``clip`` | the one CLIP wrapper (VSD's CLIP loss and the CLIP score) |
| ``config`` | YAML presets, ``--key value`` overrides, :func:`config_field` |
| ``files``, ``runtime``, ``errors``, ``viz``, ``digits`` | suffixes and cache root, device and timing, errors, pictures, the digits data |
| ``cli``, ``quickstart`` | the ``onestep`` command and the quickstart |
"""

__version__ = "0.1.0"
