"""BOOT: data-free distillation of a diffusion teacher by bootstrapping (Gu et al., 2023,
arXiv:2306.05544, "BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping").

The student ``g(eps, t)`` is a time-conditioned generator that reads only the initial noise ``eps`` and
returns ``y_t``, the "signal" of the teacher's DDIM trajectory started from ``x_T = eps``:
``x_t = a_t y_t + s_t eps`` (:mod:`onestep.boot`). With ``lambda_t = -log(a_t / s_t)`` the trajectory obeys the
paper's Signal-ODE (eq. 6)::

    dy_t / dt = -lambda'_t (f(x_t, t) - y_t),      x_t = a_t y_t + s_t eps,

``f`` the teacher's x0 prediction (with CFG). One DDIM step of the teacher from ``t`` down to ``s < t``
solves it exactly for a constant ``f`` (eq. 7)::

    y_s = y_t + delta_ts (f(x_t, t) - y_t),       delta_ts = 1 - exp(lambda_s - lambda_t) = 1 - (s_s a_t) / (a_s s_t),

which is ``(x_s - s_s eps) / a_s`` with ``x_s = DDIM(x_t, f, t -> s)``. Per iteration (the paper's Alg. 1
in this project's notation), with no real or generated data, only noise and conditions:

1. ``eps ~ N(0, I)``, a condition (class or prompt) and a pair ``(t, s)`` of adjacent points of the teacher's
   N-point DDIM grid ``T-1 = t_0 > t_1 > .. > t_{N-1} = 0`` (``num_ddim_steps``; the teacher's own DDIM sampler's
   timesteps), uniformly;
2. ``y_t = sg(g(eps, t))`` with the current weights (the paper uses no EMA target), ``x_t = a_t y_t + s_t eps``;
   on the top pair ``x_t = eps`` exactly: the boundary condition (below);
3. the teacher's guided x0 ``f = x0_cfg(x_t, t)`` (clamped to the teacher's clip range, as its DDIM sampler
   does) and the bootstrap target ``y_s* = y_t + delta_ts (f - y_t)``;
4. ``loss = mean_i w_i ||g(eps, s) - sg(y_s*)||^2 / D`` (eq. 8 with ``w = omega_t / delta^2``).

Sampling: ``y`` at the lowest grid time, one call ``g(eps, 0)``; exported with ``boot`` in ``onestep.json``.

Choices where the paper leaves one:

- Parameterisation (the paper initialises the student from the teacher's network and reads its output as the
  signal): the network's raw output is converted by the teacher's prediction type at one fixed label
  ``signal_timestep`` ``M`` for every ``t`` (:class:`~onestep.boot.BOOTDenoiser`), so at ``t = M`` the initial
  student is exactly the teacher's one-step x0 prediction. For VP teachers whose ``sqrt(abar)`` is tiny at
  ``T-1`` (squaredcos: 5e-5) ``M`` must be lower; the digits preset reads it at 600, where the eps errors of the
  network reach the sample ``s / a = 1.4`` times magnified (16 times at 959, whose one-step samples were speckled:
  digits-FID 4.2 against 1.8), the label the quickstart's DMD2 generator reads its pure noise at; SD's 999 is fine.
- Start (``time_init``): initialised from the teacher as it is, the student at low ``t`` is the teacher's eps on
  pure noise read as a signal at ``M``: 16x magnified, a per-pixel error of ~25 on digits (300-sample FID 64 after
  150 iterations). ``constant`` (default) zeroes the weights of the time embedding's first layer and keeps its
  output at ``M``: ``g(eps, t) = f(eps, M)`` for every ``t`` at step 0 (error ~0.04; FID 4.1 after 150 iterations),
  and the dependence on ``t`` is learnt from zero, as LCM's guidance embedding is.
- Boundary condition: the paper adds ``||g(eps, T) - f(eps, T)||^2``. Here the trajectory's top state is known
  exactly (``x_{T-1} = eps``, as the teacher's DDIM sampler starts), so the top pair's target is the teacher's
  DDIM step from pure noise itself (``delta ~ 1``: ``y_{t_1}* ~ f(eps, T-1)``); no student call at ``T-1``.
- Step size: adjacent points of an N-point DDIM grid (the paper bootstraps between consecutive sampled steps
  with a small fixed step); N trades the teacher's ODE error (digits 300-sample FID of the teacher's DDIM:
  2.23 at 10 steps, 1.98 at 16, 1.71 at 50) against the number of hops the boundary must travel.
- Weighting: ``uniform`` (the default; the digits preset takes ``derivative``, 1.83 against 1.92) weighs each pair's error in ``y`` alike, which is the paper's
  ``omega_t / delta^2`` with ``omega_t`` proportional to ``delta^2`` (errors in ``y`` add up along the trajectory);
  ``derivative`` is ``1 / delta^2`` (the finite-difference derivative matched alike at every pair), normalised
  to mean 1 over the grid's pairs.
- The student takes no guidance input: it distils one CFG scale (``guidance_scale``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from onestep.boot import BOOTDenoiser, bootstrap_coefficient
from onestep.config import config_field
from onestep.consistency import ddim_step
from onestep.errors import ConfigError
from onestep.samplers.ddim import ddim_timesteps
from onestep.schedule import expand_like
from onestep.teachers import Teacher

from .base import DistillTrainer
from .config import DistillConfig

LOSS_WEIGHTINGS = ("uniform", "derivative")
TIME_INITS = ("constant", "teacher")


@torch.no_grad()
def constant_time_embedding(backbone: torch.nn.Module, schedule, label: int) -> None:
    """Make the first layer of a diffusers UNet's time embedding output, for every timestep, what it outputs at
    ``label``: weights zeroed, bias set to that output (the gradient to the weights is not zero: the
    dependence on ``t`` is learnt from there)."""
    emb, proj = getattr(backbone, "time_embedding", None), getattr(backbone, "time_proj", None)
    layer = getattr(emb, "linear_1", None)
    if proj is None or not isinstance(layer, torch.nn.Linear):
        raise ConfigError(f"time_init 'constant' needs a diffusers UNet's time embedding; {type(backbone).__name__} has none "
                          "(set time_init: teacher)")
    t = schedule.model_timestep(torch.tensor([label])).to(layer.weight.device)
    h = layer(proj(t).to(layer.weight.dtype))[0]
    layer.weight.zero_()
    layer.bias.copy_(h)


@dataclass
class BOOTConfig(DistillConfig):
    """BOOT settings. ``generator_timesteps`` and ``fake_updates_per_generator`` are not used: the student
    learns every iteration and samples once, at the grid's lowest time (label 0)."""

    FAKE_SCORES = ("none",)

    method: str = config_field("training method", "boot")
    fake_score: str = config_field("BOOT trains no fake score: 'none'", "none")
    num_ddim_steps: int = config_field(
        "N: points of the teacher's DDIM trajectory the student learns (timesteps evenly spaced from T-1 to 0, as "
        "the teacher's DDIM sampler); each iteration bootstraps between adjacent points. More: closer to the "
        "teacher's ODE; fewer: fewer hops for the boundary to travel", 16,
    )
    signal_timestep: int | None = config_field(
        "label M whose (a_M, s_M) convert the network's output into the signal y_t at every t (default T-1); keep "
        "sqrt(abar) there above ~0.05 for eps-predicting teachers (squaredcos: 959)"
    )
    time_init: str = config_field(
        "'constant': the first layer of the student's time embedding starts constant at the teacher's value at "
        "signal_timestep (its weights zeroed), so g(eps, t) starts as the teacher's one-step x0 f(eps, M) at every t "
        "and learns its dependence on t from there (diffusers UNets); 'teacher': the teacher's network as it is", "constant",
    )
    loss_weighting: str = config_field(
        "'uniform' (every pair's error in y alike) or 'derivative' (1 / delta^2: the finite-difference derivative "
        "of y alike, normalised to mean 1)", "uniform",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.fake_loss_weighting != "native":
            raise ConfigError("fake_loss_weighting: BOOT trains no fake score; leave it 'native'")
        if self.regression_warmup_steps:
            raise ConfigError("regression_warmup_steps is a DMD warm start on teacher samples; BOOT is data-free (set 0)")
        if self.num_ddim_steps < 2:
            raise ConfigError(f"num_ddim_steps must be at least 2: a trajectory's top and bottom (got {self.num_ddim_steps})")
        if self.signal_timestep is not None and (isinstance(self.signal_timestep, bool) or self.signal_timestep < 0):
            raise ConfigError(f"signal_timestep must be an integer >= 0, or unset for T-1 (got {self.signal_timestep})")
        if self.time_init not in TIME_INITS:
            raise ConfigError(f"time_init must be one of {TIME_INITS} (got {self.time_init!r})")
        if self.time_init == "constant" and (self.generator_lora_rank or self.init_generator):
            raise ConfigError("time_init 'constant' re-initialises the student's time embedding: not with a LoRA generator "
                              "(its base is the teacher's) or init_generator; set time_init: teacher")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"loss_weighting must be one of {LOSS_WEIGHTINGS} (got {self.loss_weighting!r})")


