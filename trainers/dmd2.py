"""DMD2: Improved Distribution Matching Distillation (Yin et al., 2024, arXiv:2405.14867).

Algorithm, per iteration (maths in METHODS.md, "DMD2"):

1. every ``fake_updates_per_generator``-th iteration, the generator step:
   x = G(z) (backward simulation for K-step students);
   t ~ U{low T .. high T} (loss_t_range), x_t = a_t x + s_t e;
   x0_real = teacher x0 with CFG s, x0_fake = fake-score x0 without CFG;
   g = (x0_fake - x0_real) / mean_{CHW}|x - x0_real|      (DMD eq. 7 with its normaliser)
   loss = 0.5 * mean((x - sg(x - g))^2)  [+ w_G * softplus(-D(x))]
2. every iteration, the fake-score step on sg(x):
   plain denoising loss with t ~ U{0 .. T-1}  [+ w_D * (softplus(D(fake)) + softplus(-D(real)))]

The GAN head D sits on the fake score's bottleneck (mid-block) features of noised
inputs: real images (the teacher's training data) and generated ones. D costs no extra pass of
the fake score on generated samples: the generator's GAN term reads the features of the pass
that gives x0_fake (x_t at the loss's t, run with gradient to x when the GAN is on), and D(fake)
in the fake-score step those of the denoising loss's pass (t ~ U{0 .. T-1}); only D(real) runs
a pass of its own, also at t ~ U{0 .. T-1}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onestep.config import config_field
from onestep.denoiser import frozen
from onestep.errors import ConfigError
from onestep.schedule import expand_like

from .base import DistillTrainer
from .helpers import inject_gradient
from .config import DistillConfig


@dataclass
class DMD2Config(DistillConfig):
    """DMD2 settings (paper defaults in METHODS.md; tune per teacher)."""

    method: str = config_field("training method", "dmd2")
    gan_weight_generator: float = config_field("weight of the generator's GAN term softplus(-D(G(z))) (0: no GAN)", 0.0)
    gan_weight_discriminator: float = config_field("weight of the discriminator loss added to the fake-score loss (above 1e-2 the fake score breaks)", 1e-2)
    gan_head_channels: int = config_field("width of the GAN head on the fake score's bottleneck features", 64)

    def __post_init__(self):
        super().__post_init__()
        if self.gan_weight_generator < 0 or self.gan_weight_discriminator < 0:
            raise ConfigError("GAN weights must be >= 0")

    @property
    def use_gan(self) -> bool:
        return self.gan_weight_generator > 0


class GANHead(nn.Module):
    """Small discriminator on bottleneck features: conv features ``(B, C, H, W)`` or vectors ``(B, C)``."""

    def __init__(self, in_channels: int, spatial: bool, width: int = 64):
        super().__init__()
        self.spatial = spatial
        if spatial:
            groups = 8 if in_channels % 8 == 0 and width % 8 == 0 else 1
            self.net = nn.Sequential(
                nn.GroupNorm(groups, in_channels),
                nn.SiLU(),
                nn.Conv2d(in_channels, width, 3, padding=1),
                nn.GroupNorm(groups, width),
                nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(width, 1),
            )
        else:
            self.net = nn.Sequential(nn.LayerNorm(in_channels), nn.SiLU(), nn.Linear(in_channels, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats.float()).squeeze(-1)


def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's distribution-matching gradient ``(x0_fake - x0_real) / mean_{CHW}|x - x0_real|`` (float32)."""
    x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
    dims = tuple(range(1, x.ndim))
    norm = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp(min=1e-8)
    return torch.nan_to_num((x0_fake - x0_real) / norm)


