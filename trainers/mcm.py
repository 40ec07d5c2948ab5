"""MCM: Motion Consistency Model (Zhai et al., 2024, arXiv:2406.06890) for video teachers.

A consistency student (:mod:`.consistency`, LCM-style) of a video teacher (a diffusers
``UNet3DConditionModel``, samples ``(B, C, F, H, W)``), whose objective is split into motion and
appearance (MCM sec. 3.2-3.3):

1. draw real clips ``x0`` (with their class), an adjacent grid pair ``t_lo < t_hi`` and noise;
2. mixed trajectory distillation (MCM sec. 3.4): with probability ``mix_prob`` a sample's trajectory
   starts from a clip the student generates in one step from pure noise (no gradient) instead of the
   real clip; ``x_hi = a start + s e``;
3. the teacher's (guided) DDIM step ``x_hi -> x_lo`` and the EMA target's ``f`` there (as LCM);
4. disentangled motion distillation (MCM eq. 5): the consistency distance on the motion representation,
   ``d(m(f_student(x_hi)), sg(m(f_target(x_lo))))`` with ``m(x) = x[:, :, 1:] - x[:, :, :-1]`` (frame
   differences: blind to anything the frames share, e.g. a per-clip constant image);
   ``clip_consistency_weight`` adds the plain consistency distance on the whole clip (0: MCM);
5. appearance (MCM eq. 6): ``frame_gan_weight * softplus(-D(frame))`` on every frame of the student's
   x0 prediction, ``D`` a frame discriminator (:class:`FrameDiscriminator`, class-projected) trained
   against real *images* (``real_frames: stills``, single frames with no motion: appearance from image
   data alone) or the frames of the real clips (``clips``);
6. update the student, then the target (EMA, ``target_ema_decay``).

Sampling, the EMA target, the grid and the export are the consistency trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onestep.conditioning import Cond, index_cond
from onestep.config import config_field
from onestep.consistency import consistency_distance
from onestep.denoiser import frozen
from onestep.errors import ConfigError
from onestep.video import frame_differences, frames_of

from .consistency import ConsistencyTrainer
from .consistency_config import ConsistencyConfig

REAL_FRAMES = ("auto", "stills", "clips")


@dataclass
class MCMConfig(ConsistencyConfig):
    """MCM settings: the consistency trainer's, plus the motion / appearance split and mixed trajectories."""

    method: str = config_field("training method", "mcm")
    motion_weight: float = config_field("weight of the consistency distance on frame differences (MCM's motion loss)", 1.0)
    clip_consistency_weight: float = config_field("weight of the plain consistency distance on whole clips (0: MCM's motion-only objective)", 0.0)
    frame_gan_weight: float = config_field("weight of the frame discriminator's term softplus(-D(frame)) on the student's frames (0: none)", 0.1)
    frame_disc_width: int = config_field("channels of the frame discriminator's first layer", 32)
    real_frames: str = config_field(
        "real images the frame discriminator sees: 'stills' (single frames of the digit-clips toy, no motion: image data "
        "alone), 'clips' (the frames of the real clips) or 'auto' (stills for digit-clips, else clips)",
        "auto",
    )
    mix_prob: float = config_field("mixed trajectory distillation: probability that a trajectory starts from a one-step student clip", 0.5)

    def __post_init__(self):
        super().__post_init__()
        if self.gan_weight:
            raise ConfigError("gan_weight is SCott's bottleneck GAN; MCM's appearance term is frame_gan_weight (set gan_weight: 0)")
        if min(self.motion_weight, self.clip_consistency_weight, self.frame_gan_weight) < 0:
            raise ConfigError("motion_weight, clip_consistency_weight and frame_gan_weight must be >= 0")
        if self.motion_weight + self.clip_consistency_weight <= 0:
            raise ConfigError("MCM needs a consistency term: motion_weight or clip_consistency_weight > 0")
        if not 0 <= self.mix_prob <= 1:
            raise ConfigError(f"mix_prob must lie in [0, 1] (got {self.mix_prob})")
        if self.real_frames not in REAL_FRAMES:
            raise ConfigError(f"real_frames must be one of {REAL_FRAMES} (got {self.real_frames!r})")
        if self.frame_disc_width < 1:
            raise ConfigError("frame_disc_width must be at least 1")
        if self.teacher_free:
            raise ConfigError("MCM distils a video teacher: teacher_free (iCT) does not apply")


