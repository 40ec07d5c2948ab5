"""f-distill: one-step diffusion models with f-divergence distribution matching
(Xu et al., 2025, arXiv:2502.15681).

The gradient of D_f(p || q) for the generator (p: teacher, q: student) is DMD2's
distribution-matching gradient times a per-sample weight h(r) = f''(r) r^2 of the
density ratio r = p_t(x_t) / q_t(x_t)  (paper eq. 7 / Table 1; METHODS.md "f-distill").

Per iteration, on top of DMD2 (trainers/dmd2.py):

1. r from the GAN discriminator: at its optimum D = p/(p+q), so its logit l = log r.
   l is clamped to [-10, 10], r = exp(l) (no gradient), then clamped to [r_min, r_max].
2. r is divided by a running mean of r in its time bin (10 bins over t), the bin means
   summed over every process.
3. h = h(r), then h <- h / mean(h) over the global batch (all processes), in float32.
4. g = h * g_DMD2. With reverse KL h = 1, so the step is exactly DMD2's.

The GAN term is required: without a trained discriminator there is no r.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from onestep.config import config_field
from onestep.errors import ConfigError

from .dmd2 import DMD2Config, DMD2Trainer

#: h(r) = f''(r) r^2 for each divergence (METHODS.md, f-distill table).
F_WEIGHTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "reverse_kl": lambda r: torch.ones_like(r),
    "softened_reverse_kl": lambda r: 1 / (r + 1),
    "js": lambda r: r / (r + 1),
    "squared_hellinger": lambda r: r.sqrt() / 4,
    "forward_kl": lambda r: r,
    "jeffreys": lambda r: r + 1,
    "neyman_chi2": lambda r: 1 / r,
}


@dataclass
class FDistillConfig(DMD2Config):
    """f-distill settings: DMD2's, plus the divergence and the density-ratio handling."""

    method: str = config_field("training method", "fdistill")
    divergence: str = config_field(f"f-divergence: one of {', '.join(F_WEIGHTS)}", "js")
    gan_weight_generator: float = config_field("weight of the generator's GAN term (required > 0: r comes from the discriminator)", 1e-3)
    logit_clamp: float = config_field("clamp the discriminator logit to [-c, c] before r = exp(logit)", 10.0)
    ratio_min: float = config_field("lower clamp of the density ratio r", 0.1)
    ratio_max: float = config_field("upper clamp of the density ratio r", 20.0)
    ratio_bins: int = config_field("time bins of the running normalisation of r", 10)
    ratio_momentum: float = config_field("momentum of the running mean of r in each time bin", 0.99)

    def __post_init__(self):
        super().__post_init__()
        if self.divergence not in F_WEIGHTS:
            raise ConfigError(f"divergence must be one of {', '.join(F_WEIGHTS)} (got {self.divergence!r})")
        if not (self.gan_weight_generator > 0 and self.gan_weight_discriminator > 0):
            raise ConfigError("f-distill needs the GAN term: set gan_weight_generator and gan_weight_discriminator > 0")
        if not 0 < self.ratio_min < self.ratio_max:
            raise ConfigError(f"need 0 < ratio_min < ratio_max (got {self.ratio_min}, {self.ratio_max})")
        if self.logit_clamp <= 0 or self.ratio_bins < 1 or not 0 <= self.ratio_momentum < 1:
            raise ConfigError("need logit_clamp > 0, ratio_bins >= 1 and 0 <= ratio_momentum < 1")


def f_weight(divergence: str, r: torch.Tensor) -> torch.Tensor:
    """``h(r)`` of the table for density ratios ``r`` (float32)."""
    return F_WEIGHTS[divergence](r.float())


def density_ratio(logits: torch.Tensor, logit_clamp: float = 10.0, r_min: float = 0.1, r_max: float = 20.0) -> torch.Tensor:
    """``r = exp(clamp(l))`` clamped to ``[r_min, r_max]``, detached."""
    return logits.detach().float().clamp(-logit_clamp, logit_clamp).exp().clamp(r_min, r_max)