class DMD2Trainer(DistillTrainer):
    config_class = DMD2Config
    config: DMD2Config

    @property
    def uses_real_data(self) -> bool:  # real images only feed the GAN head
        return self.config.use_gan

    #: f-distill needs its GAN term (r comes from the discriminator); DMD2 can drop it.
    gan_required = False

    def build_heads(self) -> dict[str, nn.Module]:
        if not self.config.use_gan:
            return {}
        spec = self.teacher_spec
        if spec.real_data is None:
            # The discriminator learns only from real samples: without them it would stay random
            # and still push the generator through softplus(-D(G(z))).
            fix = "" if self.gan_required else ", or set gan_weight_generator: 0"
            raise ConfigError(
                f"{self.method_name}: the GAN term trains its discriminator on real samples, and teacher {spec.name} "
                f"brings none; point real_images at a captioned image folder (real_audio at captioned WAV files for AudioLDM){fix}"
            )
        # Probe the fake score's bottleneck once to size the head.
        x = torch.zeros(1, *spec.sample_shape)
        t = torch.zeros(1, dtype=torch.long)
        with torch.no_grad():
            _, feats = self.triad.fake(x, t, spec.conditioning.null(1), return_features=True)
        return {"gan": GANHead(feats.shape[1], feats.ndim == 4, self.config.gan_head_channels)}

    def discriminate(self, x: torch.Tensor, cond) -> torch.Tensor:
        """GAN logits of samples ``x`` noised at ``t ~ U{0 .. T-1}``, through the fake score's bottleneck."""
        x_t, t, _ = self.noised(x)
        _, feats = self.fake(x_t, t, cond, return_features=True)
        return self.heads["gan"](feats)

    #: f-distill reads the fake score's bottleneck features at the DM noise level.
    wants_dm_features = False

    def weight_dm_gradient(self, grad: torch.Tensor, t: torch.Tensor, feats: torch.Tensor | None, logs: dict[str, float]) -> torch.Tensor:
        """Hook for a per-sample weight on the DM gradient; DMD2 (reverse KL) leaves it as it is."""
        return grad

    def generator_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        cond, uncond = batch["cond"], batch["uncond"]
        # 1. x = G(z); noise it at t ~ U{low T .. high T} (loss_t_range).
        x, x_t, t = self.generate_and_noise(batch, *c.loss_t_range)
        if c.use_gan:
            # The fake score's pass, with gradient to x through x_t = a_t x + s_t e (same value as x_t),
            # gives x0_fake and the features of the GAN term (4.); its parameters stay frozen.
            a_t = expand_like(self.schedule.alpha_sigma(t)[0], x)
            with frozen(self.fake, self.heads):
                x0_fake, feats = self.fake(x_t + a_t * (x - x.detach()), t, cond, return_features=True)
        with torch.no_grad():
            # 2. Real score: teacher with CFG; fake score: no guidance.
            x0_real = self.teacher.guided(x_t, t, cond, uncond, c.guidance_scale)
            if c.use_gan:
                x0_fake, dm_feats = x0_fake.detach(), feats.detach()
            elif self.wants_dm_features:
                x0_fake, dm_feats = self.fake(x_t, t, cond, return_features=True)
            else:
                x0_fake, dm_feats = self.fake(x_t, t, cond), None
            # 3. The normalised distribution-matching gradient (times a per-sample weight in f-distill).
            grad = dm_gradient(x.detach(), x0_real, x0_fake)
            logs: dict[str, float] = {}
            grad = self.weight_dm_gradient(grad, t, dm_feats, logs)
        loss = inject_gradient(x, grad)
        logs.update({"loss/dm": loss.item(), "dm/grad_abs": grad.abs().mean().item()})
        if c.use_gan:
            # 4. Non-saturating GAN term through the (frozen) fake score and head.
            with frozen(self.heads):
                loss_gan = F.softplus(-self.heads["gan"](feats)).mean()
            loss = loss + c.gan_weight_generator * loss_gan
            logs["loss/gan_g"] = loss_gan.item()
        return loss, logs

    def fake_score_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        x = self.detached_sample(batch)
        x_t, t, noise = self.noised(x)
        use_d = c.use_gan and "real" in batch
        pred, feats = self.fake(x_t, t, batch["cond"], return_features=True) if use_d else (self.fake(x_t, t, batch["cond"]), None)
        loss = self.denoising_loss_of(pred, x, x_t, t, noise)
        logs = {"loss/fake": loss.item()}
        if use_d:
            d_fake = self.heads["gan"](feats)  # the denoising pass's features: x noised at t ~ U{0 .. T-1}
            d_real = self.discriminate(batch["real"], batch["real_cond"])
            loss_d = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
            loss = loss + c.gan_weight_discriminator * loss_d
            logs["loss/gan_d"] = loss_d.item()
        return loss, logs