class FrameDiscriminator(nn.Module):
    """A small conv discriminator on single frames ``(N, C, H, W)``, with a class projection
    (Miyato & Koyama, 2018): ``logit = w . h + <embed(y), h>`` (no projection when ``num_labels`` is 0)."""

    def __init__(self, channels: int, width: int = 32, num_labels: int = 0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out = nn.Linear(2 * width, 1)
        self.embed = nn.Embedding(num_labels, 2 * width) if num_labels else None

    def forward(self, frames: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.net(frames.float())
        logit = self.out(h).squeeze(-1)
        if self.embed is not None and labels is not None:
            logit = logit + (self.embed(labels) * h).sum(-1)
        return logit


class MCMTrainer(ConsistencyTrainer):
    config_class = MCMConfig
    config: MCMConfig

    def __init__(self, config: MCMConfig, teacher=None):
        super().__init__(config, teacher)
        if len(self.teacher_spec.sample_shape) != 4:
            raise ConfigError(f"MCM distils video teachers (samples (C, F, H, W)); {self.teacher_spec.name} has samples {self.teacher_spec.sample_shape}")
        self._stills = None
        c = self.config
        if c.frame_gan_weight > 0:
            toy = self.teacher_spec.meta.get("data") == "digit-clips"
            if c.real_frames == "stills" and not toy:
                raise ConfigError("real_frames: stills are the digit-clips toy's images; use 'clips' for this teacher")
            if c.real_frames == "stills" or (c.real_frames == "auto" and toy):
                from onestep.video import still_frames

                self._stills = still_frames("train", n=3000, seed=c.seed)

    # ------------------------------------------------------------ heads
    def build_heads(self) -> dict[str, nn.Module]:
        c = self.config
        if c.frame_gan_weight <= 0:
            return {}
        labels = self.conditioning.num_classes + 1 if self.conditioning.guidable else 0
        return {"frames": FrameDiscriminator(self.teacher_spec.sample_shape[0], c.frame_disc_width, labels)}

    def labels_of(self, cond: Cond) -> torch.Tensor | None:
        """Class labels of a condition (class tokens or class labels), None for other conditions."""
        if hasattr(self.conditioning, "labels_of") and isinstance(cond, dict):
            return self.conditioning.labels_of(cond)
        return cond if isinstance(cond, torch.Tensor) and cond.dtype == torch.long else None

    def discriminate_frames(self, clips: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Logits of every frame of ``clips`` (``(B * F,)``), each with its clip's class."""
        labels = self.labels_of(cond)
        if labels is not None:
            labels = labels.repeat_interleave(clips.shape[2])
        return self.heads["frames"](frames_of(clips), labels)

    def real_images(self, n: int, like: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` real frames and their labels: stills (image data alone) or the real clips' frames."""
        if self._stills is not None:
            x, y = self._stills
            idx = torch.randint(0, len(x), (n,), generator=self.rng)
            return x[idx].to(self.device), y[idx].to(self.device)
        labels = self.labels_of(cond)
        return frames_of(like), None if labels is None else labels.repeat_interleave(like.shape[2])

    # ------------------------------------------------------------ trajectories
    @torch.no_grad()
    def trajectory_start(self, x0: torch.Tensor, cond: Cond, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed trajectory distillation: each sample's clean start is the real clip, or with probability
        ``mix_prob`` the student's one-step clip from pure noise (its x0 at the grid's top). Returns the
        starts and the mask of student starts."""
        c = self.config
        mix = torch.rand(x0.shape[0], generator=self.rng) < c.mix_prob
        if not mix.any():
            return x0, mix
        idx = mix.nonzero().squeeze(1).to(self.device)
        z = self.randn((len(idx), *x0.shape[1:]))
        top = torch.full((len(idx),), max(self.grid), dtype=torch.long, device=self.device)
        fake = self.student.x0(z, self.student_label(top), index_cond(cond, idx), scale[idx])
        if self.teacher_spec.clip is not None:
            fake = fake.clamp(-self.teacher_spec.clip, self.teacher_spec.clip)
        out = x0.clone()
        out[idx] = fake.to(out.dtype)
        return out, mix

    # ------------------------------------------------------------ losses
    def is_fake_step(self, step: int) -> bool:
        """The frame discriminator trains beside the student (after any teacher fit)."""
        return self.config.frame_gan_weight > 0 and step >= self.config.teacher_fit_steps

    def generator_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        if self.state.step < c.teacher_fit_steps:
            return self.teacher_fit_loss(batch)
        # 1. Guidance scale, an adjacent grid pair t_lo < t_hi, noise (the consistency trainer's draws).
        d = self.draw_update(batch)
        cond = d.cond
        # 2. Mixed trajectories: noised real clips and noised one-step student clips; 3. the teacher's ODE step, the target.
        start, mixed = self.trajectory_start(d.x0, cond, d.scale)
        pred, pred_x0, target = self.consistency_pair(d, start)
        # 4. Disentangled motion distillation: the consistency distance on frame differences (MCM eq. 5).
        loss_motion = consistency_distance(frame_differences(pred), frame_differences(target), c.loss, self.huber_c).mean()
        loss = c.motion_weight * loss_motion
        logs = {"loss/motion": loss_motion.item(), "mix/student_starts": mixed.float().mean().item()}
        if c.clip_consistency_weight > 0:
            loss_clip = consistency_distance(pred, target, c.loss, self.huber_c).mean()
            loss = loss + c.clip_consistency_weight * loss_clip
            logs["loss/consistency"] = loss_clip.item()
        batch["x_gen"] = pred_x0.detach()
        if c.frame_gan_weight > 0:
            # 5. Appearance: the frame discriminator on every frame of the student's x0 (MCM eq. 6).
            with frozen(self.heads):
                loss_gan = F.softplus(-self.discriminate_frames(pred_x0, cond)).mean()
            loss = loss + c.frame_gan_weight * loss_gan
            logs["loss/gan_g"] = loss_gan.item()
        return loss, logs

    def fake_score_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The frame discriminator's loss: real images against the student's frames."""
        cond = batch.get("real_cond")
        fake = batch["x_gen"]
        d_fake = self.discriminate_frames(fake, cond)
        real, labels = self.real_images(d_fake.shape[0], batch["real"], cond)
        d_real = self.heads["frames"](real, labels)
        loss = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
        return loss, {"loss/gan_d": loss.item()}

    def export_meta(self) -> dict[str, Any]:
        c = self.config
        meta = super().export_meta()
        meta["mcm"] = {"motion": "frame_differences", "mix_prob": c.mix_prob, "frame_gan_weight": c.frame_gan_weight, "real_frames": c.real_frames}
        meta["video"] = {"frames": int(self.teacher_spec.sample_shape[1])}
        return meta


__all__ = ["FrameDiscriminator", "MCMConfig", "MCMTrainer"]
