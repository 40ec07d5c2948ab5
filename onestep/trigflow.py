"""TrigFlow (sCM, Lu & Song 2024, arXiv:2410.11081, sec. 2) on top of a variance-preserving teacher.

TrigFlow writes the forward process as ``x_t = cos(t) x0 + sin(t) z``, ``z ~ N(0, sigma_d^2 I)``,
``t in [0, pi/2]``, and a network ``F`` predicts the velocity ``dx_t/dt = cos(t) z - sin(t) x0`` as
``sigma_d F(x_t / sigma_d, t)``. A consistency model is then ``f(x_t, t) = cos(t) x_t - sin(t) sigma_d F``.

A VP teacher (``x = a x0 + s eps``, ``a^2 + s^2 = 1``) sees the same point rescaled: with
``r = sqrt(cos^2 t + sigma_d^2 sin^2 t)``,

    a = cos(t) / r,   s = sigma_d sin(t) / r,   x_vp = x_t / r,

at the (fractional) timestep label whose ``abar`` is ``a^2`` (:meth:`NoiseSchedule.timestep_for_log_snr`;
the schedule and so the :class:`Denoiser` take fractional labels). From any x0 prediction ``x0_hat`` at
``(x_vp, label)``,
``eps_hat = (x_vp - a x0_hat) / s`` and the velocity is ``cos(t) sigma_d eps_hat - sin(t) x0_hat``.
With that ``F``, ``f(x_t, t) = x0_hat`` exactly: an sCM student is an ordinary x0-predicting network,
sampled like any one- or few-step student (x0, re-noise, x0 ...) at integer labels.

Every function here is differentiable in ``t`` (forward mode too): the tangent ``dF/dt`` of sCM goes
through the label, the scalings and the network's own timestep embedding.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from .denoiser import Denoiser
from .schedule import NoiseSchedule, expand_like


def t_for_label(schedule: NoiseSchedule, label: int | torch.Tensor, sigma_d: float) -> torch.Tensor:
    """The TrigFlow time of an integer label: ``tan(t) = s / (a sigma_d)``."""
    a, s = schedule.alpha_sigma(torch.as_tensor(label))
    return torch.atan(s.double() / (a.double() * sigma_d)).float()


def vp_coordinates(t: torch.Tensor, sigma_d: float):
    """``(a, s, r)`` for TrigFlow time ``t``: ``x_vp = x_t / r = a x0 + s eps``."""
    c, sn = torch.cos(t), torch.sin(t)
    r = torch.sqrt(c * c + (sigma_d * sn) ** 2)
    return c / r, sigma_d * sn / r, r


def label_for_t(schedule: NoiseSchedule, t: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """The fractional timestep label of TrigFlow time ``t``: ``log SNR = 2 log(a / s) = -2 log(sigma_d tan t)``."""
    a, s, _ = vp_coordinates(t, sigma_d)
    return schedule.timestep_for_log_snr(2 * (torch.log(a) - torch.log(s)))


def velocity(den: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond, sigma_d: float, uncond=None, scale=1.0) -> torch.Tensor:
    """``sigma_d F(x_t / sigma_d, t)``: the velocity ``dx_t/dt`` that ``den`` (guided when ``uncond`` is given)
    implies at TrigFlow time ``t``."""
    a, s, r = vp_coordinates(t, sigma_d)
    label = label_for_t(den.schedule, t, sigma_d)
    x_vp = x_t / expand_like(r, x_t)
    x0 = den(x_vp, label, cond) if uncond is None else den.guided(x_vp, label, cond, uncond, scale)
    eps = (x_vp - expand_like(a, x_t) * x0) / expand_like(s, x_t)
    return expand_like(torch.cos(t), x_t) * sigma_d * eps - expand_like(torch.sin(t), x_t) * x0


def sample_t(n: int, p_mean: float, p_std: float, sigma_d: float, t_min: float, t_max: float, generator=None) -> torch.Tensor:
    """sCM's proposal: ``tan(t) = exp(tau) / sigma_d``, ``tau ~ N(p_mean, p_std^2)``, clamped to ``[t_min, t_max]``."""
    tau = p_mean + p_std * torch.randn(n, generator=generator)
    return torch.atan(tau.exp() / sigma_d).clamp(t_min, t_max)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """sCM's ``r``: the weight of the tangent's time-derivative terms, linear from 0 to 1 over ``warmup_steps``."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def normalised(g: torch.Tensor, c: float) -> torch.Tensor:
    """Tangent normalisation ``g / (||g|| + c)``, per sample (sCM sec. 4.2)."""
    norm = g.flatten(1).norm(dim=1)
    return g / expand_like(norm + c, g)


def fourier_features(t: torch.Tensor, n: int = 16) -> torch.Tensor:
    """``[cos(k t), sin(k t)]`` for ``k = 1 .. n`` (scaled by ``4 / pi`` so the range spans a few periods)."""
    k = torch.arange(1, n + 1, device=t.device, dtype=t.dtype) * (4 / math.pi)
    return torch.cat([torch.cos(t[:, None] * k), torch.sin(t[:, None] * k)], dim=1)


@contextmanager
def math_attention(backbone: nn.Module):
    """Run a diffusers backbone with its attention computed by plain matmul and softmax (diffusers'
    ``AttnProcessor``) instead of ``scaled_dot_product_attention``, whose fused CPU and GPU kernels have no
    forward-mode derivative; the backbone's own processors come back afterwards."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    layers = [m for m in backbone.modules() if isinstance(m, Attention)]
    saved = [m.processor for m in layers]
    for m in layers:
        m.set_processor(AttnProcessor())
    try:
        yield
    finally:
        for m, proc in zip(layers, saved):
            m.set_processor(proc)


TANGENT_MODES = ("auto", "jvp", "finite_difference")


def tangent(fn, primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...], mode: str, backbone: nn.Module,
            h: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(fn(*primals), d fn along tangents, mode used)``, without gradient to any weight.

    ``jvp``: forward-mode AD (``torch.func.jvp``), with the backbone's attention in plain math;
    ``finite_difference``: the central difference ``(fn(p + h v) - fn(p - h v)) / 2h``;
    ``auto``: jvp, and the finite difference when an op of the backbone has no forward-mode rule.
    """
    from torch.func import jvp

    with torch.no_grad():
        if mode in ("auto", "jvp"):
            try:
                with math_attention(backbone):
                    out, d = jvp(fn, primals, tangents)
                return out, d, "jvp"
            except (NotImplementedError, RuntimeError) as e:
                if mode == "jvp" or "forward AD" not in str(e) and "forward-mode" not in str(e) and "jvp" not in str(e):
                    raise
        out = fn(*primals)
        plus = fn(*(p + h * v for p, v in zip(primals, tangents)))
        minus = fn(*(p - h * v for p, v in zip(primals, tangents)))
        return out, (plus - minus) / (2 * h), "finite_difference"
