"""Noise schedules: the only place that knows how x_t is formed from x_0.

Every method talks to a :class:`NoiseSchedule`, never to ``alphas_cumprod``
directly. The variance-preserving (VP) schedule covers DDPM-style teachers with
any diffusers beta schedule (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``,
...). Flow-matching teachers (SD3-style, ``FlowMatchEulerDiscreteScheduler``) use
:class:`FlowMatchSchedule`, a subclass with the same methods: ``x_t = (1 - sigma) x_0 +
sigma eps`` on the same integer timesteps ``0 .. T-1``, and the ``"flow"`` prediction type
(velocity ``v = eps - x_0``). The one thing that differs for the backbone, the timestep value it
is fed, goes through :meth:`NoiseSchedule.model_timestep`.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

#: The flow-matching scheduler whose training sigmas :class:`FlowMatchSchedule` reproduces.
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def check_num_train_timesteps(class_name: str, T: Any) -> int:
    """``num_train_timesteps`` of a scheduler config: an integer in ``[2, 10**6]`` (diffusers' default is 1000)."""
    if isinstance(T, bool) or not isinstance(T, int) or not 2 <= T <= 10**6:
        raise ConfigError(f"{class_name}: num_train_timesteps must be an integer in [2, 1000000] (got {T!r})")
    return T


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

        if hasattr(config, "config"):  # a scheduler: its config does not name its class
            config = {"_class_name": type(config).__name__, **dict(config.config)}
        config = dict(config)
        class_name = config.get("_class_name", "DDPMScheduler")
        if "FlowMatch" in class_name:
            return FlowMatchSchedule.from_scheduler_config(config)
        check_num_train_timesteps(class_name, config.get("num_train_timesteps", 1000))
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        try:
            ddpm = DDPMScheduler(**{k: config[k] for k in keys if k in config and config[k] is not None})
        except (NotImplementedError, TypeError, ValueError, RuntimeError) as e:  # diffusers' own errors on a bad config
            raise ConfigError(f"{class_name}: the scheduler config does not build a schedule ({e})") from e
        kept = {k: v for k, v in config.items() if not k.startswith("_")}
        kept["_class_name"] = class_name
        return cls(ddpm.alphas_cumprod, kept)

    # ------------------------------------------------------------- properties
    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def log_snr(self) -> torch.Tensor:
        """``log(abar / (1 - abar))`` per integer timestep (float64, decreasing)."""
        return (self.alphas_cumprod / (1 - self.alphas_cumprod)).log()

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, s_t)`` as float32 tensors shaped like ``t``. Integer ``t`` reads the table; a floating ``t``
        is a fractional timestep, its log-SNR linear between its two integer neighbours (differentiable in
        ``t``, forward mode too: continuous-time methods, :mod:`onestep.trigflow`)."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            ls = self.log_snr.to(t.device)
            lo = t.detach().floor().clamp(0, len(ls) - 2).long()
            lam = ls[lo] + (t.double() - lo) * (ls[lo + 1] - ls[lo])
            return torch.sigmoid(lam).sqrt().float(), torch.sigmoid(-lam).sqrt().float()
        ac = self.alphas_cumprod.to(t.device)[t.long()]
        return ac.sqrt().float(), (1 - ac).sqrt().float()

    def timestep_for_log_snr(self, log_snr: torch.Tensor) -> torch.Tensor:
        """The fractional timestep with that log-SNR (the inverse of :meth:`alpha_sigma` on floats; clamped
        to ``[0, T-1]``), differentiable in ``log_snr``."""
        asc = self.log_snr.to(log_snr.device).flip(0)  # increasing: timestep T-1 first
        ls = log_snr.detach().double().clamp(asc[0], asc[-1])
        j = torch.searchsorted(asc, ls).clamp(1, len(asc) - 1)
        lo, hi = asc[j - 1], asc[j]
        frac = ((log_snr.double() - lo) / (hi - lo)).clamp(0, 1)
        # asc index j-1 is timestep T - j; one index up lowers the timestep by one
        return ((len(asc) - j).double() - frac).to(log_snr.dtype)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep value the backbone is fed for integer timesteps ``t``: ``t`` itself here
        (DDPM-style UNets take the integer index)."""
        return t

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
        if prediction_type == "flow":
            # x_t = a x0 + s eps and v = eps - x0 give x_t = (a + s) x0 + s v (a + s = 1 for flow schedules).
            return (x_t - s * pred) / (a + s)
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
        if prediction_type == "flow":
            return eps - x0.float()
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


class FlowMatchSchedule(NoiseSchedule):
    """Flow-matching (rectified-flow) schedule ``x_t = (1 - sigma_t) x_0 + sigma_t eps`` on integer
    timesteps ``t = 0 .. T-1``, as diffusers' ``FlowMatchEulerDiscreteScheduler`` trains SD3-style
    transformers.

    ``sigma_t`` is the scheduler's training sigma: ``u = (t + 1) / T`` shifted as
    ``shift * u / (1 + (shift - 1) * u)``, so ``t = T - 1`` is pure noise (``sigma = 1``) and
    ``t = 0`` the least noisy level. The backbone is fed ``sigma_t * T`` (a float), see
    :meth:`model_timestep`; its prediction type is ``"flow"`` (the velocity ``eps - x_0``).

    Args:
        sigmas: ``sigma_t`` for ``t = 0 .. T-1``, increasing, in ``(0, 1]`` (float64 is kept internally).
        config: the diffusers scheduler config the schedule came from.
    """

    kind = "flow"

    def __init__(self, sigmas: torch.Tensor, config: dict[str, Any] | None = None):
        sig = torch.as_tensor(sigmas, dtype=torch.float64)
        if sig.ndim != 1 or len(sig) < 2:
            raise ConfigError("sigmas must be a 1-D tensor with at least 2 entries")
        if not bool(((sig > 0) & (sig <= 1)).all()) or not bool((sig[1:] >= sig[:-1]).all()):
            raise ConfigError("flow-matching sigmas must increase with t and lie in (0, 1]")
        self.sigmas = sig
        self.config = dict(config or {})

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any] | Any) -> "FlowMatchSchedule":
        """Build from a ``FlowMatchEulerDiscreteScheduler`` config (``num_train_timesteps``, ``shift``)."""
        if hasattr(config, "config"):
            config = {"_class_name": type(config).__name__, **dict(config.config)}
        config = dict(config)
        class_name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if class_name not in FLOW_SCHEDULERS:
            raise ConfigError(f"{class_name}: flow-matching teachers need a {' or '.join(FLOW_SCHEDULERS)} scheduler config")
        if config.get("use_dynamic_shifting"):
            raise ConfigError(
                f"{class_name} with use_dynamic_shifting: true (Flux-style, the shift depends on the image size) "
                "is not supported; use a scheduler config with a fixed shift (SD3: shift 3.0)"
            )
        T = check_num_train_timesteps(class_name, config.get("num_train_timesteps") or 1000)
        shift = float(config.get("shift") or 1.0)
        if T < 2 or shift <= 0:
            raise ConfigError(f"{class_name}: need num_train_timesteps >= 2 and shift > 0 (got {T}, {shift})")
        u = torch.arange(1, T + 1, dtype=torch.float64) / T
        kept = {k: v for k, v in config.items() if not k.startswith("_")}
        kept.update(_class_name=class_name, num_train_timesteps=T, shift=shift)
        return cls(shift * u / (1 + (shift - 1) * u), kept)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def shift(self) -> float:
        return float(self.config.get("shift", 1.0))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma_t`` (float64) for integer timesteps ``t``."""
        t = torch.as_tensor(t)
        return self.sigmas.to(t.device)[t.long()]

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 - sigma_t, sigma_t)`` as float32 tensors shaped like ``t``."""
        sig = self.sigma(t)
        return (1 - sig).float(), sig.float()

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma_t * T`` (float32): what diffusers' SD3 pipeline feeds the transformer."""
        return (self.sigma(t) * self.num_train_timesteps).float()
