"""TAD-SR: One Step Diffusion-based Super-Resolution with Time-Aware Distillation (He et al., 2024, arXiv:2408.07476).

A one-step student for an image-conditioned (super-resolution) teacher: the generator starts as a copy
of the teacher and maps pure noise, at a fixed timestep, and the low-res condition y to the high-res
image in one call. Algorithm, per iteration (every loss on paired data: y is the condition of the
real high-res image x_hr):

1. the generator step:
   x_s = G(z, T-1; y), z ~ N(0, I)                                      (one step at a fixed t)
   x_tch = teacher's K-step DDIM sample from the same z and y           (no gradient; the target)
   L_reg = ||x_s - x_tch||^2                                            (the distillation term)
   HFSD, the high-frequency enhanced score distillation: t ~ U[t_min T, t_max T] *small*, one noise e,
       x_s,t = a_t sg(x_s) + s_t e,  x_tch,t = a_t x_tch + s_t e;
       g = eps_T(x_s,t) - eps_T(x_tch,t)                                (the teacher's score at both)
   which is (a_t / s_t) [(x_s - x_tch) - (x0_T(x_s,t) - x0_T(x_tch,t))]: the part of the student's
   difference that the teacher's denoiser at low noise would remove -- high frequencies. Unlike SDS
   (eps_T(x_s,t) - e) it compares the teacher with itself, so its bias cancels. ``hfsd_weighting: x0``
   drops the a_t / s_t factor (the same direction in x0 units).
   L_adv = -D(F_T(a_t' x_s + s_t' e'; y, t'), t'),  t' ~ U{0 .. T-1}    (hinge generator term)
   loss = w_reg L_reg + w_hfsd 0.5 ||x_s - sg(x_s - g)||^2 + w_adv L_adv
2. the discriminator step (``fake_score_loss``; there is no fake score):
   the same t' and e' for real and fake,
   L_D = relu(1 - D(F_T(a x_hr + s e'), t')) + relu(1 + D(F_T(a sg(x_s) + s e'), t'))

F_T are the frozen teacher's bottleneck (mid-block) features and D a small head on them that takes t'
explicitly (time-aware discriminator: a projection on a timestep embedding). Defaults follow the
official configuration (hsd weight 1, GAN weight 0.02, hinge losses, student at the last timestep).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onestep.config import config_field
from onestep.errors import ConfigError
from onestep.schedule import expand_like

from .base import DistillTrainer
from .config import DistillConfig
from .helpers import inject_gradient
from .latent_gan import TeacherFeatureGAN, TimeAwareHead

HFSD_WEIGHTINGS = ("eps", "x0")


@dataclass
class TADSRConfig(DistillConfig):
    """TAD-SR settings (official defaults where they carry over; tune per teacher)."""

    FAKE_SCORES = ("none",)

    method: str = config_field("training method", "tadsr")
    teacher: str = config_field("an image-conditioned teacher: digits-sr or a local upscaler pipeline folder", "digits-sr")
    fake_score: str = config_field("TAD-SR trains no fake score: 'none'", "none")
    fake_updates_per_generator: int = config_field("discriminator updates per generator update (TAD-SR alternates: 1)", 1)
    teacher_steps: int = config_field("DDIM steps of the teacher's sample x_tch that the student distils (official: the teacher's 15 steps)", 10)
    regression_weight: float = config_field("weight of ||G(z; y) - x_tch||^2, the distillation term", 1.0)
    hfsd_weight: float = config_field("weight of the high-frequency enhanced score distillation (HFSD)", 1.0)
    hfsd_t_range: list[float] = config_field("[low, high]: HFSD's small noise levels t ~ U{low T .. high T}", factory=lambda: [0.02, 0.2])
    hfsd_weighting: str = config_field("'eps': the paper's eps_T difference; 'x0': the same times s_t / a_t (x0 units)", "eps")
    gan_weight: float = config_field("weight of the generator's time-aware adversarial term (official 0.02; 0: none)", 0.02)
    gan_head_channels: int = config_field("width of the time-aware discriminator head on the teacher's bottleneck", 64)
    # SD x4 upscaler teachers (a StableDiffusionUpscalePipeline folder; real_images: its high-res training images)
    prompt: str | None = config_field("SD x4 upscaler teachers: the one prompt every condition carries (the pipeline's prompt; None: empty)")
    noise_level: int | None = config_field(
        "SD x4 upscaler teachers: the noise level of the low-res image (the pipeline's noise_level; None: its default 20)"
    )

    def __post_init__(self):
        super().__post_init__()
        if len(self.generator_timesteps) != 1:
            raise ConfigError("tadsr trains a one-step student: generator_timesteps takes one timestep")
        if self.teacher_steps < 1:
            raise ConfigError("teacher_steps must be >= 1")
        if min(self.regression_weight, self.hfsd_weight, self.gan_weight) < 0:
            raise ConfigError("regression_weight, hfsd_weight and gan_weight must be >= 0")
        if len(self.hfsd_t_range) != 2 or not 0 <= self.hfsd_t_range[0] <= self.hfsd_t_range[1] <= 1:
            raise ConfigError(f"hfsd_t_range must be [low, high] with 0 <= low <= high <= 1 (got {self.hfsd_t_range})")
        if self.hfsd_weighting not in HFSD_WEIGHTINGS:
            raise ConfigError(f"hfsd_weighting must be one of {HFSD_WEIGHTINGS}, not {self.hfsd_weighting!r}")

    def teacher_options(self) -> dict:
        """The SD x4 upscaler's loader options, those set (other teachers refuse them)."""
        return {k: v for k, v in (("prompt", self.prompt), ("noise_level", self.noise_level)) if v is not None}


