"""BOOT students (Gu et al., 2023, arXiv:2306.05544): the signal view of a time-conditioned generator.

A BOOT student ``g(eps, t)`` reads the initial noise ``eps`` and a time ``t`` and returns ``y_t``, the
"signal" of the teacher's DDIM trajectory started from ``x_T = eps``: ``x_t = a_t y_t + s_t eps``. Its
network is the teacher's (same class, initialised from it); the network's raw output is turned into
``y_t`` by the teacher's prediction-type conversion at one fixed label, ``signal_timestep`` (``M``),
whatever time ``t`` the network is told::

    y_t = to_x0(net(eps, t), eps, M)      # eps-prediction: (eps - s_M net(eps, t)) / a_M

At ``t = M`` this is the teacher's own x0 prediction from pure noise (the paper's boundary
``y_T = f(eps, T)``), so the initialised student starts on the trajectory's first point. The sample is
``y`` at the lowest time (label 0): one network call.

:class:`BOOTDenoiser` is that view: an x0 :class:`~onestep.denoiser.Denoiser` whose ``t`` is the
network's time input and whose conversion is always at ``M``. ``onestep.json`` records
``boot.signal_timestep``; :func:`onestep.export.load_student` rebuilds the view from it. Training is in
``onestep.trainers.boot``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .conditioning import Cond
from .denoiser import Denoiser, adapters, call_backbone
from .schedule import NoiseSchedule


class BOOTDenoiser(Denoiser):
    """``g(eps, t)``: the network at time ``t`` on input ``eps``, its output converted at ``signal_timestep``.

    Args:
        backbone, schedule, prediction_type, use_adapters: as for :class:`~onestep.denoiser.Denoiser`.
        signal_timestep: the label ``M`` whose ``(a_M, s_M)`` convert the network's output into ``y_t``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        signal_timestep: int = 999,
        use_adapters: bool | None = None,
    ):
        super().__init__(backbone, schedule, prediction_type, use_adapters)
        if not 0 <= int(signal_timestep) < schedule.num_train_timesteps:
            raise ValueError(f"signal_timestep must lie in [0, {schedule.num_train_timesteps - 1}] (got {signal_timestep})")
        self.signal_timestep = int(signal_timestep)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None, return_features: bool = False):
        """``y_t`` (float32) for noise ``x_t`` (the student's input is always the initial noise)."""
        if return_features:
            raise ValueError("a BOOT student exposes no features")
        t = t.to(x_t.device)
        with adapters(self.backbone, self.use_adapters):
            pred = call_backbone(self.backbone, x_t, self.schedule.model_timestep(t), cond)
        m = torch.full((x_t.shape[0],), self.signal_timestep, dtype=torch.long, device=x_t.device)
        return self.schedule.to_x0(pred, x_t, m, self.prediction_type)


def bootstrap_coefficient(schedule: NoiseSchedule, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``1 - (s_s a_t) / (a_s s_t) = 1 - exp(lambda_s - lambda_t)``, float32 ``(B,)``: how far one DDIM step
    from ``t`` down to ``s`` moves the signal towards the teacher's x0 (``lambda = -log(a / s)``).
    Computed in float64."""
    a_t, s_t = (v.double() for v in schedule.alpha_sigma(t))
    a_s, s_s = (v.double() for v in schedule.alpha_sigma(s))
    return (1 - (s_s * a_t) / (a_s * s_t)).float()


def write_boot_scheduler(out: str | Path, meta: dict[str, Any]) -> Path:
    """Write a ``DDIMScheduler`` config with which a diffusers pipeline samples a (VP) BOOT student in its one
    step: ``set_timesteps(1)`` gives ``[0]`` (``linspace`` spacing) and ``alphas_cumprod[0]`` is ``abar`` at
    ``boot.signal_timestep`` (the first of ``trained_betas``; the rest are the teacher's), so the step reads the
    network's output at ``t = 0`` as the signal at ``M``; the final alpha is 1, so the step returns it. Valid for
    ``num_inference_steps=1`` only, which is all a BOOT student does."""
    from diffusers import DDIMScheduler

    schedule = NoiseSchedule.from_scheduler_config(meta["schedule"])
    ac = schedule.alphas_cumprod
    betas = torch.cat([1 - ac[:1], 1 - ac[1:] / ac[:-1]])
    betas[0] = 1 - ac[int(meta["boot"]["signal_timestep"])]
    scheduler = DDIMScheduler(
        num_train_timesteps=len(ac), trained_betas=betas.tolist(), prediction_type=meta["prediction_type"],
        clip_sample=False, set_alpha_to_one=True, timestep_spacing="linspace", steps_offset=1,
    )
    scheduler.save_pretrained(out)
    return Path(out)


__all__ = ["BOOTDenoiser", "bootstrap_coefficient", "write_boot_scheduler"]
