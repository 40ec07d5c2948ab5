"""The settings of consistency distillation (:mod:`onestep.trainers.consistency`): LCM, with SCott,
MLCM and iCT as options. Each mode sets its own defaults where the config leaves them unset."""

from __future__ import annotations

from dataclasses import dataclass

from onestep.config import config_field
from onestep.consistency import LOSSES
from onestep.errors import ConfigError

from .config import DistillConfig, check_interval


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


__all__ = ["ConsistencyConfig"]
