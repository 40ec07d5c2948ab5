"""Consistency students: the boundary condition, the LCM timestep grid and the guidance input.

A consistency student (LCM, Luo et al., 2023, arXiv:2310.04378) maps any ``x_t`` on a
teacher ODE trajectory to that trajectory's end. Its output is
``f(x, t) = c_skip(t) x + c_out(t) x0(x, t)`` (LCM eq. 9) with the discrete-time scalings
``c_skip = sd^2 / ((10 t)^2 + sd^2)`` and ``c_out = 10 t / sqrt((10 t)^2 + sd^2)``
(``sd = 0.5``), so ``f(x, 0) = x`` holds exactly. Multistep students (MLCM) use the plain
x0 prediction instead: their boundary condition is the DDIM projection to a segment edge.

Sampling (LCMScheduler's rule): K timesteps picked evenly from the student's grid; at each,
predict ``f``, then re-noise it to the next timestep with fresh noise (or, for segment
students, move along the DDIM line to it). The student folder records the grid, so any
K up to the grid size works; ``timesteps_by_steps`` in ``onestep.json`` lists 1, 2, 4, 8.

Guidance. A student trained on a range of guidance scales receives its scale as an input:

- ``timestep_cond`` (``UNet2DConditionModel`` with ``time_cond_proj_dim``): LCM's
  sinusoidal embedding of ``w * 1000``, ``w = s - 1`` in LCM's convention, exactly what
  diffusers' ``LatentConsistencyModelPipeline`` feeds;
- ``class_table`` (class-conditional ``UNet2DModel`` and ``MLPDenoiser``, whose class
  embedding is a table): the scale is snapped to one of L levels and the label becomes
  ``class + level * stride`` in a table of ``stride * L`` rows (``stride`` = the teacher's
  number of class embeddings, null class included). The student stays a plain diffusers
  model: ``unet(x, t, class_labels=y + level * stride)``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .conditioning import Cond, scale_to_lcm_w
from .denoiser import Denoiser
from .errors import ConfigError
from .schedule import NoiseSchedule, expand_like

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
PARAMETERISATIONS = ("lcm", "segments")


def boundary_scalings(
    t: torch.Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's ``(c_skip, c_out)`` for integer timesteps ``t`` (float32; computed in float64)."""
    st = torch.as_tensor(t).double() * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def lcm_grid(num_train_timesteps: int, num_steps: int, max_timestep: int | None = None) -> list[int]:
    """The N-point DDIM grid, ascending: ``t_j = round(j (t_max + 1) / N) - 1`` for ``j = 1 .. N``.

    With ``t_max = T - 1`` and N dividing T this is LCM's (and LCMScheduler's) grid
    ``k - 1, 2k - 1, .., T - 1`` with skip ``k = T / N``. A lower ``t_max`` keeps the grid
    off timesteps where an eps-predicting network cannot resolve x0 (``sqrt(abar)`` tiny).
    """
    t_max = num_train_timesteps - 1 if max_timestep is None else int(max_timestep)
    if not 0 < t_max < num_train_timesteps:
        raise ConfigError(f"max_timestep must lie in [1, {num_train_timesteps - 1}] (got {max_timestep})")
    if not 1 <= num_steps <= t_max + 1:
        raise ConfigError(f"the DDIM grid needs 1 to {t_max + 1} points (got {num_steps})")
    grid = [int(round(j * (t_max + 1) / num_steps)) - 1 for j in range(1, num_steps + 1)]
    return sorted(set(grid))


def lcm_timesteps(grid: list[int], steps: int, first_step_timestep: int | None = None) -> list[int]:
    """LCMScheduler's K-step timesteps on ``grid``: indices ``floor(linspace(0, N, K, endpoint=False))``
    of the grid in descending order. The first is the grid's top, or ``first_step_timestep`` when given
    (the label a student reads on the top point: the pure noise of its first step)."""
    rev = sorted(grid, reverse=True)
    if not 1 <= steps <= len(rev):
        raise ConfigError(f"a consistency student on a {len(rev)}-point grid samples in 1 to {len(rev)} steps (got {steps})")
    idx = np.floor(np.linspace(0, len(rev), num=steps, endpoint=False)).astype(np.int64)
    ts = [int(rev[i]) for i in idx]
    return ts if first_step_timestep is None else [int(first_step_timestep), *ts[1:]]


