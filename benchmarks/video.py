"""Video benchmark: the ``digit-clips`` teacher (DDIM) against its MCM student at 1 and 4 steps.

Trains the student from ``--config`` (``configs/clips_mcm.yaml``) unless ``--generator`` names a folder saved by an
earlier run (the generator's ``save_pretrained`` folder, safetensors; the config rebuilds the sampling view). Then,
for ``--num`` seeds (sample ``i``: seed ``seed + i``, class ``i % 10``, the same for every row), scores:

- frame accuracy: the share of frames whose digit the digits classifier reads as the asked class
  (:func:`onestep.video.frame_classes`);
- motion: each clip's velocity (least-squares slope of the intensity centroid, pixels per frame) and the residual
  of that line (0: constant motion); ``|v - v_teacher|``: the distance to the teacher's (DDIM 50) velocity for the
  same seed; ``|v - grid|``: the distance to the nearest velocity the toy data uses; mean speed;
- seconds for the whole row (one thread).

Real test clips are scored as a reference row. Writes ``table.md``, ``results.json`` and ``frames.png`` (one clip a
row, frames left to right: teacher 50 | student 1 | student 4) and ``clips.gif`` (the same clips moving) to ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/video.py --out benchmarks/video-out
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


def motion_scores(x: torch.Tensor, labels: torch.Tensor, ref_velocity: torch.Tensor | None) -> dict[str, float]:
    from onestep.video import VELOCITIES, clip_velocity, frame_classes

    vel, residual = clip_velocity(x)
    grid = torch.tensor(VELOCITIES, dtype=torch.float32)
    out = {
        "frame_accuracy": (frame_classes(x) == labels[:, None]).float().mean().item(),
        "velocity_residual": residual.mean().item(),
        "velocity_to_grid": torch.cdist(vel, grid).min(1).values.mean().item(),
        "speed": vel.norm(dim=1).mean().item(),
    }
    if ref_velocity is not None:
        out["velocity_to_teacher"] = (vel - ref_velocity).norm(dim=1).mean().item()
    return out, vel


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/clips_mcm.yaml", help="the MCM config (trained here unless --generator)")
    p.add_argument("--generator", type=Path, default=None, help="a saved student generator folder (skips training)")
    p.add_argument("--num", type=int, default=100, help="clips per row")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("benchmarks/video-out"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    from diffusers import UNet3DConditionModel

    from onestep.consistency import lcm_timesteps
    from onestep.samplers.student import sample_student_from_seeds, teacher_sample_from_seeds
    from onestep.trainers import load_config, make_trainer
    from onestep.video import clips_dataset, frames_of
    from onestep.viz import save_clip_gifs, save_image_grid

    a.out.mkdir(parents=True, exist_ok=True)
    config = load_config(a.config, {"output_dir": str(a.out / "run"), "overwrite": True} if a.generator is None else {"output_dir": str(a.out / "run-view")})
    trainer = make_trainer(config)
    train_seconds = None
    if a.generator is None:
        t0 = time.time()
        trainer.train()
        train_seconds = time.time() - t0
        net = trainer.generator_on_main()
        net.save_pretrained(a.out / "generator", safe_serialization=True)
    else:
        net = UNet3DConditionModel.from_pretrained(a.generator, use_safetensors=True)
    student = trainer.sampling_generator(net.eval())
    teacher = trainer.teacher_spec
    tden = teacher.denoiser()

    n = a.num
    seeds = list(range(a.seed, a.seed + n))
    labels = [i % 10 for i in range(n)]
    lab = torch.tensor(labels)
    rows, samples = {}, {}
    t0 = time.time()
    x = teacher_sample_from_seeds(tden, teacher, seeds, labels, num_steps=a.teacher_steps, guidance_scale=config.guidance_scale, batch_size=50)
    rows[f"teacher DDIM {a.teacher_steps}"], v_teacher = motion_scores(x, lab, None)
    rows[f"teacher DDIM {a.teacher_steps}"]["seconds"] = time.time() - t0
    rows[f"teacher DDIM {a.teacher_steps}"]["velocity_to_teacher"] = 0.0
    samples["teacher"] = x
    t0 = time.time()
    x = teacher_sample_from_seeds(tden, teacher, seeds, labels, num_steps=4, guidance_scale=config.guidance_scale, batch_size=50)
    rows["teacher DDIM 4"], _ = motion_scores(x, lab, v_teacher)
    rows["teacher DDIM 4"]["seconds"] = time.time() - t0
    for k in (1, 4):
        ts = lcm_timesteps(trainer.grid, k, config.first_step_timestep)
        t0 = time.time()
        x, _ = sample_student_from_seeds(student, teacher, ts, seeds, labels, batch_size=50)
        rows[f"MCM student {k} step{'s' if k > 1 else ''}"], _ = motion_scores(x, lab, v_teacher)
        rows[f"MCM student {k} step{'s' if k > 1 else ''}"]["seconds"] = time.time() - t0
        samples[k] = x
    real = clips_dataset("test", n=n, seed=a.seed)
    rows["real test clips"], _ = motion_scores(real["clips"], real["labels"], None)

    m = min(a.examples, n)
    pic = torch.cat([torch.cat([frames_of(samples[key][i : i + 1]) for key in ("teacher", 1, 4)]) for i in range(m)])
    frames = samples["teacher"].shape[2]
    save_image_grid(pic, a.out / "frames.png", title="teacher DDIM | MCM 1 step | MCM 4 steps", nrow=3 * frames)
    # the same clips moving: one looping GIF, a clip a row (teacher | 1 step | 4 steps), one white pixel between
    pad = lambda x: torch.nn.functional.pad(x, (0, 1, 0, 1), value=1.0)  # noqa: E731
    mosaic = torch.stack([torch.cat([torch.cat([pad(samples[key][i, :, f]) for key in ("teacher", 1, 4)], -1) for i in range(m)], -2)
                          for f in range(frames)], 1)
    (save_clip_gifs(mosaic[None], a.out, prefix="clips")[0]).replace(a.out / "clips.gif")

    cols = ["frame_accuracy", "velocity_to_teacher", "velocity_to_grid", "velocity_residual", "speed", "seconds"]
    lines = [
        f"Video benchmark (digit-clips, {n} clips, classes i % 10, seeds {a.seed}..{a.seed + n - 1}); "
        f"{platform.machine()} CPU, 1 thread, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Command: `" + " ".join(shlex.quote(s) for s in ["python", *sys.argv]) + "`" + (f"; student trained {train_seconds:.0f} s ({config.max_steps} steps)" if train_seconds else ""),
        "",
        "| row | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join("-" if c not in r else f"{r[c]:.3f}" for c in cols) + " |")
    lines += ["", "velocity in pixels per frame; frames.png: one clip a row, teacher 50 steps | student 1 step | student 4 steps."]
    (a.out / "table.md").write_text("\n".join(lines) + "\n")
    result = {"rows": rows, "train_seconds": train_seconds, "config": a.config, "num": n}
    (a.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
