"""SiD: Score identity Distillation (Zhou et al., 2024, arXiv:2404.04057).

Per iteration (METHODS.md, "SiD"):

1. generator step: x_g = G(z); t drawn in loss_t_range (below); x_t = a_t x_g + s_t e, *with*
   gradient through x_g; f_p = teacher x0 (with CFG), f_q = fake-score x0, both on x_t
   and both differentiated through their input (their weights stay fixed);
   loss = mean( (f_p - f_q) * ((f_p - x_g) - alpha (f_p - f_q)) / sg(mean_{CHW}|x_g - f_p|) )
   (SiD eq. 9 / Algorithm 1 with alpha = 1.2). Unlike DMD, nothing is detached: the
   gradient reaches G through x_g directly and through both score networks.
2. fake-score step right after (1:1), on sg(x_g): the plain denoising loss.

With ``fake_guidance_scale`` (SiD-LSG, Zhou et al., 2024, arXiv:2406.01561) f_q is guided too, from the fake
score's own conditional and unconditional predictions, and the fake score's training drops conditions
(``fake_uncond_prob``) so that both its branches follow the generator. With the teacher's scale the loss is
zero again while the fake score is the teacher; with the teacher alone guided it is not, and on digits SiD then
drifts after its best point (RESULTS.md).

Noise levels of the generator loss (``sid_t_sampling``): ``uniform`` draws t ~ U{low T .. high T};
``karras`` draws them as the official SiD code does, on EDM's sampling ladder: the noise-to-signal
ratio sigma = s_t / a_t is uniform in sigma^(1/7) between its values at the two ends of
loss_t_range (the code's ``rnd_t ~ U[0, tmax/1000]`` mapped through sigma(t) with rho = 7); each
draw is rounded to the integer t whose sigma is nearest in log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from onestep.denoiser import frozen
from onestep.config import config_field
from onestep.errors import ConfigError
from onestep.schedule import NoiseSchedule

from .base import DistillTrainer
from .config import DistillConfig

#: see SiDConfig.sid_t_sampling
SID_T_SAMPLINGS = ("uniform", "karras")
#: rho of EDM's sampling ladder, which SiD's code draws its noise levels on
KARRAS_RHO = 7.0


@dataclass
class SiDConfig(DistillConfig):
    """SiD settings."""

    method: str = config_field("training method", "sid")
    fake_updates_per_generator: int = config_field("fake-score updates per generator update (SiD: 1)", 1)
    sid_alpha: float = config_field("alpha of the SiD loss (1.2 in the paper; 0 gives a DMD-like loss)", 1.2)
    sid_t_sampling: str = config_field(
        "how the generator loss draws its noise levels within loss_t_range: 'uniform' in t, or 'karras' as the "
        "official SiD code does (sigma = s_t / a_t uniform in sigma^(1/7) between the range's ends: EDM's sampling "
        "ladder; on the digits teacher it did much worse than uniform, benchmarks/grain.py)",
        "uniform",
    )
    fake_guidance_scale: float | None = config_field(
        "SiD-LSG (Zhou et al., 2024, arXiv:2406.01561): guide the fake score in the generator loss too, with this "
        "scale, from its own conditional and unconditional predictions (the teacher's guidance_scale: the loss is "
        "zero again while the fake score is the teacher); its training then drops conditions with probability "
        "fake_uncond_prob, so its unconditional branch follows the generator. None: the fake score unguided (SiD)"
    )
    fake_uncond_prob: float = config_field("with fake_guidance_scale: share of the fake score's training conditions dropped", 0.1)

    def __post_init__(self):
        super().__post_init__()
        if self.sid_t_sampling not in SID_T_SAMPLINGS:
            raise ConfigError(f"sid_t_sampling must be one of {SID_T_SAMPLINGS} (got {self.sid_t_sampling!r})")
        if self.fake_guidance_scale is not None and not self.fake_guidance_scale > 0:
            raise ConfigError(f"fake_guidance_scale must be > 0 when set (got {self.fake_guidance_scale})")
        if not 0 <= self.fake_uncond_prob < 1:
            raise ConfigError(f"fake_uncond_prob must lie in [0, 1) (got {self.fake_uncond_prob})")


def sid_loss(x_g: torch.Tensor, f_p: torch.Tensor, f_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean((f_p - f_q) * ((f_p - x_g) - alpha (f_p - f_q)) / sg(mean_CHW |x_g - f_p|))`` in float32."""
    x_g, f_p, f_q = x_g.float(), f_p.float(), f_q.float()
    dims = tuple(range(1, x_g.ndim))
    norm = (x_g - f_p).abs().mean(dim=dims, keepdim=True).detach().clamp(min=1e-8)
    diff = f_p - f_q
    return torch.nan_to_num(diff * ((f_p - x_g) - alpha * diff) / norm).mean()


