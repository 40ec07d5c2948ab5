"""DDIM sampling of a teacher with classifier-free guidance (for comparisons and references)."""

from __future__ import annotations

import numpy as np
import torch

from onestep.conditioning import Cond
from onestep.denoiser import Denoiser
from onestep.schedule import expand_like

from .noise import per_sample_noise


def ddim_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """``num_steps`` integer timesteps from ``T-1`` down to 0, evenly spaced."""
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    return [int(t) for t in np.linspace(num_train_timesteps - 1, 0, num_steps).round()]


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: Cond = None,
    uncond: Cond = None,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    clip: float | None = None,
    generators: list[torch.Generator] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample with DDIM from pure noise ``noise`` (``x_T``).

    Args:
        denoiser: an x0-predicting :class:`~onestep.denoiser.Denoiser`.
        noise: the starting ``x_T``, one slice per sample.
        cond, uncond: conditioning and the unconditional branch for guidance.
        num_steps: number of model evaluations (each one batched over cond and uncond).
        guidance_scale: ``s`` in ``uncond + s (cond - uncond)``; 1 disables guidance.
        eta: 0 for deterministic DDIM; > 0 adds fresh noise drawn from ``generators``.
        clip: clamp each x0 prediction to ``[-clip, clip]`` (images in [-1, 1]); None for no clamp.
    """
    schedule = denoiser.schedule
    ts = ddim_timesteps(schedule.num_train_timesteps, num_steps)
    x = noise.float()
    n = x.shape[0]
    it = ts
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(ts, desc="DDIM", leave=False)
    for i, t in enumerate(it):
        tt = torch.full((n,), t, dtype=torch.long, device=x.device)
        x0 = denoiser.guided(x, tt, cond, uncond, guidance_scale)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if i == len(ts) - 1:
            return x0
        eps = schedule.eps_from_x0(x0, x, tt)
        tn = torch.full((n,), ts[i + 1], dtype=torch.long, device=x.device)
        a, s = (expand_like(v, x) for v in schedule.alpha_sigma(tt))
        an, sn = (expand_like(v, x) for v in schedule.alpha_sigma(tn))
        sigma = eta * (sn**2 / s**2).sqrt() * (1 - a**2 / an**2).clamp(min=0).sqrt()
        x = an * x0 + (sn**2 - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            if generators is None:
                raise ValueError("eta > 0 needs per-sample generators")
            x = x + sigma * per_sample_noise(generators, tuple(x.shape[1:]), x.device)
    return x