def segment_edges(grid: list[int], num_segments: int) -> list[int]:
    """Ascending edges ``[0, e_1, .., e_M]`` of M segments (MLCM): 0 and the M-step LCM timesteps.

    Timestep ``t`` lies in segment ``m`` when ``e_m < t <= e_{m+1}``; its consistency target is
    the DDIM projection to ``e_m``.
    """
    return [0] + sorted(lcm_timesteps(grid, num_segments))


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of LCM guidance ``w`` (``(B,)`` -> ``(B, dim)``), as diffusers'
    ``LatentConsistencyModelPipeline`` computes it: frequencies ``10000^(-i / (dim/2 - 1))``
    applied to ``1000 w``, sines then cosines, zero-padded to an odd ``dim``."""
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(-torch.arange(half, dtype=torch.float32) * (np.log(10000.0) / (half - 1)))
    ang = w[:, None] * freqs[None, :]
    emb = torch.cat([ang.sin(), ang.cos()], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


@dataclass
class GuidanceInput:
    """How a student receives its guidance scale ``s`` (our convention, ``s = 1``: no guidance).

    Attributes:
        kind: ``"timestep_cond"`` or ``"class_table"`` (module docstring).
        default_scale: the scale used when a caller gives none (sampling).
        embedding_dim: ``time_cond_proj_dim`` for ``timestep_cond``.
        scales: the L guidance levels of a ``class_table``.
        stride: rows per level in a ``class_table`` (the teacher's class embeddings, null included).
    """

    kind: str
    default_scale: float
    embedding_dim: int = 0
    scales: list[float] = field(default_factory=list)
    stride: int = 0

    @classmethod
    def for_teacher(cls, teacher, scale_range: list[float], default_scale: float, embedding_dim: int, levels: int) -> "GuidanceInput":
        """How ``teacher``'s student receives a per-sample scale drawn from ``scale_range``: ``timestep_cond``
        for a ``UNet2DConditionModel`` (an embedding of ``embedding_dim``), else ``class_table`` with ``levels``
        scales spread over the range (a class-conditional UNet's extra class rows)."""
        name = type(teacher.backbone).__name__
        if not teacher.conditioning.guidable and name != "UNet2DConditionModel":
            raise ConfigError(f"guidance_scale_range needs a guidable (conditional) teacher; {teacher.name} is unconditional")
        lo, hi = scale_range
        default = min(max(default_scale, lo), hi)
        if name == "UNet2DConditionModel":
            return cls("timestep_cond", default, embedding_dim=embedding_dim)
        if getattr(teacher.backbone.config, "num_class_embeds", None) is None:
            raise ConfigError(
                f"guidance_scale_range: {name} has no guidance input (UNet2DConditionModel students take it as "
                "timestep_cond, class-conditional UNets as extra class rows); train with a fixed guidance_scale"
            )
        n = levels if hi > lo else 1
        scales = [lo + (hi - lo) * i / max(1, n - 1) for i in range(n)]
        return cls("class_table", default, scales=scales, stride=int(teacher.backbone.config.num_class_embeds))
    def __post_init__(self):
        if self.kind not in ("timestep_cond", "class_table"):
            raise ConfigError(f"guidance input kind must be 'timestep_cond' or 'class_table' (got {self.kind!r})")
        if self.kind == "class_table" and (not self.scales or self.stride < 1):
            raise ConfigError("a class_table guidance input needs scales and a stride")
        if self.kind == "timestep_cond" and self.embedding_dim < 2:
            raise ConfigError("a timestep_cond guidance input needs embedding_dim >= 2")

    def snap(self, scale: torch.Tensor) -> torch.Tensor:
        """The scale each sample actually gets (nearest level for a table; unchanged otherwise)."""
        if self.kind != "class_table":
            return scale.float()
        return torch.as_tensor(self.scales, dtype=torch.float32, device=scale.device)[self.level(scale)]

    def level(self, scale: torch.Tensor) -> torch.Tensor:
        levels = torch.as_tensor(self.scales, dtype=torch.float32, device=scale.device)
        return (scale.float()[:, None] - levels[None, :]).abs().argmin(dim=1)

    def apply(self, cond: Cond, scale: float | torch.Tensor | None, n: int, device: torch.device | str) -> Cond:
        """The backbone's conditioning for scale ``scale`` (a float or ``(B,)``; None: the default)."""
        scale = self.default_scale if scale is None else scale
        s = torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(-1).expand(n)
        if self.kind == "timestep_cond":
            emb = guidance_scale_embedding(scale_to_lcm_w(s).cpu(), self.embedding_dim).to(device)
            base = {} if cond is None else dict(cond)
            return {**base, "timestep_cond": emb}
        if cond is None or isinstance(cond, dict):
            raise ConfigError("a class_table guidance input needs class labels as the condition")
        return cond + self.stride * self.level(s).to(cond.device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConsistencyDenoiser(Denoiser):
    """A consistency student: ``f(x, t) = c_skip x + c_out x0(x, t)`` (``parameterisation="lcm"``)
    or the plain x0 prediction (``"segments"``, MLCM), with the guidance scale fed as an input.

    Args:
        backbone, schedule, prediction_type: as for :class:`~onestep.denoiser.Denoiser`.
        parameterisation: ``"lcm"`` or ``"segments"``.
        sigma_data, timestep_scaling: the boundary-condition constants (LCM: 0.5 and 10).
        guidance: how the scale reaches the backbone (None: the student takes no scale).
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        parameterisation: str = "lcm",
        sigma_data: float = SIGMA_DATA,
        timestep_scaling: float = TIMESTEP_SCALING,
        guidance: GuidanceInput | None = None,
    ):
        super().__init__(backbone, schedule, prediction_type)
        if parameterisation not in PARAMETERISATIONS:
            raise ConfigError(f"parameterisation must be one of {PARAMETERISATIONS} (got {parameterisation!r})")
        self.parameterisation = parameterisation
        self.sigma_data = sigma_data
        self.timestep_scaling = timestep_scaling
        self.guidance = guidance

    @property
    def ddim_between_steps(self) -> bool:
        """Segment students move along the DDIM line between sampling steps instead of re-noising."""
        return self.parameterisation == "segments"

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None, guidance_scale=None, return_features: bool = False):
        """The backbone's x0 prediction, with the guidance input added to ``cond``."""
        if self.guidance is not None:
            cond = self.guidance.apply(cond, guidance_scale, x_t.shape[0], x_t.device)
        return super().forward(x_t, t, cond, return_features=return_features)

    def boundary(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """``f`` from an x0 prediction: ``c_skip x + c_out x0`` (lcm) or ``x0`` itself (segments)."""
        if self.parameterisation != "lcm":
            return x0
        c_skip, c_out = (expand_like(c.to(x_t.device), x_t) for c in boundary_scalings(t, self.sigma_data, self.timestep_scaling))
        return c_skip * x_t.float() + c_out * x0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None, return_features: bool = False, guidance_scale=None):
        """``f(x_t, t)`` (float32)."""
        out = self.x0(x_t, t, cond, guidance_scale, return_features)
        x0, feats = out if return_features else (out, None)
        f = self.boundary(x_t, t, x0)
        return (f, feats) if return_features else f


def ddim_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step from ``t`` to ``t_next`` given the x0 prediction (the project's DDIM sampler's update):
    ``eps = (x_t - a_t x0) / s_t``, ``x_next = a_n x0 + sqrt(s_n^2 - sig^2) eps + sig z`` with
    ``sig = eta sqrt(s_n^2 / s_t^2) sqrt(1 - a_t^2 / a_n^2)`` (``eta = 0``: deterministic).
    With ``t_next == t`` and ``eta = 0`` it returns ``x_t`` (up to rounding)."""
    eps = schedule.eps_from_x0(x0, x_t, t)
    a, s = (expand_like(v, x_t) for v in schedule.alpha_sigma(t.to(x_t.device)))
    an, sn = (expand_like(v, x_t) for v in schedule.alpha_sigma(t_next.to(x_t.device)))
    x0 = x0.float()
    if eta <= 0:
        return an * x0 + sn * eps
    if noise is None:
        raise ValueError("a stochastic DDIM step (eta > 0) needs noise")
    sig = eta * (sn**2 / s**2).sqrt() * (1 - a**2 / an**2).clamp(min=0).sqrt()
    return an * x0 + (sn**2 - sig**2).clamp(min=0).sqrt() * eps + sig * noise.float()


# ------------------------------------------------------------------- losses

LOSSES = ("l2", "huber", "pseudo_huber")


def consistency_distance(a: torch.Tensor, b: torch.Tensor, kind: str, c: float) -> torch.Tensor:
    """Per-sample distance ``(B,)``: mean squared error, LCM's per-element Huber
    ``mean(sqrt((a - b)^2 + c^2) - c)`` or iCT's pseudo-Huber ``sqrt(|a - b|^2 + c^2) - c``."""
    diff = (a.float() - b.float()).flatten(1)
    if kind == "l2":
        return (diff**2).mean(1)
    if kind == "huber":
        return ((diff**2 + c**2).sqrt() - c).mean(1)
    if kind == "pseudo_huber":
        return ((diff**2).sum(1) + c**2).sqrt() - c
    raise ConfigError(f"unknown consistency loss {kind!r}; expected one of {LOSSES}")


def ict_num_steps(step: int, max_steps: int, initial: int, final: int) -> int:
    """iCT's doubling schedule: ``min(s0 * 2^floor(k / K'), s1)`` with ``K' = floor(K / (log2(s1 / s0) + 1))``."""
    k_prime = max(1, math.floor(max_steps / (math.log2(final / initial) + 1)))
    return min(initial * 2 ** (step // k_prime), final)


def ict_pair_weight(schedule: NoiseSchedule, t_hi: torch.Tensor, t_lo: torch.Tensor) -> torch.Tensor:
    """iCT's per-pair weight ``lambda = 1 / (sigma_hi - sigma_lo)`` with ``sigma = s_t / a_t`` (the VE noise
    level of a VP timestep), float32; computed in float64."""
    def sigma(t: torch.Tensor) -> torch.Tensor:
        a, s = schedule.alpha_sigma(t)
        return s.double() / a.double()

    return (1.0 / (sigma(t_hi) - sigma(t_lo))).float()


# ------------------------------------------------------ the guided student


def with_guidance_input(backbone: nn.Module, guidance: GuidanceInput) -> nn.Module:
    """A trainable copy of ``backbone`` that also takes the guidance scale, equal to it at start
    (:func:`with_scalar_input` with the guidance input's kind, embedding size, levels and stride)."""
    return with_scalar_input(backbone, guidance.kind, guidance.embedding_dim, len(guidance.scales), guidance.stride)


def with_scalar_input(backbone: nn.Module, kind: str, embedding_dim: int = 0, levels: int = 0, stride: int = 0) -> nn.Module:
    """A trainable copy of ``backbone`` that also takes one scalar per sample (a guidance scale, CTM's jump
    target ``s``), equal to ``backbone`` at start whatever the scalar.

    ``timestep_cond``: the same class with ``time_cond_proj_dim = embedding_dim`` and the new projection
    zero-initialised. ``class_table``: ``num_class_embeds = stride * levels``, each level a copy of the
    original table (label ``y + level * stride``).
    """
    cfg = {k: v for k, v in dict(backbone.config).items() if not k.startswith("_")}
    state = backbone.state_dict()
    if kind == "timestep_cond":
        if cfg.get("time_cond_proj_dim") == embedding_dim:
            net = copy.deepcopy(backbone)
        else:
            cfg["time_cond_proj_dim"] = embedding_dim
            net = type(backbone).from_config(cfg)
            missing, unexpected = net.load_state_dict(state, strict=False)
            if unexpected or any("cond_proj" not in k for k in missing):
                raise ConfigError(f"cannot add a timestep_cond embedding to this {type(backbone).__name__}: {missing + unexpected}")
            nn.init.zeros_(net.time_embedding.cond_proj.weight)
    else:
        if getattr(backbone, "class_embedding", None) is None or not isinstance(backbone.class_embedding, nn.Embedding):
            raise ConfigError(f"{type(backbone).__name__} has no class-embedding table to carry an extra input")
        cfg["num_class_embeds"] = stride * levels
        net = type(backbone).from_config(cfg)
        state = dict(state)
        state["class_embedding.weight"] = state["class_embedding.weight"].repeat(levels, 1)
        net.load_state_dict(state)
    net.requires_grad_(True)
    net.train()
    return net


__all__ = [
    "LOSSES",
    "ConsistencyDenoiser",
    "GuidanceInput",
    "boundary_scalings",
    "consistency_distance",
    "ddim_step",
    "guidance_scale_embedding",
    "ict_num_steps",
    "ict_pair_weight",
    "lcm_grid",
    "lcm_timesteps",
    "segment_edges",
    "with_guidance_input",
    "with_scalar_input",
]