def karras_timesteps(
    schedule: NoiseSchedule, n: int, low: int, high: int, generator: torch.Generator | None = None, rho: float = KARRAS_RHO
) -> torch.Tensor:
    """``n`` integer timesteps in ``[low, high]`` whose sigma = s_t / a_t is drawn uniform in sigma^(1/rho)
    between sigma(low) and sigma(high) (SiD's noise levels), each rounded to the t nearest in log sigma."""
    if low == high:
        return torch.full((n,), low, dtype=torch.long)
    a, s = schedule.alpha_sigma(torch.arange(low, high + 1))
    log_sigma = (s.double() / a.double().clamp(min=1e-12)).log()  # increasing in t
    lo, hi = (log_sigma[[0, -1]] / rho).exp()
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    target = rho * (lo + u * (hi - lo)).log()  # log sigma of the draw
    i = torch.searchsorted(log_sigma.contiguous(), target).clamp(1, len(log_sigma) - 1)
    nearer_below = (target - log_sigma[i - 1]) < (log_sigma[i] - target)
    return low + torch.where(nearer_below, i - 1, i)


class SiDTrainer(DistillTrainer):
    config_class = SiDConfig
    config: SiDConfig

    def sid_t(self, n: int) -> torch.Tensor:
        """The generator loss's timesteps: ``sid_t_sampling`` within ``loss_t_range``."""
        c = self.config
        if c.sid_t_sampling == "uniform":
            return self.sample_t(n, *c.loss_t_range)
        T = self.schedule.num_train_timesteps
        low, high = c.loss_t_range
        lo, hi = int(round(low * T)), min(T - 1, int(round(high * T)) - (1 if high >= 1 else 0))
        return karras_timesteps(self.schedule, n, lo, max(lo, hi), generator=self.rng).to(self.device)

    def generator_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        x_g = self.generate(batch)
        batch["x_gen"] = x_g.detach()
        cond, uncond = batch["cond"], batch["uncond"]
        t = self.sid_t(x_g.shape[0])
        # 1. Noise with gradient: x_t depends on x_g.
        x_t = self.schedule.add_noise(x_g, self.randn(tuple(x_g.shape)), t)
        # 2. Both scores on x_t, differentiated through their input, their weights frozen.
        with frozen(self.fake, self.teacher):
            f_p = self.teacher.guided(x_t, t, cond, uncond, c.guidance_scale)
            f_q = self.fake(x_t, t, cond) if c.fake_guidance_scale is None else self.fake.guided(x_t, t, cond, uncond, c.fake_guidance_scale)
        # 3. The SiD loss.
        loss = sid_loss(x_g, f_p, f_q, c.sid_alpha)
        return loss, {"loss/sid": loss.item()}

    def fake_score_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        cond = batch["cond"]
        if self.config.fake_guidance_scale is not None:  # (LSG) the unconditional branch learns the generator's marginal
            cond = self.conditioning.drop(cond, self.config.fake_uncond_prob, generator=self.rng)
        loss = self.denoising_loss(self.fake, self.detached_sample(batch), cond)
        return loss, {"loss/fake": loss.item()}
