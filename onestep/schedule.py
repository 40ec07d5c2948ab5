"""Noise schedules: the only place that knows how x_t is formed from x_0.

Every method talks to a :class:`NoiseSchedule`, never to ``alphas_cumprod``
directly. The variance-preserving (VP) schedule covers DDPM-style teachers with
any diffusers beta schedule (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``,
...). Flow-matching teachers (SD3-style) will get their own subclass with the same
methods (``alpha_sigma`` returning ``1 - t`` and ``t``); nothing else in the
project needs to change for them.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def expand_like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector ``(B,)`` so it broadcasts against ``x`` ``(B, ...)``."""
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


class NoiseSchedule:
    """Variance-preserving schedule ``x_t = a_t x_0 + s_t eps`` on integer timesteps.

    Args:
        alphas_cumprod: ``abar_t`` for ``t = 0 .. T-1`` (float64 is kept internally).
        config: the diffusers scheduler config the schedule came from (kept so that a
            student can record it and plain diffusers can rebuild the scheduler).
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor, config: dict[str, Any] | None = None):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or len(ac) < 2:
            raise ConfigError("alphas_cumprod must be a 1-D tensor with at least 2 entries")
        if not bool(((ac > 0) & (ac <= 1)).all()):
            raise ConfigError("alphas_cumprod must lie in (0, 1]")
        self.alphas_cumprod = ac
        self.config = dict(config or {})

    # ------------------------------------------------------------------ build
    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any] | Any) -> "NoiseSchedule":
        """Build from a diffusers scheduler config (a dict, a scheduler, or its ``.config``)."""
        from diffusers import DDPMScheduler

        if hasattr(config, "config"):
            config = config.config
        config = dict(config)
        class_name = config.get("_class_name", "DDPMScheduler")
        if "FlowMatch" in class_name:
            raise ConfigError(
                f"{class_name}: flow-matching teachers are not supported yet; "
                "use a VP (DDPM/DDIM-style) teacher"
            )
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        ddpm = DDPMScheduler(**{k: config[k] for k in keys if k in config and config[k] is not None})
        kept = {k: v for k, v in config.items() if not k.startswith("_")}
        kept["_class_name"] = class_name
        return cls(ddpm.alphas_cumprod, kept)

    # ------------------------------------------------------------- properties
    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, s_t)`` as float32 tensors shaped like ``t``."""
        t = torch.as_tensor(t)
        ac = self.alphas_cumprod.to(t.device)[t.long()]
        return ac.sqrt().float(), (1 - ac).sqrt().float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t.to(x0.device))
        return expand_like(a, x0).to(x0.dtype) * x0 + expand_like(s, x0).to(x0.dtype) * noise

    # ------------------------------------------------------------ conversions
    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """Convert a backbone output of ``prediction_type`` into an x0 prediction (float32)."""
        a, s = (expand_like(v, x_t) for v in self.alpha_sigma(t.to(x_t.device)))
        pred, x_t = pred.float(), x_t.float()
        if prediction_type == "epsilon":
            return (x_t - s * pred) / a
        if prediction_type == "v_prediction":
            return a * x_t - s * pred
        if prediction_type == "sample":
            return pred
        raise ConfigError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")

    def eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = (expand_like(v, x_t) for v in self.alpha_sigma(t.to(x_t.device)))
        return (x_t.float() - a * x0.float()) / s

    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """Inverse of :meth:`to_x0`: express an x0 prediction as ``prediction_type``."""
        if prediction_type == "sample":
            return x0.float()
        eps = self.eps_from_x0(x0, x_t, t)
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "v_prediction":
            a, s = (expand_like(v, x_t) for v in self.alpha_sigma(t.to(x_t.device)))
            return a * eps - s * x0.float()
        raise ConfigError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")

    # --------------------------------------------------------------- sampling
    def sample_t(
        self,
        n: int,
        low: int = 0,
        high: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """``n`` integer timesteps drawn uniformly from ``[low, high]`` (inclusive)."""
        high = self.num_train_timesteps - 1 if high is None else high
        if not 0 <= low <= high < self.num_train_timesteps:
            raise ConfigError(f"timestep range [{low}, {high}] is outside [0, {self.num_train_timesteps - 1}]")
        t = torch.randint(low, high + 1, (n,), generator=generator)
        return t.to(device)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.config)
