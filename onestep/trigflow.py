"""TrigFlow (sCM, Lu & Song 2024, arXiv:2410.11081, sec. 2) on top of a variance-preserving teacher.

TrigFlow writes the forward process as ``x_t = cos(t) x0 + sin(t) z``, ``z ~ N(0, sigma_d^2 I)``,
``t in [0, pi/2]``, and a network ``F`` predicts the velocity ``dx_t/dt = cos(t) z - sin(t) x0`` as
``sigma_d F(x_t / sigma_d, t)``. A consistency model is then ``f(x_t, t) = cos(t) x_t - sin(t) sigma_d F``.

A VP teacher (``x = a x0 + s eps``, ``a^2 + s^2 = 1``) sees the same point rescaled: with
``r = sqrt(cos^2 t + sigma_d^2 sin^2 t)``,

    a = cos(t) / r,   s = sigma_d sin(t) / r,   x_vp = x_t / r,

at the (fractional) timestep label whose ``abar`` is ``a^2``, found by interpolating the teacher's
log-SNR table. From any x0 prediction ``x0_hat`` at ``(x_vp, label)`` (the project's :class:`Denoiser`),
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

from .conditioning import cat_cond, cfg
from .denoiser import Denoiser, adapters, call_backbone
from .schedule import NoiseSchedule, expand_like, x0_from_prediction


def log_snr_table(schedule: NoiseSchedule) -> torch.Tensor:
    """``log(abar / (1 - abar))`` per integer label (float64, decreasing)."""
    ac = schedule.alphas_cumprod
    return (ac / (1 - ac)).log()


def label_for_log_snr(table: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
    """The fractional timestep label with that log-SNR: linear in log-SNR between the table's entries
    (clamped to ``[0, T-1]``), differentiable in ``log_snr``."""
    desc = table.to(log_snr.device, torch.float64)
    asc = desc.flip(0)  # increasing: label T-1 first
    ls = log_snr.detach().double().clamp(asc[0], asc[-1])
    j = torch.searchsorted(asc, ls).clamp(1, len(asc) - 1)
    lo, hi = asc[j - 1], asc[j]
    frac = ((log_snr.double() - lo) / (hi - lo)).clamp(0, 1)
    # asc index j-1 is label T - j; going up one index lowers the label by one
    label = (len(asc) - j).double() - frac
    return label.to(log_snr.dtype)


def t_for_label(schedule: NoiseSchedule, label: int | torch.Tensor, sigma_d: float) -> torch.Tensor:
    """The TrigFlow time of an integer label: ``tan(t) = s / (a sigma_d)``."""
    a, s = schedule.alpha_sigma(torch.as_tensor(label))
    return torch.atan(s.double() / (a.double() * sigma_d)).float()


def vp_coordinates(t: torch.Tensor, sigma_d: float):
    """``(a, s, r)`` for TrigFlow time ``t``: ``x_vp = x_t / r = a x0 + s eps``."""
    c, sn = torch.cos(t), torch.sin(t)
    r = torch.sqrt(c * c + (sigma_d * sn) ** 2)
    return c / r, sigma_d * sn / r, r


def x0_at(den: Denoiser, x_vp: torch.Tensor, label: torch.Tensor, a: torch.Tensor, s: torch.Tensor, cond,
          uncond=None, scale=1.0) -> torch.Tensor:
    """``den``'s x0 prediction at a fractional ``label`` whose scalings are ``(a, s)`` (the schedule's table
    only knows integer labels), with classifier-free guidance ``scale`` when ``uncond`` is given (one
    batched pass, as :meth:`Denoiser.guided`)."""
    guided = uncond is not None and (isinstance(scale, torch.Tensor) or scale != 1)
    x, lab, c = (torch.cat([x_vp, x_vp]), torch.cat([label, label]), cat_cond(cond, uncond)) if guided else (x_vp, label, cond)
    with adapters(den.backbone, den.use_adapters):
        pred = call_backbone(den.backbone, x, den.schedule.model_timestep(lab), c)
    a2, s2 = (torch.cat([v, v]) if guided else v for v in (a, s))
    x0 = x0_from_prediction(pred, x, expand_like(a2, x), expand_like(s2, x), den.prediction_type)
    if not guided:
        return x0
    n = x_vp.shape[0]
    return cfg(x0[n:], x0[:n], scale)


def velocity(den: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond, sigma_d: float, table: torch.Tensor,
             uncond=None, scale=1.0) -> torch.Tensor:
    """``sigma_d F(x_t / sigma_d, t)``: the velocity ``dx_t/dt`` that ``den`` (guided when ``uncond`` is given)
    implies at TrigFlow time ``t``."""
    a, s, r = vp_coordinates(t, sigma_d)
    label = label_for_log_snr(table, 2 * (torch.log(a) - torch.log(s)))
    x_vp = x_t / expand_like(r, x_t)
    x0 = x0_at(den, x_vp, label, a, s, cond, uncond, scale)
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
