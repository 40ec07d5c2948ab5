"""Speed figures for the digits teacher (CPU or GPU).

    python benchmarks/speed.py --student runs/quickstart/student --num-images 1000

Prints and (with --json) writes:
- seconds per image for the student (its own steps) and the teacher (50 guided DDIM steps),
  both over the same images and batch size, and their ratio (measured in one run);
- seconds per DMD2 iteration on the digits teacher (fake-score update every iteration,
  generator update every `fake_updates_per_generator`-th), at the preset's batch size.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def sampling_ratio(student_dir: str, num_images: int, batch_size: int) -> dict:
    from onestep.export import load_student
    from onestep.quickstart import TEACHER_STEPS, time_student_and_teacher
    from onestep.teachers import load_teacher

    student = load_student(student_dir)
    teacher = load_teacher("digits")
    labels = [i % 10 for i in range(num_images)]
    timed = time_student_and_teacher(student, teacher, list(range(num_images)), labels, batch_size, progress=True)
    s, t = timed["student_seconds"], timed["teacher_seconds"]
    return {
        "num_images": num_images,
        "sampling_batch_size": batch_size,
        "student_steps": len(student.timesteps),
        "student_sec_per_image": s / num_images,
        "teacher_sec_per_image": t / num_images,
        "teacher_steps": TEACHER_STEPS,
        "teacher_guidance_scale": teacher.guidance_scale,
        "ratio": t / s,
    }


def dmd2_step_time(iterations: int) -> dict:
    from onestep.trainers import load_config, make_trainer

    with tempfile.TemporaryDirectory() as d:
        cfg = load_config("digits_dmd2", {"log_with": "none", "export": False, "preview_every": 0, "checkpoint_every": 0}, output_dir=d)
        tr = make_trainer(cfg)
        for _ in range(cfg.fake_updates_per_generator):  # warm-up, one full generator cycle
            tr.train_step()
        t0 = time.perf_counter()
        for _ in range(iterations):
            tr.train_step()
        dt = (time.perf_counter() - t0) / iterations
    return {"dmd2_sec_per_iteration": dt, "dmd2_batch_size": cfg.batch_size, "fake_updates_per_generator": cfg.fake_updates_per_generator}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="a digits student folder (e.g. runs/quickstart/student)")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--iterations", type=int, default=50, help="DMD2 iterations to time")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = p.parse_args()
    out = {
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    out.update(sampling_ratio(a.student, a.num_images, a.batch_size))
    out.update(dmd2_step_time(a.iterations))
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
