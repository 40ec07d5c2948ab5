"""Quality of consistency students at 1, 2, 4 and 8 steps, against the teacher at 50 DDIM
steps and a DMD2 student at 1 step, in one table per teacher (issue 4).

    python benchmarks/consistency.py \\
        --digits-student runs/digits_lcm/student --digits-dmd2 runs/quickstart/student \\
        --gmm-student runs/gmm_lcm/student --gmm-dmd2 runs/gmm_grid25_dmd2/student \\
        --num-images 1000 --json consistency.json

digits: digits-FID against the 1797 real digits (``onestep.eval.digits_fid``) and class
accuracy (``onestep.digits.classify_digits``), sample ``i`` with seed ``i`` and class ``i % 10``.
gmm-grid25: ``onestep.eval.mixture.mixture_metrics`` (modes covered, TV of the mode weights,
share within 3 std, sliced W2). Every row uses the same seeds. Either teacher can be left
out by leaving out its students. This is separate from ``benchmarks/quality.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

STEPS = (1, 2, 4, 8)
TEACHER_STEPS = 50


def _student_rows(name: str, student_dir: str, steps: tuple[int, ...], score, seeds, labels) -> list[dict]:
    from onestep.export import load_student
    from onestep.samplers.student import sample_student_from_seeds

    student = load_student(student_dir)
    rows = []
    for k in steps:
        ts = student.timesteps_for(k)
        t0 = time.perf_counter()
        x, _ = sample_student_from_seeds(student.generator, student, ts, seeds, labels)
        sec = time.perf_counter() - t0
        rows.append({"model": name, "steps": k, "timesteps": ts, "sec_per_sample": sec / len(seeds), **score(x)})
    return rows


def _teacher_row(teacher, score, seeds, labels) -> dict:
    from onestep.samplers.student import teacher_sample_from_seeds

    t0 = time.perf_counter()
    x = teacher_sample_from_seeds(teacher.denoiser(), teacher, seeds, labels, TEACHER_STEPS, teacher.guidance_scale)
    sec = time.perf_counter() - t0
    return {"model": f"teacher (DDIM, CFG {teacher.guidance_scale:g})", "steps": TEACHER_STEPS, "sec_per_sample": sec / len(seeds), **score(x)}


def digits_table(student: str, dmd2: str | None, n: int) -> list[dict]:
    from onestep.digits import classify_digits
    from onestep.eval import digits_fid
    from onestep.teachers import load_teacher

    seeds, labels = list(range(n)), [i % 10 for i in range(n)]
    y = torch.tensor(labels)

    def score(x):
        return {"digits_fid": digits_fid(x), "class_accuracy": float((classify_digits(x) == y).float().mean())}

    rows = [_teacher_row(load_teacher("digits"), score, seeds, labels)]
    if dmd2:
        rows += _student_rows("DMD2", dmd2, (1,), score, seeds, labels)
    rows += _student_rows("consistency", student, STEPS, score, seeds, labels)
    return rows


def gmm_table(student: str, dmd2: str | None, n: int, teacher_name: str = "gmm-grid25") -> list[dict]:
    from onestep.eval.mixture import mixture_metrics
    from onestep.teachers import load_teacher
    from onestep.teachers.gmm import gmm_mixture

    mixture = gmm_mixture(teacher_name)
    seeds = list(range(n))

    def score(x):
        m = mixture_metrics(x, mixture)
        return {k: m[k] for k in ("modes_covered", "num_modes", "tv", "within_3std", "sliced_w2")}

    rows = [_teacher_row(load_teacher(teacher_name), score, seeds, None)]
    if dmd2:
        rows += _student_rows("DMD2", dmd2, (1,), score, seeds, None)
    rows += _student_rows("consistency", student, STEPS, score, seeds, None)
    return rows


def markdown(rows: list[dict], keys: list[str]) -> str:
    head = "| model | steps | " + " | ".join(keys) + " | ms / sample |\n|---|---|" + "---|" * (len(keys) + 1)
    lines = [head]
    for r in rows:
        vals = [f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append(f"| {r['model']} | {r['steps']} | " + " | ".join(vals) + f" | {r['sec_per_sample'] * 1e3:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digits-student", help="consistency student of the digits teacher")
    p.add_argument("--digits-dmd2", help="DMD2 student of the digits teacher (1 step)")
    p.add_argument("--gmm-student", help="consistency student of gmm-grid25")
    p.add_argument("--gmm-dmd2", help="DMD2 student of gmm-grid25")
    p.add_argument("--num-images", type=int, default=1000, help="digits images per row")
    p.add_argument("--num-points", type=int, default=5000, help="2-D samples per row")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    out = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if a.digits_student:
        out["digits"] = digits_table(a.digits_student, a.digits_dmd2, a.num_images)
        print(markdown(out["digits"], ["digits_fid", "class_accuracy"]), flush=True)
    if a.gmm_student:
        out["gmm-grid25"] = gmm_table(a.gmm_student, a.gmm_dmd2, a.num_points)
        print(markdown(out["gmm-grid25"], ["modes_covered", "tv", "within_3std", "sliced_w2"]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
