"""Consistency distillation: LCM-style students, with SCott, MLCM and iCT as options.

Papers: LCM (Luo et al., 2023, arXiv:2310.04378), consistency models (Song et al., 2023,
arXiv:2303.01469), SCott (Liu et al., 2024, arXiv:2403.01505), MLCM (Xie et al., 2024,
arXiv:2406.05768), iCT (Song & Dhariwal, 2023, arXiv:2310.14189). Maths in METHODS.md,
"Consistency distillation".

Algorithm, per iteration (LCM Alg. 1 in this project's notation):

1. draw real ``x0`` (with its class), a guidance scale ``s`` per sample (fixed, or from
   ``guidance_scale_range``; the student gets ``s`` as an input) and a grid pair
   ``t_lo < t_hi`` adjacent on the N-point DDIM grid ``[0, t_1, .., t_N]``;
2. ``x_hi = a x0 + s e`` at ``t_hi``;
3. teacher step: ``x_lo = DDIM(x_hi, x0_teacher, t_hi -> t_lo)`` with the teacher's x0 under
   CFG ``s`` (our ``s`` is LCM's ``w + 1``, see :mod:`onestep.conditioning`); SCott: ``eta > 0``.
   iCT has no teacher: ``x_lo = a x0 + s e`` at ``t_lo`` with the same ``e``;
4. ``loss = d(f_student(x_hi, t_hi), sg(f_target(x_lo, t_lo)))`` with ``d`` L2, Huber
   ``sqrt((a - b)^2 + c^2) - c`` or iCT's pseudo-Huber on the whole sample;
   ``f = c_skip x + c_out x0`` (LCM eq. 9), so ``f(x, 0) = x``;
   MLCM: ``f`` is the DDIM projection of the x0 prediction to the lower edge of ``t_hi``'s
   segment, which gives the boundary condition for free;
   SCott: ``+ gan_weight * softplus(-D(f_student))``, ``D`` a GAN head (DMD2's) on the frozen
   teacher's bottleneck features of noised samples; the head is trained against real ``x0``;
5. update the student, then the target: ``theta_target <- mu theta_target + (1 - mu) theta``
   (``mu = target_ema_decay``; 0 makes the target the student itself, as MLCM and iCT do).

No fake score is built (``fake_score: none``). The EMA target is one of the loop's extra
networks (a frozen copy of the student's network, placed, sharded and checkpointed by the
loop as ``target.safetensors``) and follows the student in :meth:`after_generator_step`. It is
not the export EMA (``ema_decay``), which the loop keeps as for every method.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from onestep.consistency import (
    ConsistencyDenoiser,
    GuidanceInput,
    consistency_distance,
    ddim_step,
    ict_num_steps,
    ict_pair_weight,
    lcm_grid,
    lcm_timesteps,
    segment_edges,
    with_guidance_input,
)
from onestep.denoiser import frozen
from onestep.errors import ConfigError
from onestep.teachers import Teacher

from .base import DistillTrainer
from .config import load_teacher_with_data
from .consistency_config import ConsistencyConfig
from .dmd2 import GANHead
from .helpers import ema_into


# ---------------------------------------------------------------- trainer


class ConsistencyDraw(NamedTuple):
    """The draws of one consistency update (:meth:`ConsistencyTrainer.draw_update`)."""

    x0: torch.Tensor
    cond: Any
    uncond: Any
    scale: torch.Tensor | None
    t_hi: torch.Tensor
    t_lo: torch.Tensor
    edge: torch.Tensor | None
    noise: torch.Tensor


class ConsistencyTrainer(DistillTrainer):
    config_class = ConsistencyConfig
    uses_real_data = True
    config: ConsistencyConfig

    def __init__(self, config: ConsistencyConfig, teacher: Teacher | None = None):
        teacher = load_teacher_with_data(config, teacher, "consistency distillation")
        self.guidance_input = None
        if config.guidance_scale_range is not None and teacher.meta.get("pipeline") == "AudioLDMPipeline":
            raise ConfigError(
                "guidance_scale_range feeds the guidance scale to the student as timestep_cond, and AudioLDMPipeline "
                "passes none: plain diffusers would sample the student unguided; distil at a fixed guidance_scale instead"
            )
        if config.guidance_scale_range is not None:
            self.guidance_input = GuidanceInput.for_teacher(
                teacher, config.guidance_scale_range, config.guidance_scale, config.guidance_embedding_dim, config.guidance_levels
            )
        if self.guidance_input is not None:
            g, base_net = self.guidance_input, teacher.backbone
            teacher = dataclasses.replace(teacher, student_factory=lambda: with_guidance_input(base_net, g))
        super().__init__(config, teacher)
        c = self.config
        T = self.schedule.num_train_timesteps
        self.grid = lcm_grid(T, c.num_ddim_timesteps, c.max_timestep)
        if c.num_segments > len(self.grid):
            raise ConfigError(f"num_segments ({c.num_segments}) exceeds the grid's {len(self.grid)} points")
        self.edges = segment_edges(self.grid, c.num_segments) if c.num_segments > 1 else [0]
        if c.first_step_timestep is not None:
            if not 0 <= c.first_step_timestep < T or c.first_step_timestep in self.grid:
                raise ConfigError(
                    f"first_step_timestep must lie in [0, {T - 1}] and off the grid {self.grid} (the student reads "
                    f"grid labels on noised data; got {c.first_step_timestep})"
                )
            if self.teacher_spec.conditioning.kind == "text":
                raise ConfigError("first_step_timestep: a text-to-image student's diffusers LCMScheduler starts at the grid's top; leave it unset")
        self.sampling_timesteps = lcm_timesteps(
            self.grid, c.num_segments if c.num_segments > 1 else min(c.sampling_steps, len(self.grid)), c.first_step_timestep
        )
        self.student = self._consistency_view(self.generator.backbone)
        self.target = self._consistency_view(self.extras["target"]) if c.target_ema_decay > 0 else self.student
        if c.huber_c is not None:
            self.huber_c = c.huber_c
        elif c.loss == "pseudo_huber":
            self.huber_c = 0.00054 * math.sqrt(math.prod(self.teacher_spec.sample_shape))
        else:
            self.huber_c = 0.001

    def _consistency_view(self, backbone: nn.Module) -> ConsistencyDenoiser:
        c = self.config
        return ConsistencyDenoiser(
            backbone, self.schedule, self.generator.prediction_type, c.parameterisation, c.sigma_data, c.timestep_scaling, self.guidance_input
        )

    def extra_networks(self) -> dict[str, nn.Module]:
        """The EMA target: a frozen copy of the student's network (none when mu = 0: the target is the student)."""
        if self.config.target_ema_decay <= 0:
            return {}
        return {"target": copy.deepcopy(self.generator.backbone).requires_grad_(False)}

    def build_heads(self) -> dict[str, nn.Module]:
        if self.config.gan_weight <= 0:
            return {}
        spec = self.teacher_spec
        x, t = torch.zeros(1, *spec.sample_shape), torch.zeros(1, dtype=torch.long)
        try:
            with torch.no_grad():
                _, feats = self.triad.teacher(x, t, spec.conditioning.null(1), return_features=True)
        except ValueError as e:
            raise ConfigError(f"SCott's GAN term reads the teacher's bottleneck: {e}") from e
        return {"gan": GANHead(feats.shape[1], feats.ndim == 4, self.config.gan_head_channels)}

    # ------------------------------------------------------------ draws
    def current_grid(self) -> list[int]:
        """The grid of this iteration (iCT grows it by doubling; otherwise fixed)."""
        c = self.config
        if not c.teacher_free:
            return self.grid
        T = self.schedule.num_train_timesteps
        n = ict_num_steps(self.state.step, c.max_steps, c.ict_initial_steps, c.ict_final_steps)
        t_max = T - 1 if c.max_timestep is None else c.max_timestep
        return lcm_grid(T, min(n, t_max + 1), c.max_timestep)

    def draw_timesteps(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adjacent pairs ``(t_hi, t_lo)`` on ``[0] + grid``: uniform over the grid, or iCT's lognormal."""
        pts = torch.tensor([0] + self.current_grid(), dtype=torch.long)
        if self.config.teacher_free:
            a, s = self.schedule.alpha_sigma(pts)
            log_sigma = (s.double() / a.double()).log()
            cdf = torch.erf((log_sigma - self.config.ict_p_mean) / (math.sqrt(2) * self.config.ict_p_std))
            probs = (cdf[1:] - cdf[:-1]).clamp(min=0)
            j = torch.multinomial(probs.float() + 1e-12, n, replacement=True, generator=self.rng) + 1
        else:
            j = torch.randint(1, len(pts), (n,), generator=self.rng)
        return pts[j].to(self.device), pts[j - 1].to(self.device)

    def draw_guidance(self, n: int) -> torch.Tensor:
        """Per-sample CFG scales (our convention): fixed, or uniform in the range (snapped to the student's levels)."""
        c = self.config
        if self.guidance_input is None:
            return torch.full((n,), c.guidance_scale, device=self.device)
        lo, hi = c.guidance_scale_range
        s = lo + (hi - lo) * torch.rand(n, generator=self.rng)
        return self.guidance_input.snap(s).to(self.device)

    def segment_edge(self, t: torch.Tensor) -> torch.Tensor:
        """The lower edge of each timestep's segment (MLCM): the largest edge strictly below ``t``."""
        edges = torch.tensor(self.edges, dtype=torch.long, device=t.device)
        return edges[torch.searchsorted(edges, t, right=False) - 1]

    def student_label(self, t_hi: torch.Tensor) -> torch.Tensor:
        """The label the student reads at ``t_hi``: ``first_step_timestep`` on the grid's top, ``t_hi`` elsewhere."""
        first = self.config.first_step_timestep
        return t_hi if first is None else torch.where(t_hi == max(self.grid), torch.full_like(t_hi, first), t_hi)

    # ------------------------------------------------------------ losses
    def consistency_output(self, net: ConsistencyDenoiser, x: torch.Tensor, t: torch.Tensor, cond, scale, edge) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, x0)``: LCM's ``f(x, t)``, or for segments the DDIM projection of x0 to ``edge``."""
        x0 = net.x0(x, t, cond, scale)
        if net.parameterisation == "lcm":
            return net.boundary(x, t, x0), x0
        return ddim_step(self.schedule, x, x0, t, edge), x0

    def teacher_step(self, x_hi, t_hi, t_lo, cond, uncond, scale, x0, noise) -> torch.Tensor:
        """``x_lo``: one (guided, maybe stochastic) DDIM step of the teacher; iCT: the same noise at ``t_lo``."""
        c = self.config
        if c.teacher_free:
            return self.schedule.add_noise(x0, noise, t_lo)
        if not self.conditioning.guidable:
            guided = 1.0
        elif self.guidance_input is None:
            guided = c.guidance_scale
        else:
            guided = scale
        x0_t = self.teacher.guided(x_hi, t_hi, cond, uncond, guided)
        if self.teacher_spec.clip is not None:
            x0_t = x0_t.clamp(-self.teacher_spec.clip, self.teacher_spec.clip)
        z = self.randn(tuple(x_hi.shape)) if c.eta > 0 else None
        return ddim_step(self.schedule, x_hi, x0_t, t_hi, t_lo, eta=c.eta, noise=z)

    def discriminate(self, x: torch.Tensor, cond) -> torch.Tensor:
        """GAN logits of ``x`` noised at ``t ~ U{0 .. T-1}``, through the frozen teacher's bottleneck."""
        x_t, t, _ = self.noised(x)
        _, feats = self.teacher(x_t, t, cond, return_features=True)
        return self.heads["gan"](feats)

    def is_generator_step(self, step: int) -> bool:
        return True  # the student learns every iteration

    def is_fake_step(self, step: int) -> bool:
        """Only SCott's GAN head trains beside the student, once the teacher fit is over."""
        return self.config.gan_weight > 0 and step >= self.config.teacher_fit_steps

    def generator_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        if self.state.step < c.teacher_fit_steps:
            return self.teacher_fit_loss(batch)
        d = self.draw_update(batch)
        pred, pred_x0, target = self.consistency_pair(d, d.x0)
        # 5. Distance; iCT weights each pair by lambda = 1 / (sigma_hi - sigma_lo), sigma = s_t / a_t (iCT sec. 3.1).
        dist = consistency_distance(pred, target, c.loss, self.huber_c)
        loss = (ict_pair_weight(self.schedule, d.t_hi, d.t_lo) * dist).mean() if c.teacher_free else dist.mean()
        logs = {"loss/consistency": loss.item()}
        batch["x_gen"] = pred_x0.detach()
        if c.gan_weight > 0:
            # 6. SCott: non-saturating GAN term through the frozen teacher and head.
            with frozen(self.heads):
                loss_gan = F.softplus(-self.discriminate(pred_x0, d.cond)).mean()
            loss = loss + c.gan_weight * loss_gan
            logs["loss/gan_g"] = loss_gan.item()
        return loss, logs

    def draw_update(self, batch: dict[str, Any]) -> ConsistencyDraw:
        """What one consistency update draws for ``batch``'s real samples, in this order: a guidance scale,
        an adjacent grid pair ``t_lo < t_hi`` (and MLCM's segment edge), the noise."""
        x0, cond = batch["real"], batch.get("real_cond")
        n = x0.shape[0]
        scale = self.draw_guidance(n)
        t_hi, t_lo = self.draw_timesteps(n)
        edge = self.segment_edge(t_hi) if self.config.num_segments > 1 else None
        return ConsistencyDraw(x0, cond, self.conditioning.null(n, device=self.device), scale, t_hi, t_lo, edge, self.randn(tuple(x0.shape)))

    def consistency_pair(self, d: ConsistencyDraw, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The student's output at ``start`` noised to ``t_hi`` (and its x0), and the target's output one teacher ODE
        step (or iCT's same-noise point) lower: ``(pred, pred_x0, target)``; on the grid's top the student may read
        another label (``first_step_timestep``)."""
        x_hi = self.schedule.add_noise(start, d.noise, d.t_hi)
        pred, pred_x0 = self.consistency_output(self.student, x_hi, self.student_label(d.t_hi), d.cond, d.scale, d.edge)
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, d.t_hi, d.t_lo, d.cond, d.uncond, d.scale, start, d.noise)
            target, _ = self.consistency_output(self.target, x_lo, d.t_lo, d.cond, d.scale, d.edge)
        return pred, pred_x0, target

    def teacher_fit_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Warm start: MSE between the student's x0 and the teacher's guided x0 at ``t ~ U{0 .. T-1}``."""
        x0, cond = batch["real"], batch.get("real_cond")
        n = x0.shape[0]
        x_t, t, _ = self.noised(x0)
        scale = self.draw_guidance(n)
        with torch.no_grad():
            guided = scale if self.guidance_input is not None else self.config.guidance_scale
            target = self.teacher.guided(x_t, t, cond, self.conditioning.null(n, device=self.device), guided if self.conditioning.guidable else 1.0)
        loss = F.mse_loss(self.student.x0(x_t, t, cond, scale), target.float())
        return loss, {"loss/teacher_fit": loss.item()}

    def fake_score_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The GAN head's loss (SCott); there is no fake score to train."""
        cond = batch.get("real_cond")
        d_fake = self.discriminate(batch["x_gen"], cond)
        d_real = self.discriminate(batch["real"], cond)
        loss = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
        return loss, {"loss/gan_d": loss.item()}

    # ------------------------------------------------------------ loop
    @torch.no_grad()
    def update_target(self) -> None:
        """``theta_target <- mu theta_target + (1 - mu) theta_student`` (no-op when the target is the student)."""
        if self.config.target_ema_decay > 0:
            ema_into(self.extras["target"], self.generator.backbone, self.config.target_ema_decay)

    def after_generator_step(self) -> None:
        """The target follows the student: exactly during the teacher fit, by EMA after it (then the
        export EMA steps, as for every method)."""
        if self.state.step < self.config.teacher_fit_steps:
            if self.config.target_ema_decay > 0:
                with torch.no_grad():
                    self.extras["target"].load_state_dict(self.generator.backbone.state_dict())
            return
        self.update_target()
        super().after_generator_step()

    # ------------------------------------------------------ export / preview
    def export_meta(self) -> dict[str, Any]:
        """What ``onestep.json`` records about the consistency parameterisation and guidance."""
        c = self.config
        if c.num_segments > 1:
            by_steps = {str(c.num_segments): list(self.sampling_timesteps)}
        else:
            by_steps = {str(k): lcm_timesteps(self.grid, k, c.first_step_timestep) for k in (1, 2, 4, 8) if k <= len(self.grid)}
        return {
            "consistency": {
                "parameterisation": c.parameterisation,
                "sigma_data": c.sigma_data,
                "timestep_scaling": c.timestep_scaling,
                "grid": list(self.grid),
                "first_step_timestep": c.first_step_timestep,
                "segment_edges": list(self.edges) if c.num_segments > 1 else None,
                "timesteps_by_steps": by_steps,
                "between_steps": "ddim" if c.num_segments > 1 else "renoise",
            },
            "guidance": None if self.guidance_input is None else self.guidance_input.to_dict(),
            "sampling": (
                "x = N(0, I); for each timestep t: x0 = generator(x, t, cond) converted from prediction_type, "
                "f = c_skip(t) x + c_out(t) x0 (lcm) or f = x0 (segments); clamp to clip; then "
                "x = a_next f + s_next e with fresh e (renoise) or e = (x - a_t f) / s_t (ddim); the last f is the sample"
            ),
        }

    def export_timesteps(self) -> list[int]:
        return list(self.sampling_timesteps)

    def sampling_generator(self, net: nn.Module) -> ConsistencyDenoiser:
        return self._consistency_view(net)

__all__ = ["ConsistencyConfig", "ConsistencyDraw", "ConsistencyTrainer"]
