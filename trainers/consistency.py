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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onestep.config import config_field
from onestep.consistency import (
    LOSSES,
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
from .config import DistillConfig, check_interval, load_teacher_with_data
from .dmd2 import GANHead
from .helpers import ema_into


@dataclass
class ConsistencyConfig(DistillConfig):
    """Consistency distillation settings (LCM defaults in METHODS.md; tune per teacher).

    ``guidance_scale`` is the fixed teacher CFG scale, or, with ``guidance_scale_range``, the
    student's default scale at sampling. ``generator_timesteps`` and
    ``fake_updates_per_generator`` are not used: the student's timesteps come from the grid,
    and the student is updated every iteration.
    """

    FAKE_SCORES = ("none",)

    method: str = config_field("training method", "consistency")
    fake_score: str = config_field("consistency distillation trains no fake score: 'none'", "none")
    num_ddim_timesteps: int = config_field("N: points of the DDIM grid the teacher steps along (skip k = T / N)", 50)
    max_timestep: int | None = config_field(
        "top of the grid, the label pure noise gets at sampling (default T-1; keep sqrt(abar) there "
        "above ~0.05 for eps-predicting students)"
    )
    first_step_timestep: int | None = config_field(
        "label the student reads on the grid's top point, the pure noise of its first sampling step, instead of the "
        "top itself (off the grid; None: the top, plain LCM). An eps student's x0 there is its eps error times "
        "s/a (16 at a top of sqrt(abar) 0.062): a lower label, as DMD2's generator timestep, keeps one-step samples clean"
    )
    target_ema_decay: float | None = config_field(
        "EMA rate mu of the target network; 0: the target is the student itself. Default by mode: 0.95 (LCM), "
        "0 for MLCM (num_segments > 1), iCT (teacher_free) and LCM-LoRA (generator_lora_rank), which train without an EMA target"
    )
    loss: str | None = config_field(
        "'l2', 'huber' (LCM, per element) or 'pseudo_huber' (iCT, on the whole sample); default 'pseudo_huber' for iCT "
        "(teacher_free), else 'l2'"
    )
    huber_c: float | None = config_field("c of the (pseudo-)Huber loss (default 0.001; pseudo_huber: 0.00054 sqrt(dim))")
    sigma_data: float = config_field("sigma_data of the boundary condition", 0.5)
    timestep_scaling: float = config_field("timestep scaling of the boundary condition (LCM: 10)", 10.0)
    guidance_scale_range: list[float] | None = config_field(
        "[min, max]: draw the teacher's CFG scale per sample from this range (our convention; LCM's "
        "w in [5, 15] is [6, 16] here) and feed it to the student as an input"
    )
    guidance_levels: int = config_field("class-conditional students without timestep_cond: guidance levels of the class table", 9)
    guidance_embedding_dim: int = config_field("UNet2DConditionModel students: time_cond_proj_dim of the guidance embedding", 256)
    eta: float = config_field("SCott: eta of the stochastic DDIM teacher step (0: deterministic, plain LCM)", 0.0)
    gan_weight: float = config_field("SCott: weight of the adversarial term softplus(-D(f)) (0: none; paper 0.4)", 0.0)
    gan_head_channels: int = config_field("width of the GAN head on the teacher's bottleneck features", 64)
    num_segments: int = config_field("MLCM: M segments of the trajectory (1: one-segment LCM); the student samples in M steps", 1)
    teacher_free: bool = config_field("iCT: consistency training without the teacher (x_lo uses the same noise at t_lo)", False)
    ict_initial_steps: int = config_field("iCT: grid size at the start of the doubling schedule", 10)
    ict_final_steps: int = config_field("iCT: largest grid size of the doubling schedule", 640)
    ict_p_mean: float = config_field("iCT: mean of the lognormal over sigma = s_t / a_t for drawing grid pairs", -1.1)
    ict_p_std: float = config_field("iCT: std of that lognormal", 2.0)
    sampling_steps: int = config_field("default sampling steps recorded in the student (segments: num_segments)", 4)
    teacher_fit_steps: int = config_field(
        "first iterations fit the student's x0 to the teacher's (guided) x0 on noised data: the 'initialised "
        "from the teacher' start for fresh networks (analytic teachers); 0 for students copied from the teacher",
        0,
    )

    def __post_init__(self):
        super().__post_init__()
        if self.fake_loss_weighting != "native":
            raise ConfigError("fake_loss_weighting: consistency distillation trains no fake score; leave it 'native'")
        for name in ("num_ddim_timesteps", "guidance_levels", "num_segments", "sampling_steps", "ict_initial_steps", "gan_head_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        # The modes' own defaults (iCT, MLCM and LCM-LoRA train against the student itself; iCT's distance).
        if self.target_ema_decay is None:
            self.target_ema_decay = 0.0 if (self.teacher_free or self.num_segments > 1 or self.generator_lora_rank) else 0.95
        if self.loss is None:
            self.loss = "pseudo_huber" if self.teacher_free else "l2"
        if not 0 <= self.target_ema_decay < 1:
            raise ConfigError(f"target_ema_decay must lie in [0, 1) (got {self.target_ema_decay})")
        if self.generator_lora_rank and self.target_ema_decay > 0:
            raise ConfigError(
                "generator_lora_rank with an EMA target: the target is a plain copy and cannot follow the adapters; "
                "set target_ema_decay: 0 (the target is the student itself, as LCM-LoRA trains)"
            )
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES} (got {self.loss!r})")
        if self.huber_c is not None and self.huber_c <= 0:
            raise ConfigError(f"huber_c must be > 0 (got {self.huber_c})")
        if self.sigma_data <= 0 or self.timestep_scaling <= 0:
            raise ConfigError("sigma_data and timestep_scaling must be > 0")
        if self.guidance_scale_range is not None:
            check_interval("guidance_scale_range", self.guidance_scale_range)
        if self.guidance_embedding_dim < 2:
            raise ConfigError("guidance_embedding_dim must be at least 2")
        if self.eta < 0 or self.gan_weight < 0:
            raise ConfigError("eta and gan_weight must be >= 0")
        if self.num_segments > self.num_ddim_timesteps:
            raise ConfigError(f"num_segments ({self.num_segments}) cannot exceed num_ddim_timesteps ({self.num_ddim_timesteps})")
        if self.teacher_free and (self.guidance_scale_range is not None or self.eta > 0 or self.num_segments > 1):
            raise ConfigError("teacher_free (iCT) has no teacher step: it takes no guidance range, eta or segments")
        if self.teacher_fit_steps < 0:
            raise ConfigError(f"teacher_fit_steps must be >= 0 (got {self.teacher_fit_steps})")
        if self.ict_final_steps < self.ict_initial_steps:
            raise ConfigError("ict_final_steps must be >= ict_initial_steps")
        if self.first_step_timestep is not None and (self.num_segments > 1 or self.teacher_free):
            raise ConfigError("first_step_timestep is for one-segment LCM students (not MLCM segments or iCT)")
        if self.regression_warmup_steps:
            raise ConfigError("regression_warmup_steps is a DMD warm start; consistency distillation does not use it (set 0)")

    @property
    def parameterisation(self) -> str:
        return "segments" if self.num_segments > 1 else "lcm"


# ---------------------------------------------------------------- trainer


class ConsistencyTrainer(DistillTrainer):
    config_class = ConsistencyConfig
    uses_real_data = True
    config: ConsistencyConfig

    def __init__(self, config: ConsistencyConfig, teacher: Teacher | None = None):
        teacher = load_teacher_with_data(config, teacher, "consistency distillation")
        self.guidance_input = None
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
        self.sampling_timesteps = self.timesteps_for(c.num_segments if c.num_segments > 1 else min(c.sampling_steps, len(self.grid)))
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

    def timesteps_for(self, steps: int) -> list[int]:
        """The student's K-step sampling labels: LCMScheduler's, the first one ``first_step_timestep`` if set."""
        ts = lcm_timesteps(self.grid, steps)
        first = self.config.first_step_timestep
        return ts if first is None or self.config.num_segments > 1 else [first, *ts[1:]]

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
        x0, cond = batch["real"], batch.get("real_cond")
        n = x0.shape[0]
        uncond = self.conditioning.null(n, device=self.device)
        # 1. Guidance scale and an adjacent grid pair t_lo < t_hi.
        scale = self.draw_guidance(n)
        t_hi, t_lo = self.draw_timesteps(n)
        edge = self.segment_edge(t_hi) if c.num_segments > 1 else None
        # 2. Forward process at t_hi.
        noise = self.randn(tuple(x0.shape))
        x_hi = self.schedule.add_noise(x0, noise, t_hi)
        # 3. Student (on the grid's top it may read another label: first_step_timestep).
        pred, pred_x0 = self.consistency_output(self.student, x_hi, self.student_label(t_hi), cond, scale, edge)
        with torch.no_grad():
            # 4. Teacher ODE step (or iCT's same-noise point), then the target's output there.
            x_lo = self.teacher_step(x_hi, t_hi, t_lo, cond, uncond, scale, x0, noise)
            target, _ = self.consistency_output(self.target, x_lo, t_lo, cond, scale, edge)
        # 5. Distance; iCT weights each pair by lambda = 1 / (sigma_hi - sigma_lo), sigma = s_t / a_t (iCT sec. 3.1).
        dist = consistency_distance(pred, target, c.loss, self.huber_c)
        loss = (ict_pair_weight(self.schedule, t_hi, t_lo) * dist).mean() if c.teacher_free else dist.mean()
        logs = {"loss/consistency": loss.item()}
        batch["x_gen"] = pred_x0.detach()
        if c.gan_weight > 0:
            # 6. SCott: non-saturating GAN term through the frozen teacher and head.
            with frozen(self.heads):
                loss_gan = F.softplus(-self.discriminate(pred_x0, cond)).mean()
            loss = loss + c.gan_weight * loss_gan
            logs["loss/gan_g"] = loss_gan.item()
        return loss, logs

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
            by_steps = {str(k): self.timesteps_for(k) for k in (1, 2, 4, 8) if k <= len(self.grid)}
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

__all__ = ["ConsistencyConfig", "ConsistencyTrainer"]
