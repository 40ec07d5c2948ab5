"""CTM as in SoundCTM: consistency trajectory distillation with the teacher's own feature space.

Papers: CTM (Kim et al., 2024, "Consistency Trajectory Models", arXiv:2310.02279) and SoundCTM (Saito et
al., 2024, "SoundCTM: Uniting Score-based and Consistency Models for Text-to-Sound Generation",
arXiv:2405.18503). The student ``G(x_t, t, s)`` jumps from any ``t`` to any ``s <= t`` of the teacher's
ODE trajectory (:mod:`onestep.ctm`: ``G`` is a DDIM step with the student's x0 estimate ``g(x_t, t, s)``):
one jump to the end is a one-step sample, several jumps a deterministic (``gamma = 0``) or stochastic
few-step one, with the same network.

Per iteration (CTM Alg. 1 / SoundCTM sec. 3, on the N-point grid ``0 = t_0 < t_1 < .. < t_N``):

1. real ``x0`` with its condition ``c``; with probability ``uncond_prob`` ``c`` becomes the null condition
   (SoundCTM trains the conditional and the unconditional student together, for nu-sampling);
2. ``k ~ U{1 .. solver_steps}``, ``t = t_i`` with ``i ~ U{k .. N}``, ``u = t_{i-k}``, ``s = t_j`` with
   ``j ~ U{0 .. i-k}`` (or ``j = 0``, the end, with probability ``end_jump_prob``); ``x_t = a_t x0 + s_t e``;
3. estimate: ``x_est = G_theta(x_t, t, s)``, carried to the end by the target network,
   ``z_est = G_sg(x_est, s, 0)`` (gradient to ``theta`` through ``x_est`` only);
4. target (no gradient): ``x_u = Solver(x_t, t -> u)``, ``k`` DDIM steps of the teacher under CFG
   ``guidance_scale`` (the null condition's rows unguided); ``z_tgt = G_sg(G_sg(x_u, u, s), s, 0)``;
5. ``L_CTM = d(z_est, z_tgt)`` with SoundCTM's distance in the teacher's own feature space (eq. 6):
   the teacher's encoder feature maps of both at label ``feature_timestep``, each unit-normalised over
   channels, squared differences averaged per map and summed over maps (``distance: l2`` for plain MSE);
6. ``L_DSM``: the student at ``s = t`` is a denoiser, trained with the teacher's own diffusion loss on
   ``g_theta(x_t', t', t')`` (CTM eq. 9), weighted ``dsm_weight``;
7. the target follows the student by EMA (``target_ema_decay``; 0: the student itself, stop-gradient);
8. with ``gan_weight > 0``, CTM's GAN term (CTM eq. 11, which its one-step results rest on; SoundCTM has
   none): the end points ``z_est`` against real samples, through a time-aware discriminator on the frozen
   teacher's bottleneck (:mod:`onestep.trainers.latent_gan`, TAD-SR's), its head trained in the
   fake-score step.

Choices where the papers leave one: the solver is DDIM on the grid (the teacher's own deterministic
sampler; CTM uses Heun in EDM time); ``k`` is drawn per iteration (CTM fixes it per run), so short and long
teacher segments are both learned; ``u`` and ``s`` lie on the grid, and class-conditional students take
``s`` as extra class-table rows (one block per grid point), so gamma-sampling snaps ``s~`` to the grid; the
DSM weight is a fixed number (CTM balances it by gradient norms); the teacher's features are read at a low
label (``feature_timestep``, CTM's ``sigma_min``) with the sample's own condition; the GAN's discriminator
reads the teacher's features (CTM: a StyleGAN-XL discriminator on pretrained feature networks) and its
weight is fixed (CTM: adaptive).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from onestep.conditioning import index_cond
from onestep.config import config_field
from onestep.consistency import lcm_grid, lcm_timesteps, with_scalar_input
from onestep.ctm import CTMDenoiser, JumpInput, clip_through, feature_distance, jump, teacher_features
from onestep.denoiser import frozen
from onestep.errors import ConfigError
from onestep.schedule import FlowMatchSchedule
from onestep.teachers import Teacher

from .base import DistillTrainer
from .config import DistillConfig, load_teacher_with_data
from .helpers import ema_into
from .latent_gan import TeacherFeatureGAN

DISTANCES = ("teacher_features", "l2")
GAN_INPUTS = ("end_points", "one_step")


@dataclass
class CTMConfig(DistillConfig):
    """CTM settings (SoundCTM's where they carry over; tune per teacher).

    ``generator_timesteps`` and ``fake_updates_per_generator`` are not used: the student learns every
    iteration, on the grid, and samples at the grid's top.
    """

    FAKE_SCORES = ("none",)

    method: str = config_field("training method", "ctm")
    fake_score: str = config_field("CTM trains no fake score: 'none'", "none")
    num_ddim_timesteps: int = config_field("N: points of the grid t, u and s are drawn on (and the student's jump targets)", 24)
    max_timestep: int | None = config_field(
        "top of the grid, the label pure noise gets at sampling (default T-1; keep sqrt(abar) there above ~0.05 for eps-predicting students)"
    )
    solver_steps: int = config_field("largest number k of teacher DDIM steps from t to u (k ~ U{1 .. solver_steps} per iteration)", 4)
    end_jump_prob: float = config_field(
        "probability that s is the end (0) instead of uniform in [0, u] (CTM code's s strategies: 0 'uniform', 1 'smallest'); "
        "more weight on the one-step jump", 0.0
    )
    target_ema_decay: float = config_field("EMA rate of the target network G_sg (0: the student itself, stop-gradient)", 0.95)
    distance: str = config_field("'teacher_features' (SoundCTM: the teacher's encoder features) or 'l2'", "teacher_features")
    feature_timestep: int = config_field("label at which the teacher reads the two samples' features (CTM's sigma_min)", 0)
    dsm_weight: float = config_field("weight of the denoising loss on g(x_t, t, t) (0: none)", 1.0)
    uncond_prob: float = config_field("probability a sample's condition is dropped (the unconditional student of nu-sampling)", 0.1)
    nu: float = config_field("nu of nu-sampling recorded in the student: g(null) + nu (g(c) - g(null)); 1: the conditional student", 1.0)
    gamma: float = config_field("gamma of the student's gamma-sampling: 0 deterministic jumps, 1 jump to the end and re-noise", 0.0)
    jump_embedding_dim: int = config_field("UNet2DConditionModel students: time_cond_proj_dim of the embedding of s", 256)
    sampling_steps: int = config_field("default sampling steps recorded in the student (1 to N; any of them works)", 1)
    gan_weight: float = config_field("weight of the time-aware adversarial term on the end points z_est (CTM's GAN; 0: none)", 0.0)
    gan_head_channels: int = config_field("width of the time-aware discriminator head on the teacher's bottleneck", 64)
    gan_on: str = config_field(
        "what the GAN term judges: 'end_points' (CTM eq. 11: z_est, mostly carried from lightly noised data, close to "
        "real ones) or 'one_step' (the student's one-step samples from pure noise, G(z, t_top, 0), what one step gives)",
        "end_points",
    )
    gan_t_max: int | None = config_field(
        "top of the discriminator's noise levels t' ~ U{0 .. gan_t_max} (default T - 1; low levels keep visible the "
        "fine detail it should judge)"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.fake_loss_weighting != "native":
            raise ConfigError("fake_loss_weighting: CTM trains no fake score; leave it 'native'")
        if self.regression_warmup_steps:
            raise ConfigError("regression_warmup_steps is a DMD warm start; CTM does not use it (set 0)")
        if self.generator_lora_rank:
            raise ConfigError("generator_lora_rank: a CTM student takes the jump target s as a new input, which a LoRA "
                              "student on the teacher's frozen weights cannot learn; train the full network (0)")
        for name in ("num_ddim_timesteps", "solver_steps", "sampling_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.solver_steps > self.num_ddim_timesteps:
            raise ConfigError(f"solver_steps ({self.solver_steps}) cannot exceed num_ddim_timesteps ({self.num_ddim_timesteps})")
        if self.sampling_steps > self.num_ddim_timesteps:
            raise ConfigError(f"sampling_steps ({self.sampling_steps}) cannot exceed num_ddim_timesteps ({self.num_ddim_timesteps})")
        if not 0 <= self.target_ema_decay < 1:
            raise ConfigError(f"target_ema_decay must lie in [0, 1) (got {self.target_ema_decay})")
        if self.distance not in DISTANCES:
            raise ConfigError(f"distance must be one of {DISTANCES} (got {self.distance!r})")
        if self.feature_timestep < 0 or self.dsm_weight < 0 or self.gan_weight < 0:
            raise ConfigError("feature_timestep, dsm_weight and gan_weight must be >= 0")
        if self.gan_on not in GAN_INPUTS:
            raise ConfigError(f"gan_on must be one of {GAN_INPUTS} (got {self.gan_on!r})")
        if self.gan_t_max is not None and not 0 <= self.gan_t_max:
            raise ConfigError(f"gan_t_max must be >= 0 (got {self.gan_t_max})")
        if not 0 <= self.end_jump_prob <= 1:
            raise ConfigError(f"end_jump_prob must lie in [0, 1] (got {self.end_jump_prob})")
        if not 0 <= self.uncond_prob < 1:
            raise ConfigError(f"uncond_prob must lie in [0, 1) (got {self.uncond_prob})")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"gamma must lie in [0, 1] (got {self.gamma})")
        if self.jump_embedding_dim < 2:
            raise ConfigError("jump_embedding_dim must be at least 2")


class CTMTrainer(TeacherFeatureGAN, DistillTrainer):
    config_class = CTMConfig
    uses_real_data = True
    config: CTMConfig

    def __init__(self, config: CTMConfig, teacher: Teacher | None = None):
        teacher = load_teacher_with_data(config, teacher, "CTM distillation")
        if isinstance(teacher.schedule, FlowMatchSchedule):
            raise ConfigError("CTM here jumps along a variance-preserving teacher's DDIM trajectory; flow-matching teachers (SD3) are not supported")
        T = teacher.schedule.num_train_timesteps
        self.grid = lcm_grid(T, config.num_ddim_timesteps, config.max_timestep)
        self.points = [0] + self.grid  # t_0 = 0 (the end), t_1 .. t_N
        if config.feature_timestep >= T:
            raise ConfigError(f"feature_timestep must be below {T} for this teacher (got {config.feature_timestep})")
        self.jump_input = JumpInput.for_backbone(teacher.backbone, self.points, config.jump_embedding_dim)
        j, base_net = self.jump_input, teacher.backbone
        teacher = dataclasses.replace(
            teacher, student_factory=lambda: with_scalar_input(base_net, j.kind, j.embedding_dim, len(j.levels), j.stride)
        )
        super().__init__(config, teacher)
        self.student = self.ctm_view(self.generator.backbone)
        self.target = self.ctm_view(self.extras["target"]) if config.target_ema_decay > 0 else self.student

    def ctm_view(self, backbone: nn.Module, nu: float = 1.0, gamma: float = 0.0) -> CTMDenoiser:
        return CTMDenoiser(
            backbone, self.schedule, self.generator.prediction_type, self.jump_input, nu, gamma, self.conditioning.null, self.teacher_spec.clip
        )

    def extra_networks(self) -> dict[str, nn.Module]:
        """The EMA target G_sg: a frozen copy of the student's network (none when its rate is 0)."""
        if self.config.target_ema_decay <= 0:
            return {}
        return {"target": copy.deepcopy(self.generator.backbone).requires_grad_(False)}

    def build_heads(self) -> dict[str, nn.Module]:
        return {"gan": self.time_aware_head(self.config.gan_head_channels)} if self.config.gan_weight > 0 else {}

    def is_generator_step(self, step: int) -> bool:
        return True

    def is_fake_step(self, step: int) -> bool:
        return self.config.gan_weight > 0  # no fake score: the step trains the GAN's head, if any

    # ------------------------------------------------------------ draws
    def draw(self, n: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, i, u index, s index)``: grid indices with ``s <= u = i - k < i``."""
        N = len(self.grid)
        k = int(torch.randint(1, self.config.solver_steps + 1, (1,), generator=self.rng))
        i = torch.randint(k, N + 1, (n,), generator=self.rng)
        j = (torch.rand(n, generator=self.rng) * (i - k + 1)).long().clamp(max=i - k)
        if self.config.end_jump_prob > 0:
            j = torch.where(torch.rand(n, generator=self.rng) < self.config.end_jump_prob, torch.zeros_like(j), j)
        return k, i, i - k, j

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.points, dtype=torch.long)[idx].to(self.device)

    # ------------------------------------------------------------ the loss
    @torch.no_grad()
    def solve(self, x: torch.Tensor, i: torch.Tensor, k: int, cond, uncond, guided: float) -> torch.Tensor:
        """``k`` DDIM steps of the teacher under CFG ``guided`` down the grid from ``t_i``."""
        for step in range(k):
            t, t_next = self.labels(i - step), self.labels(i - step - 1)
            x0 = clip_through(self.teacher.guided(x, t, cond, uncond, guided), self.teacher_spec.clip)
            x = jump(self.schedule, x, x0, t, t_next)
        return x

    def G(self, net: CTMDenoiser, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond) -> torch.Tensor:
        """``G(x, t, s)`` of ``net`` (its ``g`` clamped as the teacher's sampler clamps x0, gradient straight through)."""
        return jump(self.schedule, x, clip_through(net.g(x, t, s, cond), self.teacher_spec.clip), t, s)

    def to_end(self, net: CTMDenoiser, x: torch.Tensor, s: torch.Tensor, cond) -> torch.Tensor:
        """``G_sg(x, s, 0)`` with the target's weights frozen (gradient still flows to ``x``); rows already at
        the end (``s = 0``) are ``x`` itself and skip the pass."""
        idx = (s > 0).nonzero().squeeze(1)
        if len(idx) == 0:
            return x
        with frozen(net.backbone):
            moved = self.G(net, x[idx], s[idx], torch.zeros_like(s[idx]), index_cond(cond, idx))
        return x.index_put((idx,), moved.to(x.dtype))

    def generator_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        x0 = batch["real"].float()
        n = x0.shape[0]
        # 1. The condition, dropped for the unconditional student.
        cond = self.conditioning.drop(batch.get("real_cond"), c.uncond_prob, generator=self.rng)
        uncond = self.conditioning.null(n, device=self.device)
        # (a dropped row's CFG is its unconditional x0 whatever the scale: the unguided teacher)
        guided = c.guidance_scale if self.conditioning.guidable else 1.0
        # 2. k, t > u >= s on the grid, and x_t.
        k, i, iu, js = self.draw(n)
        t, u, s = self.labels(i), self.labels(iu), self.labels(js)
        x_t = self.schedule.add_noise(x0, self.randn(tuple(x0.shape)), t)
        # 3. The estimate G_theta(x_t, t, s), carried to the end by G_sg.
        x_est = self.G(self.student, x_t, t, s, cond)
        z_est = self.to_end(self.target, x_est, s, cond)
        with torch.no_grad():
            # 4. The target: the teacher's k steps t -> u, then G_sg to s and to the end.
            x_u = self.solve(x_t, i, k, cond, uncond, guided)
            x_tgt = self.G(self.target, x_u, u, s, cond)
            z_tgt = self.to_end(self.target, x_tgt, s, cond)
        # 5. The distance, in the teacher's feature space.
        if c.distance == "teacher_features":
            tf = torch.full((n,), c.feature_timestep, dtype=torch.long, device=self.device)
            with torch.no_grad():
                f_tgt = teacher_features(self.teacher, z_tgt, tf, cond)
            dist = feature_distance(teacher_features(self.teacher, z_est, tf, cond), f_tgt)
        else:
            dist = (z_est - z_tgt).pow(2).flatten(1).mean(1)
        loss = dist.mean()
        logs = {"loss/ctm": loss.item(), "ctm/solver_steps": float(k)}
        batch["x_gen"] = z_est.detach()
        # 6. DSM on g(x_t', t', t'), t' a grid point (a jump target the student can be given).
        if c.dsm_weight > 0:
            t_n = self.labels(torch.randint(1, len(self.points), (n,), generator=self.rng))
            x_n, _, noise = self.noised(x0, t_n)
            loss_dsm = self.denoising_loss_of(self.student.g(x_n, t_n, t_n, cond), x0, x_n, t_n, noise)
            loss = loss + c.dsm_weight * loss_dsm
            logs["loss/dsm"] = loss_dsm.item()
        # 8. The GAN term on the end points, or on one-step samples from pure noise.
        if c.gan_weight > 0:
            judged = z_est
            if c.gan_on == "one_step":
                top = self.labels(torch.full((n,), len(self.grid), dtype=torch.long))
                judged = self.G(self.student, self.randn(tuple(x0.shape)), top, torch.zeros_like(top), cond)
                batch["x_gen"] = judged.detach()
            batch["gan_cond"] = cond
            loss_adv = self.adversarial_loss(judged, cond, batch)
            loss = loss + c.gan_weight * loss_adv
            logs["loss/adv_g"] = loss_adv.item()
        return loss, logs

    def fake_score_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The GAN head's hinge loss: real samples against what the generator step's term judged (same condition)."""
        return self.discriminator_loss(batch["real"].float(), batch["x_gen"], batch["gan_cond"], batch)

    def after_generator_step(self) -> None:
        """7. The target follows the student (then the export EMA steps, as for every method)."""
        if self.config.target_ema_decay > 0:
            ema_into(self.extras["target"], self.generator.backbone, self.config.target_ema_decay)
        super().after_generator_step()

    # ------------------------------------------------------ export
    def export_timesteps(self) -> list[int]:
        return lcm_timesteps(self.grid, self.config.sampling_steps)

    def export_meta(self) -> dict[str, Any]:
        c = self.config
        return {
            "ctm": {
                "grid": list(self.grid),
                "jump_input": self.jump_input.to_dict(),
                "nu": c.nu,
                "gamma": c.gamma,
                "timesteps_by_steps": {str(k): lcm_timesteps(self.grid, k) for k in (1, 2, 4, 8) if k <= len(self.grid)},
                "sampling": (
                    "g(x, t, s) = the backbone's x0 prediction with s fed through jump_input; G(x, t, s) = a_s g + s_s (x - a_t g) / s_t "
                    "(g at s = 0); nu-guided: g(null) + nu (g(c) - g(null)); gamma-sampling: jump to s~ with "
                    "sigma(s~) = sqrt(1 - gamma^2) sigma(t_next) (sigma = s / a), add noise up to t_next; the last jump goes to s = 0"
                ),
            }
        }

    def sampling_generator(self, net: nn.Module) -> CTMDenoiser:
        return self.ctm_view(net, self.config.nu, self.config.gamma)


__all__ = ["CTMConfig", "CTMTrainer"]
