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
import time
from pathlib import Path

import torch


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, ema_decay: float) -> None:
    from diffusers import UNet2DModel

    from onestep.conditioning import CONCAT_KEY
    from onestep.schedule import NoiseSchedule
    from onestep.teachers import save_unet_teacher
    from onestep.teachers.sr import SCHEDULER_CONFIG, TEACHER_META, UNET_CONFIG, digits_sr_conditioning
    from onestep.teachers.train_digits import fit_eps_unet

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cond, hr = digits_sr_conditioning("train")
    lowres = cond.images
    schedule = NoiseSchedule.from_scheduler_config(SCHEDULER_CONFIG)
    unet = UNet2DModel(**UNET_CONFIG)

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = torch.randint(0, len(hr), (batch_size,), generator=gen)
        return hr[idx], {CONCAT_KEY: lowres[idx]}

    start = time.time()
    fit_eps_unet(unet, schedule, draw, steps, lr, ema_decay, gen, "digits-sr teacher")
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
