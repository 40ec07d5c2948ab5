"""A time-aware adversarial term on the frozen teacher's features (TAD-SR's discriminator; CTM's GAN here).

The discriminator sees samples only through the teacher: ``x`` is noised at ``t' ~ U{0 .. T-1}`` (or up to the
config's ``gan_t_max``), the frozen teacher reads it and a small head :class:`TimeAwareHead` scores its
bottleneck features given ``t'``. Hinge losses, one noise draw shared by the generator's term and the discriminator's step:

    generator:      L_adv = -D(F_T(a_t' x_gen + s_t' e'), t')
    discriminator:  L_D = relu(1 - D(F_T(a x_real + s e'), t')) + relu(1 + D(F_T(a sg(x_gen) + s e'), t'))

:class:`TeacherFeatureGAN` is a mixin for trainers without a fake score: the head lives in
``self.heads["gan"]`` (trained in the fake-score step) and the gradient of ``L_adv`` reaches the
generator through the teacher, whose weights stay frozen.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onestep.errors import ConfigError


class TimeAwareHead(nn.Module):
    """Discriminator on bottleneck features ``(B, C, H, W)`` that takes the noise level explicitly:
    ``D(f, t) = w . h(f) + <h(f), e(t)> / sqrt(width)`` (a projection discriminator on a timestep embedding)."""

    def __init__(self, in_channels: int, width: int = 64, num_train_timesteps: int = 1000):
        super().__init__()
        groups = 8 if in_channels % 8 == 0 and width % 8 == 0 else 1
        self.width, self.T = width, num_train_timesteps
        self.features = nn.Sequential(
            nn.GroupNorm(groups, in_channels), nn.SiLU(), nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out = nn.Linear(width, 1)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, feats: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        h = self.features(feats.float())
        e = self.time(get_timestep_embedding(t.float(), self.width).to(h))
        return (self.out(h).squeeze(-1) + (h * e).sum(-1) / math.sqrt(self.width))


class TeacherFeatureGAN:
    """The time-aware GAN term for a :class:`~onestep.trainers.base.DistillTrainer` (see the module)."""

    def time_aware_head(self, width: int) -> TimeAwareHead:
        """A head sized by probing the teacher's bottleneck once on a real sample."""
        x, cond = self.teacher_spec.real_data(1, torch.Generator().manual_seed(0))
        with torch.no_grad():
            _, feats = self.triad.teacher(x, torch.zeros(1, dtype=torch.long), cond, return_features=True)
        if feats.ndim != 4:
            raise ConfigError(f"{self.method_name}'s time-aware discriminator reads a UNet's (B, C, H, W) bottleneck features")
        return TimeAwareHead(feats.shape[1], width, self.schedule.num_train_timesteps)

    def gan_t(self, n: int) -> torch.Tensor:
        """The discriminator's noise levels t' ~ U{0 .. T-1}, or up to the config's ``gan_t_max`` when it has one set."""
        t_max = getattr(self.config, "gan_t_max", None)
        if t_max is None:
            return self.sample_t(n)
        T = self.schedule.num_train_timesteps
        if not 0 <= t_max < T:
            raise ConfigError(f"gan_t_max must lie in [0, {T - 1}] (got {t_max})")
        return self.schedule.sample_t(n, 0, t_max, generator=self.rng, device=self.device)

    def discriminate(self, x: torch.Tensor, cond, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Time-aware logits of ``x`` noised at ``t`` with ``noise``, through the frozen teacher's bottleneck."""
        _, feats = self.teacher(self.schedule.add_noise(x, noise, t), t, cond, return_features=True)
        return self.heads["gan"](feats, t)

    def adversarial_loss(self, x_gen: torch.Tensor, cond, batch: dict[str, Any]) -> torch.Tensor:
        """The generator's hinge term ``-D(x_gen)`` at a fresh ``t'`` and noise (kept in ``batch`` for the
        discriminator's step); the head's weights take no gradient from it."""
        t_d = self.gan_t(x_gen.shape[0])
        batch["t_d"], batch["e_d"] = t_d, self.randn(tuple(x_gen.shape))
        for p in self.heads.parameters():
            p.requires_grad_(False)
        try:
            return -self.discriminate(x_gen, cond, t_d, batch["e_d"]).mean()
        finally:
            for p in self.heads.parameters():
                p.requires_grad_(True)

    def discriminator_loss(self, x_real: torch.Tensor, x_fake: torch.Tensor, cond, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The head's hinge loss on real and generated samples under the same ``t'`` and noise (the generator
        step's when it ran, else fresh ones); the teacher's features carry no gradient."""
        t_d = batch.get("t_d")
        if t_d is None:
            t_d, batch["e_d"] = self.gan_t(x_real.shape[0]), self.randn(tuple(x_real.shape))
        with torch.no_grad():
            _, f_real = self.teacher(self.schedule.add_noise(x_real, batch["e_d"], t_d), t_d, cond, return_features=True)
            _, f_fake = self.teacher(self.schedule.add_noise(x_fake.detach(), batch["e_d"], t_d), t_d, cond, return_features=True)
        d_real, d_fake = self.heads["gan"](f_real, t_d), self.heads["gan"](f_fake, t_d)
        loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        return loss, {"loss/adv_d": loss.item(), "adv/d_real": d_real.mean().item(), "adv/d_fake": d_fake.mean().item()}


__all__ = ["TeacherFeatureGAN", "TimeAwareHead"]
