"""Train the built-in ``sounds`` teacher reproducibly.

A class-conditional diffusers ``UNet2DModel`` (label 6 is the null class used by guidance) trained with
the plain eps-MSE objective (:func:`onestep.teachers.train_digits.fit_eps_unet`, as the ``digits`` teacher)
on the log-mel spectrograms of the ``"train"`` split of :func:`onestep.audio.sounds_dataset` (2400 synthetic
sounds, 400 a class), under a ``squaredcos_cap_v2`` VP schedule. The EMA weights are saved as a diffusers
pipeline folder plus ``onestep_teacher.json`` (class conditioning, default guidance, the audio settings).

    OMP_NUM_THREADS=1 python -m onestep.teachers.train_sounds --out onestep/assets/sounds-teacher

The shipped weights were made with the defaults below (README, "Audio").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, ema_decay: float, p_uncond: float) -> None:
    from diffusers import UNet2DModel

    from onestep.audio import NUM_CLASSES, sounds_dataset
    from onestep.schedule import NoiseSchedule
    from onestep.teachers import save_unet_teacher
    from onestep.teachers.sounds import SCHEDULER_CONFIG, TEACHER_META, UNET_CONFIG
    from onestep.teachers.train_digits import fit_eps_unet

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = sounds_dataset("train")
    schedule = NoiseSchedule.from_scheduler_config(SCHEDULER_CONFIG)
    unet = UNet2DModel(**UNET_CONFIG)

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        y = y_all[idx].clone()
        y[torch.rand(batch_size, generator=gen) < p_uncond] = NUM_CLASSES  # the null class, for guidance
        return x_all[idx], y

    start = time.time()
    fit_eps_unet(unet, schedule, draw, steps, lr, ema_decay, gen, "sounds teacher")
    save_unet_teacher(out, unet, SCHEDULER_CONFIG, TEACHER_META)
    print(f"trained {steps} steps in {time.time() - start:.0f}s -> {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("onestep/assets/sounds-teacher"), help="output folder")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--p-uncond", type=float, default=0.1, help="probability of the null class (for guidance)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    train(a.out, a.steps, a.batch_size, a.lr, a.seed, a.ema_decay, a.p_uncond)


if __name__ == "__main__":
    main()
