"""sCM: continuous-time consistency distillation in TrigFlow (Lu & Song, 2024, arXiv:2410.11081), and
rCM, sCM with a DMD score regulariser (Zheng et al., 2025, "Large Scale Diffusion Distillation via
Score-Regularized Continuous-Time Consistency"), with ``dmd_weight > 0``.

TrigFlow and its link to this project's VP teachers are in :mod:`onestep.trigflow`: ``x_t = cos(t) x0 +
sin(t) z``, ``z ~ N(0, sigma_d^2 I)``, the network's velocity ``V = sigma_d F(x_t / sigma_d, t)`` and the
consistency function ``f = cos(t) x_t - sin(t) V``, which for a velocity derived from an x0 prediction is
that x0 prediction itself: the student is the teacher's network, sampled like any one- or few-step student.

Per iteration (sCM Algorithm 1, "sCD", in this project's notation):

1. real ``x0`` with its condition, ``z ~ N(0, sigma_d^2 I)`` and ``t``: ``tan(t) = exp(tau) / sigma_d``,
   ``tau ~ N(P_mean, P_std^2)`` (sec. 4.3), clamped to the TrigFlow times of ``[min_timestep, max_timestep]``;
2. ``x_t = cos(t) x0 + sin(t) z``;
3. the teacher's ODE velocity ``dx_t/dt = V_teacher(x_t, t)`` under CFG ``guidance_scale`` (one batched pass);
4. ``V-, dV-/dt``: the student's velocity at ``(x_t, t)`` with the current weights ``theta-`` (no gradient)
   and its total derivative along the teacher's ODE, the tangent ``(dx_t/dt, 1)``: forward-mode AD
   (``torch.func.jvp``, attention in plain math), or a central finite difference (``tangent``);
5. ``g = cos^2(t) (dx_t/dt - V-) - r cos(t) sin(t) (x_t + dV-/dt)``, which is ``cos(t) df-/dt``: the
   paper's ``g`` (Alg. 1) with ``sigma_d F`` written ``V``; ``r`` rises from 0 to 1 over
   ``tangent_warmup_steps`` (tangent warm-up, sec. 4.2); then ``g <- g / (||g|| + c)`` per sample
   (tangent normalisation, ``c = tangent_norm_c``);
6. ``loss = mean_i exp(w(t_i)) / D ||F_theta(x_t, t) - F- - g||^2 - w(t_i)`` with ``F = V / sigma_d``: its
   gradient in ``theta`` is the continuous-time consistency gradient; ``w`` is the adaptive weighting
   (sec. 4.4), a small network of ``t`` trained on the same per-sample errors (the loop's second
   optimizer: it is the method's only "head"; ``adaptive_weighting: false`` keeps ``w = 0``).

rCM (``dmd_weight > 0``, a fake score ``copy`` or ``lora``): 7. the student's one-step sample ``x = f(z, t_max)``
from pure noise gets DMD's distribution-matching gradient (the teacher's guided x0 against the fake score's
at ``t ~ U(loss_t_range)``, normalised as in DMD2, :func:`~onestep.trainers.dmd2.dm_gradient`), times
``dmd_weight``, beside the sCM loss; 8. the fake score learns the student's samples with the plain
denoising loss, on the loop's second optimizer with the weighting network. The regulariser pulls the
one-step samples onto the teacher's distribution (sharpness, diversity) where the consistency loss alone
converges slowly.

Choices where the paper leaves one: the student takes no guidance input (it distils one CFG scale, as the
paper's ImageNet models have no CFG input); ``w`` reads Fourier features of ``t`` instead of the network's
own time embedding (one network for every backbone); the 2-step sampler's middle time is the paper's
``t = 1.1``, rounded to the nearest label; rCM's regulariser reads the one-step sample only (not each
step of a few-step student).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from onestep import trigflow
from onestep.config import config_field
from onestep.errors import ConfigError
from onestep.schedule import FlowMatchSchedule, expand_like
from onestep.teachers import Teacher

from .base import DistillTrainer
from .config import DistillConfig, load_teacher_with_data
from .dmd2 import dm_gradient
from .helpers import inject_gradient


@dataclass
class SCMConfig(DistillConfig):
    """sCM settings (the paper's ImageNet values where they carry over; tune per teacher).

    ``generator_timesteps`` and ``fake_updates_per_generator`` are not used: the student learns every
    iteration and samples at ``max_timestep`` (and the middle time for 2 steps).
    """

    FAKE_SCORES = ("none", "copy", "lora")

    method: str = config_field("training method", "scm")
    fake_score: str = config_field("'none' (sCM); rCM's regulariser (dmd_weight > 0) needs a fake score: 'copy' or 'lora'", "none")
    dmd_weight: float = config_field("rCM: weight of the DMD regulariser on the one-step sample (0: plain sCM)", 0.0)
    sigma_data: float = config_field("sigma_d of TrigFlow (the data's std; the paper: 0.5)", 0.5)
    p_mean: float = config_field("P_mean of the proposal tan(t) = exp(tau) / sigma_d, tau ~ N(P_mean, P_std^2)", -1.0)
    p_std: float = config_field("P_std of that proposal", 1.4)
    min_timestep: int = config_field("lowest label trained (its TrigFlow time is t_min)", 10)
    max_timestep: int = config_field(
        "label pure noise gets at sampling (t_max); keep sqrt(abar) there above ~0.05 for eps-predicting students", 959
    )
    tangent: str = config_field(
        "how dV/dt is computed: 'jvp' (torch.func.jvp, attention in plain math), 'finite_difference' "
        "(central, step tangent_fd_step) or 'auto' (jvp, the difference where an op has no forward-mode rule)", "auto"
    )
    tangent_fd_step: float = config_field("step h of the finite-difference tangent (in TrigFlow time; ~0.06 labels at 1e-4)", 1e-4)
    tangent_warmup_steps: int = config_field("iterations over which r of the tangent rises from 0 to 1 (the paper: 10k)", 100)
    tangent_norm_c: float = config_field("c of the tangent normalisation g / (||g|| + c) (0: none)", 0.1)
    adaptive_weighting: bool = config_field("learn the weighting w(t) (sec. 4.4); false: w = 0", True)
    weighting_features: int = config_field("Fourier features of t the weighting network reads", 16)
    sampling_steps: int = config_field("steps the exported student samples in: 1, or 2 (t_max then t = 1.1)", 1)

    def __post_init__(self):
        super().__post_init__()
        if self.fake_loss_weighting != "native":
            raise ConfigError("fake_loss_weighting: sCM trains no fake score; leave it 'native'")
        if self.regression_warmup_steps:
            raise ConfigError("regression_warmup_steps is a DMD warm start; sCM does not use it (set 0)")
        if self.tangent not in trigflow.TANGENT_MODES:
            raise ConfigError(f"tangent must be one of {trigflow.TANGENT_MODES} (got {self.tangent!r})")
        if self.sigma_data <= 0 or self.p_std <= 0 or self.tangent_fd_step <= 0:
            raise ConfigError("sigma_data, p_std and tangent_fd_step must be > 0")
        if self.tangent_norm_c < 0 or self.tangent_warmup_steps < 0:
            raise ConfigError("tangent_norm_c and tangent_warmup_steps must be >= 0")
        if not 0 <= self.min_timestep < self.max_timestep:
            raise ConfigError(f"need 0 <= min_timestep < max_timestep (got {self.min_timestep}, {self.max_timestep})")
        if self.sampling_steps not in (1, 2):
            raise ConfigError(f"sampling_steps must be 1 or 2 (got {self.sampling_steps})")
        if self.dmd_weight < 0:
            raise ConfigError(f"dmd_weight must be >= 0 (got {self.dmd_weight})")
        if (self.dmd_weight > 0) != (self.fake_score != "none"):
            raise ConfigError("rCM's regulariser and a fake score go together: dmd_weight > 0 needs fake_score 'copy' or "
                              f"'lora', and fake_score 'none' needs dmd_weight 0 (got {self.dmd_weight}, {self.fake_score!r})")
        if self.weighting_features < 1:
            raise ConfigError(f"weighting_features must be at least 1 (got {self.weighting_features})")


class AdaptiveWeight(nn.Module):
    """``w(t)``: a linear map of Fourier features of ``t`` through one hidden layer; starts at 0."""

    def __init__(self, features: int, hidden: int = 64):
        super().__init__()
        self.features = features
        self.net = nn.Sequential(nn.Linear(2 * features, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(trigflow.fourier_features(t.float(), self.features)).squeeze(1)


class SCMTrainer(DistillTrainer):
    config_class = SCMConfig
    uses_real_data = True
    config: SCMConfig

    def __init__(self, config: SCMConfig, teacher: Teacher | None = None):
        teacher = load_teacher_with_data(config, teacher, "sCM distillation")
        if isinstance(teacher.schedule, FlowMatchSchedule):
            raise ConfigError("sCM here maps variance-preserving teachers to TrigFlow; flow-matching teachers (SD3) are not supported")
        super().__init__(config, teacher)
        c = self.config
        T = self.schedule.num_train_timesteps
        if c.max_timestep >= T:
            raise ConfigError(f"max_timestep must be below {T} for this teacher (got {c.max_timestep})")
        self.t_min = float(trigflow.t_for_label(self.schedule, c.min_timestep, c.sigma_data))
        self.t_max = float(trigflow.t_for_label(self.schedule, c.max_timestep, c.sigma_data))
        self.tangent_mode_used: str | None = None

    def build_heads(self) -> dict[str, nn.Module]:
        return {"weight": AdaptiveWeight(self.config.weighting_features)} if self.config.adaptive_weighting else {}

    def is_generator_step(self, step: int) -> bool:
        return True

    def is_fake_step(self, step: int) -> bool:
        """The weighting network (on the student step's errors) and rCM's fake score learn beside the student."""
        return self.config.adaptive_weighting or self.config.dmd_weight > 0

    # ------------------------------------------------------------ the loss
    def student_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return trigflow.velocity(self.generator, x_t, t, cond, self.config.sigma_data)

    def generator_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        sd = c.sigma_data
        x0, cond = batch["real"].float(), batch.get("real_cond")
        n = x0.shape[0]
        # 1-2. Time from the proposal, the TrigFlow forward process.
        t = trigflow.sample_t(n, c.p_mean, c.p_std, sd, self.t_min, self.t_max, generator=self.rng).to(self.device)
        z = self.randn(tuple(x0.shape)) * sd
        cos, sin = expand_like(torch.cos(t), x0), expand_like(torch.sin(t), x0)
        x_t = cos * x0 + sin * z
        with torch.no_grad():
            # 3. The teacher's ODE velocity, guided.
            guided = c.guidance_scale if self.conditioning.guidable else 1.0
            uncond = self.conditioning.null(n, device=self.device) if guided != 1.0 else None
            dxdt = trigflow.velocity(self.teacher, x_t, t, cond, sd, uncond=uncond, scale=guided)
        # 4. The student's velocity with theta- and its derivative along (dx_t/dt, 1).
        v_minus, dv_dt, self.tangent_mode_used = trigflow.tangent(
            lambda x, tt: self.student_velocity(x, tt, cond), (x_t, t), (dxdt, torch.ones_like(t)), c.tangent,
            self.generator.backbone, h=c.tangent_fd_step,
        )
        # 5. g = cos(t) df-/dt, warmed up and normalised.
        r = trigflow.tangent_warmup(self.state.step, c.tangent_warmup_steps)
        g = cos * cos * (dxdt - v_minus) - r * cos * sin * (x_t + dv_dt)
        if c.tangent_norm_c > 0:
            g = trigflow.normalised(g, c.tangent_norm_c)
        # 6. ||F_theta - F- - g||^2 / D per sample, weighted by exp(w(t)) (w trains on these errors).
        f_theta = self.student_velocity(x_t, t, cond) / sd
        err = (f_theta - v_minus / sd - g).pow(2).flatten(1).mean(1)
        w = self.heads["weight"](t).detach() if c.adaptive_weighting else torch.zeros_like(t)
        loss = (torch.exp(w) * err).mean()
        batch["scm_t"], batch["scm_err"] = t, err.detach()
        logs = {"loss/scm": loss.item(), "scm/err": err.mean().item(), "scm/tangent_r": r}
        if c.dmd_weight > 0:
            loss_dmd = self.dmd_regulariser(batch)
            loss = loss + c.dmd_weight * loss_dmd
            logs["loss/dmd"] = loss_dmd.item()
        return loss, logs

    def dmd_regulariser(self, batch: dict[str, Any]) -> torch.Tensor:
        """rCM 7.: DMD's gradient on the one-step sample ``x = f(z, t_max)`` (kept in ``batch["x_gen"]``)."""
        c = self.config
        z, cond = batch["noise"], batch["cond"]
        t_max = torch.full((z.shape[0],), c.max_timestep, dtype=torch.long, device=self.device)
        x = self.generator(z, t_max, cond)
        batch["x_gen"] = x.detach()
        t = self.sample_t(x.shape[0], *c.loss_t_range)
        with torch.no_grad():
            x_t = self.schedule.add_noise(x.detach(), self.randn(tuple(x.shape)), t)
            x0_real = self.teacher.guided(x_t, t, cond, batch["uncond"], c.guidance_scale)
            grad = dm_gradient(x.detach(), x0_real, self.fake(x_t, t, cond))
        return inject_gradient(x, grad)

    def fake_score_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The adaptive weighting's loss ``mean(exp(w) err - w)`` on the student step's errors (its minimum:
        ``w = -log err``, which evens out the loss over ``t``); rCM 8.: the fake score's denoising loss."""
        loss, logs = torch.zeros((), device=self.device), {}
        if self.config.adaptive_weighting:
            w = self.heads["weight"](batch["scm_t"])
            loss_w = (torch.exp(w) * batch["scm_err"] - w).mean()
            loss, logs["loss/weighting"] = loss + loss_w, loss_w.item()
        if self.config.dmd_weight > 0:
            loss_f = self.denoising_loss(self.fake, self.detached_sample(batch), batch["cond"])
            loss, logs["loss/fake"] = loss + loss_f, loss_f.item()
        return loss, logs

    # ------------------------------------------------------ export
    def export_timesteps(self) -> list[int]:
        """``[max_timestep]``, and for 2 steps the label nearest the paper's middle time ``t = 1.1``."""
        c = self.config
        if c.sampling_steps == 1:
            return [c.max_timestep]
        mid = int(round(float(trigflow.label_for_t(self.schedule, torch.tensor([1.1]), c.sigma_data))))
        return [c.max_timestep, min(mid, c.max_timestep - 1)]


__all__ = ["SCMConfig", "SCMTrainer"]
