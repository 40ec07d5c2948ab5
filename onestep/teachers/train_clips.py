"""Train the built-in ``digit-clips`` video teacher reproducibly.

A diffusers ``UNet3DConditionModel`` (:data:`onestep.teachers.clips.UNET_CONFIG`) trained with the plain
eps-MSE objective on the ``"train"`` clips of :mod:`onestep.video` (a moving 8x8 digit in 16x16 frames,
4 frames) under a ``squaredcos_cap_v2`` VP schedule, the class as a one-hot token, 10 % of the labels
dropped to the null class for guidance. The EMA weights are saved as a diffusers pipeline folder plus
``onestep_teacher.json``.

    OMP_NUM_THREADS=1 python -m onestep.teachers.train_clips --out onestep/assets/clips-teacher
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, ema_decay: float, p_uncond: float) -> None:
    from diffusers import UNet3DConditionModel

    from onestep.conditioning import ClassTokenConditioning
    from onestep.schedule import NoiseSchedule
    from onestep.teachers import save_unet_teacher
    from onestep.teachers.clips import SCHEDULER_CONFIG, TEACHER_META, UNET_CONFIG
    from onestep.teachers.train_digits import fit_eps_unet
    from onestep.video import NUM_CLASSES, clips_dataset

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = clips_dataset("train", n=6000, seed=seed)  # several clips per digit: other starts and velocities
    cond = ClassTokenConditioning(num_classes=NUM_CLASSES, null_class=NUM_CLASSES)
    schedule = NoiseSchedule.from_scheduler_config(SCHEDULER_CONFIG)
    unet = UNet3DConditionModel(**UNET_CONFIG)

    def draw(gen: torch.Generator):
        idx = torch.randint(0, len(data["clips"]), (batch_size,), generator=gen)
        y = data["labels"][idx].clone()
        y[torch.rand(batch_size, generator=gen) < p_uncond] = NUM_CLASSES
        return data["clips"][idx], cond.tokens(y)

    start = time.time()
    fit_eps_unet(unet, schedule, draw, steps, lr, ema_decay, gen, "digit-clips teacher")
    save_unet_teacher(out, unet, SCHEDULER_CONFIG, TEACHER_META)
    print(f"trained {steps} steps in {time.time() - start:.0f}s -> {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("onestep/assets/clips-teacher"), help="output folder")
    p.add_argument("--steps", type=int, default=3600, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    train(a.out, a.steps, a.batch_size, a.lr, a.seed, a.ema_decay, a.p_uncond)


if __name__ == "__main__":
    main()