class RatioNormaliser(nn.Module):
    """Running mean of r per time bin; checkpointed with the run.

    ``reduce`` sums a tensor over processes (identity on one process), so every rank
    keeps the same means.
    """

    def __init__(self, num_bins: int = 10, num_timesteps: int = 1000, momentum: float = 0.99):
        super().__init__()
        self.num_timesteps, self.momentum = num_timesteps, momentum
        self.register_buffer("mean", torch.ones(num_bins))
        self.register_buffer("seen", torch.zeros(num_bins, dtype=torch.bool))

    def bins(self, t: torch.Tensor) -> torch.Tensor:
        n = len(self.mean)
        return (t.long() * n // self.num_timesteps).clamp(0, n - 1)

    @torch.no_grad()
    def update(self, r: torch.Tensor, t: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda v: v) -> None:
        b = self.bins(t).to(self.mean.device)
        n = len(self.mean)
        stats = torch.zeros(2, n, device=self.mean.device)
        stats[0].index_add_(0, b, r.float().to(self.mean.device))
        stats[1].index_add_(0, b, torch.ones_like(r, dtype=torch.float32).to(self.mean.device))
        stats = reduce(stats)
        has = stats[1] > 0
        batch_mean = stats[0] / stats[1].clamp(min=1)
        new = torch.where(self.seen, self.momentum * self.mean + (1 - self.momentum) * batch_mean, batch_mean)
        self.mean.copy_(torch.where(has, new, self.mean))
        self.seen |= has

    def normalise(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return r / self.mean.to(r.device)[self.bins(t).to(r.device)]


def normalise_batch_mean(h: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda v: v) -> torch.Tensor:
    """``h / mean(h)`` where the mean runs over the global batch (``reduce`` sums over processes)."""
    total = reduce(torch.stack([h.float().sum(), torch.tensor(float(h.numel()), device=h.device)]))
    return h.float() / (total[0] / total[1]).clamp(min=1e-12)


class FDistillTrainer(DMD2Trainer):
    config_class = FDistillConfig
    config: FDistillConfig
    wants_dm_features = True
    uses_real_data = True
    gan_required = True

    def __init__(self, config: FDistillConfig, **kwargs):
        super().__init__(config, **kwargs)  # DMD2's GAN head refuses a teacher without real data
        self.ratio_stats = self.extras["ratio_stats"]

    def extra_networks(self) -> dict[str, nn.Module]:
        # the running means are part of the run: placed with the networks, kept in every checkpoint
        c, T = self.config, self.schedule.num_train_timesteps
        return {**super().extra_networks(), "ratio_stats": RatioNormaliser(c.ratio_bins, T, c.ratio_momentum)}

    def _sum_over_processes(self, v: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(v, reduction="sum") if self.accelerator.num_processes > 1 else v

    def weight_dm_gradient(self, grad: torch.Tensor, t: torch.Tensor, feats: torch.Tensor | None, logs: dict[str, float]) -> torch.Tensor:
        c = self.config
        # 1. r = exp(clamped logit), clamped.
        r = density_ratio(self.heads["gan"](feats), c.logit_clamp, c.ratio_min, c.ratio_max)
        # 2. Divide by the running mean of r in its time bin.
        self.ratio_stats.update(r, t, self._sum_over_processes)
        r = self.ratio_stats.normalise(r, t)
        # 3. h(r), normalised to mean 1 over the global batch.
        h = normalise_batch_mean(f_weight(c.divergence, r), self._sum_over_processes)
        logs.update({"fdistill/r_mean": r.mean().item(), "fdistill/h_max": h.max().item()})
        # 4. g = h * g_DMD2.
        return grad * h.reshape(-1, *([1] * (grad.ndim - 1)))