def hfsd_gradient(x_s, x_tch, x0_at_s, x0_at_tch, a_t, s_t, weighting: str = "eps") -> torch.Tensor:
    """HFSD's gradient for the student output ``x_s``: ``eps_T(x_s,t) - eps_T(x_tch,t)`` written with the
    teacher's x0 predictions at the two noised points (same noise), ``(a/s) [(x_s - x_tch) - (x0_s - x0_tch)]``;
    with ``weighting="x0"`` without the ``a/s`` factor. Float32, non-finite values zeroed."""
    diff = (x_s.float() - x_tch.float()) - (x0_at_s.float() - x0_at_tch.float())
    if weighting == "eps":
        diff = diff * (a_t / s_t.clamp(min=1e-8)).float()
    return torch.nan_to_num(diff)


class TADSRTrainer(TeacherFeatureGAN, DistillTrainer):
    config_class = TADSRConfig
    config: TADSRConfig
    uses_real_data = True  # paired (high-res, condition) draws: the conditions and the discriminator's real images

    def build_heads(self) -> dict[str, nn.Module]:
        spec = self.teacher_spec
        if spec.conditioning.kind != "image":
            raise ConfigError(f"tadsr distils an image-conditioned (super-resolution) teacher; {spec.name} is conditioned on {spec.conditioning.kind!r}")
        if spec.real_data is None:
            hint = "; set real_images: (or --real_images) to a folder of high-res images" if spec.meta.get("upscaler") else ""
            raise ConfigError(f"tadsr needs paired high-res images and conditions; teacher {spec.name} brings none{hint}")
        if self.config.gan_weight <= 0:
            return {}
        return {"gan": self.time_aware_head(self.config.gan_head_channels)}

    @torch.no_grad()
    def teacher_sample(self, z: torch.Tensor, cond) -> torch.Tensor:
        from onestep.samplers.ddim import ddim_sample

        return ddim_sample(self.teacher, z, cond, None, num_steps=self.config.teacher_steps, clip=self.teacher_spec.clip)

    def generator_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        z, cond = batch["noise"], batch["real_cond"]  # the condition paired with batch["real"]
        n = z.shape[0]
        # 1. One step from pure noise at the fixed timestep, and the teacher's K-step sample from the same z.
        t0 = torch.full((n,), c.generator_timesteps[0], dtype=torch.long, device=self.device)
        x_s = self.generator(z, t0, cond)
        batch["x_gen"] = x_s.detach()
        x_tch = self.teacher_sample(z, cond)
        loss_reg = F.mse_loss(x_s.float(), x_tch.float())
        loss = c.regression_weight * loss_reg
        logs = {"loss/reg": loss_reg.item()}
        if c.hfsd_weight > 0:
            # 2. HFSD: the student's and the teacher's outputs under the same small perturbation, scored by the teacher.
            t = self.sample_t(n, *c.hfsd_t_range)
            e = self.randn(tuple(x_s.shape))
            with torch.no_grad():
                both = self.schedule.add_noise(torch.cat([x_s.detach(), x_tch]), torch.cat([e, e]), torch.cat([t, t]))
                x0 = self.teacher(both, torch.cat([t, t]), _twice(cond))
                a, s = (expand_like(v, x_s) for v in self.schedule.alpha_sigma(t))
                grad = hfsd_gradient(x_s.detach(), x_tch, x0[:n], x0[n:], a, s, c.hfsd_weighting)
            loss_hfsd = inject_gradient(x_s, grad)
            loss = loss + c.hfsd_weight * loss_hfsd
            logs.update({"loss/hfsd": loss_hfsd.item(), "hfsd/grad_abs": grad.abs().mean().item()})
        if c.gan_weight > 0:
            # 3. Time-aware adversarial term at t' ~ U{0 .. T-1}, through the frozen teacher and head.
            loss_adv = self.adversarial_loss(x_s, cond, batch)
            loss = loss + c.gan_weight * loss_adv
            logs["loss/adv_g"] = loss_adv.item()
        return loss, logs

    def fake_score_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The time-aware discriminator's hinge loss: real high-res vs the student's output, same t' and noise."""
        x_real, cond = batch["real"], batch["real_cond"]
        x_fake = batch.get("x_gen")
        if x_fake is None:  # a discriminator-only iteration (fake_updates_per_generator > 1)
            with torch.no_grad():
                t0 = torch.full((x_real.shape[0],), self.config.generator_timesteps[0], dtype=torch.long, device=self.device)
                x_fake = self.generator(batch["noise"], t0, cond)
        return self.discriminator_loss(x_real, x_fake, cond, batch)

    def is_fake_step(self, step: int) -> bool:
        return self.config.gan_weight > 0


def _twice(cond):
    from onestep.conditioning import cat_cond

    return cat_cond(cond, cond)


__all__ = ["TADSRConfig", "TADSRTrainer", "TimeAwareHead", "hfsd_gradient"]  # TimeAwareHead: trainers/latent_gan.py
