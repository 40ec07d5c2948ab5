"""Train the built-in ``digits`` teacher reproducibly.

A class-conditional diffusers ``UNet2DModel`` (label 10 is the null class used by
guidance) trained with the plain eps-MSE objective on scikit-learn's 8x8 digits
upsampled to 16x16, under a ``squaredcos_cap_v2`` VP schedule. The EMA weights are
saved as a diffusers pipeline folder (``unet/``, ``scheduler/``, ``model_index.json``)
plus ``onestep_teacher.json`` with what onestep needs to know (conditioning,
default guidance).

    python -m onestep.teachers.train_digits --out onestep/assets/digits-teacher

The shipped weights were made with the defaults below (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    num_class_embeds=11,
    norm_num_groups=8,
    attention_head_dim=32,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
)
TEACHER_META = dict(
    format_version=1,
    conditioning=dict(kind="class", num_classes=10, null_class=10),
    guidance_scale=2.0,
    clip_sample=1.0,
    data="digits",
)


def fit_eps_unet(unet, schedule, draw, steps: int, lr: float, ema_decay: float, gen: torch.Generator, desc: str) -> None:
    """Train ``unet`` with the eps-MSE objective for ``steps`` AdamW steps (warm-up, then cosine to 5 %),
    then load its EMA weights into it. ``draw(gen)`` gives a batch ``(x0, cond)``: ``cond`` as
    :func:`onestep.denoiser.call_backbone` takes it (class labels, or ``{"image": y}`` concatenated to
    the input). Each step draws the batch, then the noise, then the timesteps, all from ``gen``."""
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from onestep.denoiser import call_backbone

    ema = EMAModel(unet.parameters(), decay=ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    bar = tqdm(range(steps), desc=desc, mininterval=5)
    for step in bar:
        x0, cond = draw(gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = schedule.sample_t(x0.shape[0], generator=gen)
        pred = call_backbone(unet, schedule.add_noise(x0, noise, t), t, cond)
        loss = (pred - noise).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(unet.parameters())


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, ema_decay: float, p_uncond: float) -> None:
    from diffusers import UNet2DModel

    from onestep.digits import digits_dataset
    from onestep.schedule import NoiseSchedule
    from onestep.teachers import save_unet_teacher

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = digits_dataset()
    schedule = NoiseSchedule.from_scheduler_config(SCHEDULER_CONFIG)
    unet = UNet2DModel(**UNET_CONFIG)

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        y = y_all[idx].clone()
        y[torch.rand(batch_size, generator=gen) < p_uncond] = 10  # the null class, for guidance
        return x_all[idx], y

    start = time.time()
    fit_eps_unet(unet, schedule, draw, steps, lr, ema_decay, gen, "digits teacher")
    save_unet_teacher(out, unet, SCHEDULER_CONFIG, TEACHER_META)
    print(f"trained {steps} steps in {time.time() - start:.0f}s -> {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("onestep/assets/digits-teacher"), help="output folder")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1, help="probability of the null class (for guidance)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train(a.out, a.steps, a.batch_size, a.lr, a.seed, a.ema_decay, a.p_uncond)


if __name__ == "__main__":
    main()
