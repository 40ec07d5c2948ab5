"""SiD: Score identity Distillation (Zhou et al., 2024, arXiv:2404.04057).

Per iteration (METHODS.md, "SiD"):

1. generator step: x_g = G(z); t ~ U{t_min T .. t_max T}; x_t = a_t x_g + s_t e, *with*
   gradient through x_g; f_p = teacher x0 (with CFG), f_q = fake-score x0, both on x_t
   and both differentiated through their input (their weights stay fixed);
   loss = mean( (f_p - f_q) * ((f_p - x_g) - alpha (f_p - f_q)) / sg(mean_{CHW}|x_g - f_p|) )
   (SiD eq. 9 / Algorithm 1 with alpha = 1.2). Unlike DMD, nothing is detached: the
   gradient reaches G through x_g directly and through both score networks.
2. fake-score step right after (1:1), on sg(x_g): the plain denoising loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from onestep.denoiser import frozen
from onestep.config import config_field

from .base import DistillTrainer
from .config import DistillConfig


@dataclass
class SiDConfig(DistillConfig):
    """SiD settings."""

    method: str = config_field("training method", "sid")
    fake_updates_per_generator: int = config_field("fake-score updates per generator update (SiD: 1)", 1)
    sid_alpha: float = config_field("alpha of the SiD loss (1.2 in the paper; 0 gives a DMD-like loss)", 1.2)


def sid_loss(x_g: torch.Tensor, f_p: torch.Tensor, f_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean((f_p - f_q) * ((f_p - x_g) - alpha (f_p - f_q)) / sg(mean_CHW |x_g - f_p|))`` in float32."""
    x_g, f_p, f_q = x_g.float(), f_p.float(), f_q.float()
    dims = tuple(range(1, x_g.ndim))
    norm = (x_g - f_p).abs().mean(dim=dims, keepdim=True).detach().clamp(min=1e-8)
    diff = f_p - f_q
    return torch.nan_to_num(diff * ((f_p - x_g) - alpha * diff) / norm).mean()


class SiDTrainer(DistillTrainer):
    config_class = SiDConfig
    config: SiDConfig

    def generator_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        x_g = self.generate(batch)
        batch["x_gen"] = x_g.detach()
        cond, uncond = batch["cond"], batch["uncond"]
        t = self.sample_t(x_g.shape[0], *c.loss_t_range)
        # 1. Noise with gradient: x_t depends on x_g.
        x_t = self.schedule.add_noise(x_g, self.randn(tuple(x_g.shape)), t)
        # 2. Both scores on x_t, differentiated through their input, their weights frozen.
        with frozen(self.fake, self.teacher):
            f_p = self.teacher.guided(x_t, t, cond, uncond, c.guidance_scale)
            f_q = self.fake(x_t, t, cond)
        # 3. The SiD loss.
        loss = sid_loss(x_g, f_p, f_q, c.sid_alpha)
        return loss, {"loss/sid": loss.item()}

    def fake_score_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.denoising_loss(self.fake, self.detached_sample(batch), batch["cond"])
        return loss, {"loss/fake": loss.item()}
