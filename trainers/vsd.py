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

from onestep.errors import ConfigError
from onestep.schedule import expand_like

from .base import DistillConfig, DistillTrainer, _help, inject_gradient


@dataclass
class VSDConfig(DistillConfig):
    """VSD / SwiftBrush settings (reference values in METHODS.md)."""

    method: str = _help("training method", "vsd")
    fake_score: str = _help("fake score as 'lora' adapters on the teacher (SwiftBrush) or a full 'copy'", "lora")
    fake_updates_per_generator: int = _help("fake-score updates per generator update (SwiftBrush: 1; SNOOPI saw 5:1 destabilise)", 1)
    vsd_t_min: float = _help("lowest timestep of the VSD loss, as a fraction of T", 0.02)
    vsd_t_max: float = _help("highest timestep of the VSD loss, as a fraction of T", 0.98)
    guidance_range: list[float] | None = _help(
        "SNOOPI PG-SB: draw the guidance scale uniformly from [k_min, k_max] each step for teacher and fake "
        "score alike (e.g. [0.5, 4.0]); unset: the fixed guidance_scale"
    )
    guidance_per: str = _help("PG-SB granularity: one scale per 'batch' or one per 'sample'", "batch")
    fake_cond_drop: float = _help("probability of dropping the condition to null in the fake-score step", 0.1)
    clip_model: str | None = _help(
        "local CLIPModel folder (config.json, safetensors weights, its CLIP tokenizer) for SwiftBrush v2's clamped "
        "CLIP loss on the decoded generator images against their prompts (text-to-image teachers only)"
    )
    clip_tau: float = _help("clamp of the CLIP loss max(0, tau - cos)", 0.35)
    clip_weight: float = _help("weight of the CLIP loss at the first generator step", 0.1)
    clip_decay_steps: int = _help("generator steps over which the CLIP weight decays linearly to 0 (0: constant)", 0)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.vsd_t_min < self.vsd_t_max <= 1:
            raise ConfigError(f"need 0 <= vsd_t_min < vsd_t_max <= 1 (got {self.vsd_t_min}, {self.vsd_t_max})")
        if self.guidance_range is not None:
            r = self.guidance_range
            if len(r) != 2 or not 0 <= r[0] <= r[1]:
                raise ConfigError(f"guidance_range must be [k_min, k_max] with 0 <= k_min <= k_max (got {r})")
        if self.guidance_per not in ("batch", "sample"):
            raise ConfigError(f"guidance_per must be 'batch' or 'sample' (got {self.guidance_per!r})")
        if not 0 <= self.fake_cond_drop < 1:
            raise ConfigError(f"fake_cond_drop must lie in [0, 1) (got {self.fake_cond_drop})")
        if self.clip_weight < 0 or self.clip_decay_steps < 0:
            raise ConfigError("clip_weight and clip_decay_steps must be >= 0")


def vsd_gradient(x_t: torch.Tensor, t: torch.Tensor, x0_teacher: torch.Tensor, x0_fake: torch.Tensor, schedule) -> torch.Tensor:
    """``s_t^2 (eps_teacher - eps_fake) = a_t s_t (x0_fake - x0_teacher)`` in float32."""
    a, s = schedule.alpha_sigma(t)
    w = expand_like(a * s, x_t).float()
    return torch.nan_to_num(w * (x0_fake.float() - x0_teacher.float()))


class ClampedClipLoss(nn.Module):
    """SwiftBrush v2's ``max(0, tau - cos(E_img(x), E_txt(prompt)))``, averaged over the batch.

    Images are in ``[-1, 1]``; they are resized to the CLIP model's input size and
    normalised with its mean and std, differentiably. Loaded only from a local folder
    with safetensors weights.
    """

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, model: nn.Module, tau: float = 0.35, tokenizer=None):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tau = tau
        self.tokenizer = tokenizer
        size = model.config.vision_config.image_size
        self.size = (size, size)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str, tau: float = 0.35) -> "ClampedClipLoss":
        from pathlib import Path

        from transformers import CLIPModel

        from transformers import CLIPTokenizer

        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"clip_model {path!r} is not a local CLIPModel folder (no config.json)")
        tokenizer = None
        if (Path(path) / "vocab.json").is_file() or (Path(path) / "tokenizer.json").is_file():
            tokenizer = CLIPTokenizer.from_pretrained(path)
        return cls(CLIPModel.from_pretrained(path, use_safetensors=True), tau, tokenizer)

    def prompt_loss(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The loss of ``images`` against prompt strings, tokenised with the model's own tokenizer."""
        if self.tokenizer is None:
            raise ConfigError("the CLIP model folder has no tokenizer (vocab.json and merges.txt): save its CLIPTokenizer there")
        limit = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tok = self.tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        return self(images, tok.input_ids.to(images.device), tok.attention_mask.to(images.device))

    def cosine(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = (images.float().clamp(-1, 1) + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = torch.nn.functional.interpolate(x, size=self.size, mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        img = _as_tensor(self.model.get_image_features(pixel_values=x))
        txt = _as_tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        return torch.nn.functional.cosine_similarity(img, txt, dim=-1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return (self.tau - self.cosine(images, input_ids, attention_mask)).clamp(min=0).mean()


def _as_tensor(out) -> torch.Tensor:
    """transformers returns a tensor or, in newer versions, an output object with pooled embeddings."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        v = getattr(out, name, None)
        if v is not None:
            return v
    raise TypeError(f"unexpected CLIP output {type(out).__name__}")


class VSDTrainer(DistillTrainer):
    method_name = "vsd"
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
        x, x_t, t = self.generate_and_noise(batch, c.vsd_t_min, c.vsd_t_max)
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
