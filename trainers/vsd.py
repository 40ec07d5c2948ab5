"""VSD / SwiftBrush: one-step text-to-image by variational score distillation
(Nguyen & Tran, 2024, arXiv:2312.05239), with SNOOPI's random-scale guidance PG-SB
(Nguyen et al., 2024, arXiv:2412.02687) and SwiftBrush v2's clamped CLIP loss
(Dao et al., 2024, arXiv:2408.14176).

Algorithm, per iteration (maths in METHODS.md, "VSD / SwiftBrush" and "SNOOPI"):

1. generator step: x = G(z); t ~ U{0.02T .. 0.98T}; x_t = a_t x + s_t e;
   one guidance scale k (fixed, or PG-SB: k ~ U(k_min, k_max) per batch or per sample)
   for both the teacher and the LoRA teacher (the fake score);
   g = s_t^2 (eps_teacher - eps_fake)                                  (VSD eq. 5, s_t^2 weighting)
     = a_t s_t (x0_fake - x0_teacher)    (the same thing in x0 form, free of the 1/s_t blow-up)
   loss = 0.5 * mean((x - sg(x - g))^2)
   (SwiftBrush v2 adds w_clip * max(0, tau - cos(CLIP(D(x)), CLIP(prompt))) with D the VAE
   decoder, the gradient flowing through D into x; w_clip decays linearly to 0 over
   ``clip_decay_steps`` generator steps: ClampedClipLoss below, text-to-image teachers only.)
   (descending moves x toward the teacher's denoised estimate and away from the fake
   score's, the direction of DMD's gradient; METHODS.md writes the difference the other
   way round, which would push the generator away from the teacher.)
2. fake-score step right after (1:1 by default), on sg(x): t ~ U{0 .. T-1}, the condition
   dropped to null with p = 0.1, loss abar_t * ||eps_fake(x_t) - e||^2.

The fake score is LoRA on the teacher by default (adapters off = the teacher, so it starts
equal to the teacher); ``fake_score: copy`` trains a full copy instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from onestep.clip import ClipEncoder, load_clip
from onestep.config import config_field
from onestep.errors import ConfigError
from onestep.schedule import expand_like

from .base import DistillTrainer
from .helpers import inject_gradient
from .config import DistillConfig, check_interval


@dataclass
class VSDConfig(DistillConfig):
    """VSD / SwiftBrush settings (reference values in METHODS.md)."""

    method: str = config_field("training method", "vsd")
    fake_score: str = config_field("fake score as 'lora' adapters on the teacher (SwiftBrush) or a full 'copy'", "lora")
    fake_updates_per_generator: int = config_field("fake-score updates per generator update (SwiftBrush: 1; SNOOPI saw 5:1 destabilise)", 1)
    guidance_range: list[float] | None = config_field(
        "SNOOPI PG-SB: draw the guidance scale uniformly from [k_min, k_max] each step for teacher and fake "
        "score alike (e.g. [0.5, 4.0]); unset: the fixed guidance_scale"
    )
    guidance_per: str = config_field("PG-SB granularity: one scale per 'batch' or one per 'sample'", "batch")
    fake_cond_drop: float = config_field("probability of dropping the condition to null in the fake-score step", 0.1)
    clip_model: str | None = config_field(
        "local CLIPModel folder (config.json, safetensors weights, its CLIP tokenizer) for SwiftBrush v2's clamped "
        "CLIP loss on the decoded generator images against their prompts (text-to-image teachers only)"
    )
    clip_tau: float = config_field("clamp of the CLIP loss max(0, tau - cos)", 0.35)
    clip_weight: float = config_field("weight of the CLIP loss at the first generator step", 0.1)
    clip_decay_steps: int | None = config_field(
        "generator steps over which the CLIP weight decays linearly to 0 (SwiftBrush v2); default: the whole run "
        "(max_steps / fake_updates_per_generator, rounded up); 0: a constant weight"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.guidance_range is not None:
            check_interval("guidance_range", self.guidance_range)
        if self.guidance_per not in ("batch", "sample"):
            raise ConfigError(f"guidance_per must be 'batch' or 'sample' (got {self.guidance_per!r})")
        if self.fake_loss_weighting != "native":
            raise ConfigError("fake_loss_weighting: VSD's LoRA fake score keeps SwiftBrush's abar_t-weighted eps loss; leave it 'native'")
        if not 0 <= self.fake_cond_drop < 1:
            raise ConfigError(f"fake_cond_drop must lie in [0, 1) (got {self.fake_cond_drop})")
        if self.clip_decay_steps is None:
            self.clip_decay_steps = -(-self.max_steps // self.fake_updates_per_generator)
        if self.clip_weight < 0 or self.clip_decay_steps < 0:
            raise ConfigError("clip_weight and clip_decay_steps must be >= 0")


def vsd_gradient(x_t: torch.Tensor, t: torch.Tensor, x0_teacher: torch.Tensor, x0_fake: torch.Tensor, schedule) -> torch.Tensor:
    """``s_t^2 (eps_teacher - eps_fake) = a_t s_t (x0_fake - x0_teacher)`` in float32."""
    a, s = schedule.alpha_sigma(t)
    w = expand_like(a * s, x_t).float()
    return torch.nan_to_num(w * (x0_fake.float() - x0_teacher.float()))


class ClampedClipLoss(nn.Module):
    """SwiftBrush v2's ``max(0, tau - cos(E_img(x), E_txt(prompt)))``, averaged over the batch.

    Images are in ``[-1, 1]`` (the decoded generator samples, with their gradient). They get the
    CLIP image processor's own preprocessing, carried out on tensors so the gradient reaches them
    (:class:`onestep.clip.ClipPreprocessing`: the shorter side resized with the processor's resample,
    centre crop, rescale, the processor's mean and std; OpenAI CLIP's at the model's image size when
    the folder has no ``preprocessor_config.json``). The model, tokenizer and preprocessing are
    :mod:`onestep.clip`'s wrapper, the same the CLIP score (``onestep eval clip``) uses; loaded only
    from a local folder with safetensors weights.

    Args:
        clip: a :class:`onestep.clip.ClipEncoder`, or a ``CLIPModel`` (wrapped with ``tokenizer`` and
            OpenAI's preprocessing at its image size).
        tau: the clamp.
    """

    def __init__(self, clip: ClipEncoder | nn.Module, tau: float = 0.35, tokenizer=None):
        super().__init__()
        self.clip = clip if isinstance(clip, ClipEncoder) else ClipEncoder(clip, tokenizer)
        self.tau = tau

    @property
    def tokenizer(self):
        return self.clip.tokenizer

    @classmethod
    def from_pretrained(cls, path: str, tau: float = 0.35) -> "ClampedClipLoss":
        """From a local CLIPModel folder (:func:`onestep.clip.load_clip`; the tokenizer may be missing)."""
        return cls(load_clip(path, need_tokenizer=False, what="clip_model"), tau)

    def prompt_loss(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The loss of ``images`` against prompt strings, tokenised with the model's own tokenizer."""
        if self.tokenizer is None:
            raise ConfigError("the CLIP model folder has no tokenizer (vocab.json and merges.txt): save its CLIPTokenizer there")
        return self(images, *self.clip.tokenize(prompts))

    def cosine(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.clip.cosine(images, input_ids, attention_mask)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return (self.tau - self.cosine(images, input_ids, attention_mask)).clamp(min=0).mean()


class VSDTrainer(DistillTrainer):
    config_class = VSDConfig
    config: VSDConfig

    def __init__(self, config: VSDConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.clip_loss: ClampedClipLoss | None = None
        if config.clip_model is not None:
            if self.conditioning.kind != "text":
                raise ConfigError(
                    f"clip_model needs a text-to-image teacher; {self.teacher_spec.name} is conditioned on "
                    f"{self.conditioning.kind!r}. Remove clip_model from the config"
                )
            self.clip_loss = ClampedClipLoss.from_pretrained(config.clip_model, config.clip_tau).to(self.device)
            if self.clip_loss.tokenizer is None:
                raise ConfigError(f"clip_model {config.clip_model}: no CLIP tokenizer there (vocab.json and merges.txt)")
            self.wants_prompts = True  # batches carry the prompt strings the CLIP text encoder reads

    def clip_weight(self) -> float:
        """SwiftBrush v2's CLIP weight now: ``clip_weight`` decayed linearly to 0 over ``clip_decay_steps``
        generator steps (constant when that is 0)."""
        c = self.config
        if c.clip_decay_steps == 0:
            return c.clip_weight
        generator_steps = self.state.step // c.fake_updates_per_generator
        return c.clip_weight * max(0.0, 1.0 - generator_steps / c.clip_decay_steps)

    def guidance_scales(self, n: int) -> float | torch.Tensor:
        """The scale shared by teacher and fake score this step: fixed, or PG-SB's random draw."""
        c = self.config
        if c.guidance_range is None:
            return c.guidance_scale
        lo, hi = c.guidance_range
        count = n if c.guidance_per == "sample" else 1
        k = lo + (hi - lo) * torch.rand(count, generator=self.rng)
        return k.to(self.device) if c.guidance_per == "sample" else float(k)

    def generator_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        cond, uncond = batch["cond"], batch["uncond"]
        # 1. x = G(z); noise it at t ~ U{0.02T .. 0.98T}.
        x, x_t, t = self.generate_and_noise(batch, *c.loss_t_range)
        with torch.no_grad():
            # 2. Teacher and LoRA teacher with the same guidance scale (PG-SB: a random one).
            k = self.guidance_scales(x.shape[0])
            x0_teacher = self.teacher.guided(x_t, t, cond, uncond, k)
            x0_fake = self.fake.guided(x_t, t, cond, uncond, k)
            # 3. The s_t^2-weighted eps difference.
            grad = vsd_gradient(x_t, t, x0_teacher, x0_fake, self.schedule)
        loss = inject_gradient(x, grad)
        logs = {"loss/vsd": loss.item(), "vsd/grad_abs": grad.abs().mean().item()}
        w = self.clip_weight() if self.clip_loss is not None else 0.0
        if w > 0:
            # 4. SwiftBrush v2: the decoded image against its prompt, through the frozen VAE and CLIP.
            loss_clip = self.clip_loss.prompt_loss(self.decode(x), batch["prompts"])
            loss = loss + w * loss_clip
            logs.update({"loss/clip": loss_clip.item(), "clip/weight": w})
        if isinstance(k, float):
            logs["vsd/guidance"] = k
        return loss, logs

    def fake_score_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        x = self.detached_sample(batch)
        # The condition dropped to null with p = 0.1, so the LoRA teacher keeps an unconditional branch for CFG.
        cond = self.conditioning.drop(batch["cond"], c.fake_cond_drop, generator=self.rng)
        x_t, t, noise = self.noised(x)
        eps = self.fake.eps(x_t, t, cond)
        a, _ = self.schedule.alpha_sigma(t)
        weight = expand_like(a**2, x_t)  # abar_t
        loss = (weight * (eps.float() - noise.float()) ** 2).mean()
        return loss, {"loss/fake": loss.item()}
