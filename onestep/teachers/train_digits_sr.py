"""Train the built-in ``digits-sr`` super-resolution teacher reproducibly.

A diffusers ``UNet2DModel`` with ``in_channels = 2`` (the noisy 16x16 digit and its condition: the
4x4 low-res digit upsampled back to 16x16 with bicubic interpolation) trained with the plain eps-MSE
objective on the first 1500 of scikit-learn's digits (upsampled to 16x16 as :mod:`onestep.digits`
does) under a ``squaredcos_cap_v2`` VP schedule. The EMA weights are saved as a diffusers pipeline
folder (``unet/``, ``scheduler/``, ``model_index.json``) plus ``onestep_teacher.json`` (image
conditioning, the data it was trained on). The last 297 digits are held out for evaluation.

    python -m onestep.teachers.train_digits_sr --out onestep/assets/digits-sr-teacher

The shipped weights were made with the defaults below (see benchmarks/sr.py).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, ema_decay: float) -> None:
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from onestep.schedule import NoiseSchedule
    from onestep.teachers import save_unet_teacher
    from onestep.teachers.sr import SCHEDULER_CONFIG, TEACHER_META, UNET_CONFIG, digits_sr_conditioning

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cond, hr = digits_sr_conditioning("train")
    lowres = cond.images
    schedule = NoiseSchedule.from_scheduler_config(SCHEDULER_CONFIG)
    unet = UNet2DModel(**UNET_CONFIG)
    ema = EMAModel(unet.parameters(), decay=ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = time.time()
    bar = tqdm(range(steps), desc="digits-sr teacher", mininterval=5)
    for step in bar:
        idx = torch.randint(0, len(hr), (batch_size,), generator=gen)
        x0, y = hr[idx], lowres[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = schedule.sample_t(batch_size, generator=gen)
        pred = unet(torch.cat([schedule.add_noise(x0, noise, t), y], dim=1), t).sample
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
    save_unet_teacher(out, unet, SCHEDULER_CONFIG, TEACHER_META)
    print(f"trained {steps} steps in {time.time() - start:.0f}s -> {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("onestep/assets/digits-sr-teacher"), help="output folder")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    train(a.out, a.steps, a.batch_size, a.lr, a.seed, a.ema_decay)


if __name__ == "__main__":
    main()
