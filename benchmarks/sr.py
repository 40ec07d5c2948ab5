"""Super-resolution benchmark: a one-step student against its teacher, bicubic upsampling and the ground truth.

On the held-out digits of the ``digits-sr`` teacher (the 297 digits its training never saw) each method
super-resolves the 4x4 low-res digit to 16x16; scored against the ground truth with PSNR, an
LPIPS-style perceptual error (unit-normalised digits-classifier features, :mod:`onestep.eval.sr`) and
the high-frequency energy (band above the low-res Nyquist frequency; also as a ratio to the ground
truth's: bicubic is far below 1). Rows: bicubic, the teacher with DDIM at ``--teacher-steps`` (50),
the teacher's own one-step x0 at the student's timestep (no distillation), and each ``--student``.
Sample ``i`` uses seed ``seed + i`` for the teacher and the students alike.

The goal checks (issue 18): student PSNR error and perceptual error within 5% of the teacher's 50-step
result (PSNR as the MSE it stands for: student MSE <= 1.05 teacher MSE), and sharper than bicubic.

    python benchmarks/sr.py --student runs/digits_sr_tadsr/student --out benchmarks/sr-out

Writes ``table.md``, ``results.json`` and ``examples.png`` (rows: low-res | bicubic | teacher 50 steps |
student 1 step | ground truth) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def _spec(conditioning, sample_shape, clip):
    return SimpleNamespace(conditioning=conditioning, sample_shape=tuple(sample_shape), clip=clip)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", action="append", default=[], help="student folder (repeatable); label with NAME=FOLDER")
    p.add_argument("--teacher", default="digits-sr", help="the image-conditioned teacher (built-in digits-sr)")
    p.add_argument("--num", type=int, default=297, help="held-out digits to super-resolve (at most 297)")
    p.add_argument("--teacher-steps", type=int, default=50, help="DDIM steps of the teacher reference")
    p.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed + i")
    p.add_argument("--examples", type=int, default=10, help="rows of the example picture")
    p.add_argument("--out", type=Path, default=Path("benchmarks/sr-out"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    from onestep.eval.sr import sr_scores
    from onestep.export import load_student
    from onestep.samplers.student import sample_student_from_seeds, teacher_sample_from_seeds
    from onestep.teachers import load_teacher
    from onestep.teachers.sr import digits_sr_conditioning
    from onestep.viz import save_image_grid

    cond_test, hr = digits_sr_conditioning("test")
    n = min(a.num, len(hr))
    hr, labels, seeds = hr[:n], list(range(n)), list(range(a.seed, a.seed + n))
    bicubic = cond_test.images[:n]
    lowres = cond_test.degrade(hr)
    teacher = load_teacher(a.teacher)
    tspec = _spec(teacher.conditioning.with_images(cond_test.images), teacher.sample_shape, teacher.clip)
    rows, outputs = {}, {"bicubic": bicubic}
    rows["bicubic"] = {"steps": 0, **sr_scores(bicubic, hr)}
    t0 = time.time()
    xt = teacher_sample_from_seeds(teacher.denoiser(), tspec, seeds, labels, num_steps=a.teacher_steps, batch_size=100)
    rows[f"teacher DDIM {a.teacher_steps}"] = {"steps": a.teacher_steps, "seconds": time.time() - t0, **sr_scores(xt, hr)}
    outputs["teacher"] = xt
    students = []
    for item in a.student:
        name, _, folder = item.rpartition("=")
        st = load_student(folder)
        sspec = _spec(st.conditioning.with_images(cond_test.images), st.sample_shape, st.clip)
        if not students:  # the teacher's own one-step x0 at the first student's timestep: what distillation starts from
            ts = st.timesteps_for(None)
            x1, _ = sample_student_from_seeds(teacher.denoiser(), tspec, ts, seeds, labels, batch_size=100)
            rows[f"teacher 1 step (x0 at t={ts[0]})"] = {"steps": 1, **sr_scores(x1, hr)}
        t0 = time.time()
        xs, _ = sample_student_from_seeds(st.generator, sspec, st.timesteps_for(None), seeds, labels, batch_size=100)
        label = name or f"student {st.meta.get('method', '')} ({Path(folder).parent.name})"
        rows[label] = {"steps": len(st.timesteps), "seconds": time.time() - t0, **sr_scores(xs, hr)}
        students.append(label)
        outputs.setdefault("student", xs)

    ref = rows[f"teacher DDIM {a.teacher_steps}"]
    mse = lambda db: 10 ** (-db / 10)  # noqa: E731
    goals = {}
    for label in students:
        r = rows[label]
        goals[label] = {
            "mse_ratio_to_teacher": mse(r["psnr"]) / mse(ref["psnr"]),
            "perceptual_ratio_to_teacher": r["perceptual_error"] / ref["perceptual_error"],
            "within_5pct_psnr": mse(r["psnr"]) <= 1.05 * mse(ref["psnr"]),
            "within_5pct_perceptual": r["perceptual_error"] <= 1.05 * ref["perceptual_error"],
            "sharper_than_bicubic": r["hf_energy"] > rows["bicubic"]["hf_energy"],
        }

    a.out.mkdir(parents=True, exist_ok=True)
    k = min(a.examples, n)
    nearest = torch.nn.functional.interpolate(lowres[:k], size=hr.shape[-2:], mode="nearest")
    cols = [nearest, bicubic[:k], outputs["teacher"][:k]] + ([outputs["student"][:k]] if "student" in outputs else []) + [hr[:k]]
    grid = torch.stack(cols, 1).flatten(0, 1)
    save_image_grid(grid, a.out / "examples.png", title="low-res | bicubic | teacher | student 1 step | ground truth", nrow=len(cols))

    lines = [
        f"Command: `python benchmarks/sr.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        f"Held-out digits: {n} (4x4 -> 16x16), seeds {seeds[0]}..{seeds[-1]}; machine: {platform.processor() or platform.machine()}, 1 thread.",
        "",
        "| method | steps | PSNR (dB) ↑ | perceptual error ↓ | HF energy (x1e-3) | HF ratio to GT |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['steps']} | {r['psnr']:.2f} | {r['perceptual_error']:.4f} | {1e3 * r['hf_energy']:.3f} | {r['hf_ratio']:.3f} |")
    for label, g in goals.items():
        lines += ["", f"Goal check, {label}: MSE {g['mse_ratio_to_teacher']:.3f}x the teacher's "
                  f"({'within' if g['within_5pct_psnr'] else 'NOT within'} 5%), perceptual error {g['perceptual_ratio_to_teacher']:.3f}x "
                  f"({'within' if g['within_5pct_perceptual'] else 'NOT within'} 5%), "
                  f"{'sharper' if g['sharper_than_bicubic'] else 'NOT sharper'} than bicubic."]
    table = "\n".join(lines) + "\n"
    (a.out / "table.md").write_text(table)
    result = {"command": ["benchmarks/sr.py", *(sys.argv[1:] if argv is None else argv)], "rows": rows, "goals": goals, "num": n, "seed": a.seed, "teacher": a.teacher, "students": a.student,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (a.out / "results.json").write_text(json.dumps(result, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v) + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