class BOOTTrainer(DistillTrainer):
    config_class = BOOTConfig
    uses_real_data = False  # data-free: only noise and conditions (make_batch draws no real samples)
    config: BOOTConfig

    def __init__(self, config: BOOTConfig, teacher: Teacher | None = None):
        super().__init__(config, teacher)
        c = self.config
        T = self.schedule.num_train_timesteps
        self.signal_timestep = T - 1 if c.signal_timestep is None else c.signal_timestep
        if self.signal_timestep >= T:
            raise ConfigError(f"signal_timestep must be below {T} for this teacher (got {self.signal_timestep})")
        if c.num_ddim_steps > T:
            raise ConfigError(f"num_ddim_steps must be at most {T} for this teacher (got {c.num_ddim_steps})")
        self.grid = ddim_timesteps(T, c.num_ddim_steps)  # descending: T-1 .. 0
        self.student = self.sampling_generator(self.generator.backbone)  # g(eps, t), sharing the trained weights
        if c.time_init == "constant":
            if self.fsdp:
                raise ConfigError("time_init 'constant' re-initialises the unsharded student; with fsdp set time_init: teacher")
            constant_time_embedding(self.generator.backbone, self.schedule, self.signal_timestep)
            if self.ema is not None:  # the EMA starts from the re-initialised weights
                params = [p for p in self.generator.parameters() if p.requires_grad]
                for shadow, p in zip(self.ema.shadow_params, params):
                    shadow.data.copy_(p.data)
        hi, lo = torch.tensor(self.grid[:-1]), torch.tensor(self.grid[1:])
        self.pair_delta = bootstrap_coefficient(self.schedule, hi, lo)
        w = self.pair_delta.double() ** -2 if c.loss_weighting == "derivative" else torch.ones(len(hi), dtype=torch.float64)
        self.pair_weight = (w / w.mean()).float()

    def sampling_generator(self, net: torch.nn.Module) -> BOOTDenoiser:
        """``g(eps, t)`` of backbone ``net``: its output converted at ``signal_timestep``."""
        return BOOTDenoiser(net, self.schedule, self.generator.prediction_type, self.signal_timestep, self.generator.use_adapters)

    def is_generator_step(self, step: int) -> bool:
        return True

    def is_fake_step(self, step: int) -> bool:
        return False  # no fake score, no heads

    # ------------------------------------------------------------ the loss
    def draw_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices ``i`` of adjacent grid pairs, uniform, with their ``t = t_i`` and ``s = t_{i+1}``."""
        i = torch.randint(0, len(self.grid) - 1, (n,), generator=self.rng)
        grid = torch.tensor(self.grid, dtype=torch.long)
        return i, grid[i].to(self.device), grid[i + 1].to(self.device)

    @torch.no_grad()
    def bootstrap_target(self, eps: torch.Tensor, cond, uncond, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """2-3: ``y_s* = (x_s - s_s eps) / a_s`` with ``x_s`` the teacher's guided DDIM step from ``x_t = a_t sg(g(eps, t))
        + s_t eps`` (``x_t = eps`` where ``t = T-1``); equal to ``y_t + delta_ts (f - y_t)`` (float32)."""
        eps = eps.float()
        top = expand_like(t == self.grid[0], eps)
        y_t = self.student(eps, t, cond).float()
        x_t = torch.where(top, eps, self.schedule.add_noise(y_t, eps, t))
        scale = self.config.guidance_scale if self.conditioning.guidable else 1.0
        f = self.teacher.guided(x_t, t, cond, uncond, scale).float()
        if self.teacher_spec.clip is not None:  # as the teacher's DDIM sampler clamps its x0
            f = f.clamp(-self.teacher_spec.clip, self.teacher_spec.clip)
        x_s = ddim_step(self.schedule, x_t, f, t, s)
        a_s, s_s = (expand_like(v, eps) for v in self.schedule.alpha_sigma(s))
        return (x_s - s_s * eps) / a_s

    def generator_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        eps, cond = batch["noise"], batch["cond"]
        # 1. Pairs of adjacent grid points.
        i, t, s = self.draw_pairs(eps.shape[0])
        # 2-3. The bootstrap target from the current student and one teacher DDIM step.
        target = self.bootstrap_target(eps, cond, batch.get("uncond"), t, s)
        # 4. Regress the student at s onto it.
        y_s = self.student(eps, s, cond)
        err = (y_s.float() - target).pow(2).flatten(1).mean(1)
        loss = (self.pair_weight.to(err.device)[i.to(err.device)] * err).mean()
        return loss, {"loss/boot": loss.item(), "boot/err": err.mean().item()}

    def fake_score_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise RuntimeError("BOOT trains no fake score")  # never called: is_fake_step is False

    # ------------------------------------------------------ export
    def export_timesteps(self) -> list[int]:
        """``[0]``: the student's one call, ``y`` at the grid's lowest time."""
        return [self.grid[-1]]

    def export_meta(self) -> dict[str, Any]:
        M = self.signal_timestep
        return {
            "boot": {"signal_timestep": M, "grid": list(self.grid), "guidance_scale": self.config.guidance_scale},
            "sampling": f"x = N(0, I); out = generator(x, t) at t = timesteps[0]; the sample is out converted by prediction_type "
            f"at timestep {M} (boot.signal_timestep), not at t: for epsilon (x - sqrt(1 - abar[{M}]) out) / sqrt(abar[{M}]). "
            "One step only",
        }


__all__ = ["BOOTConfig", "BOOTTrainer"]
