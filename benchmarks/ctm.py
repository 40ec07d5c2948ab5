"""CTM on digits: one network sampled in 1, 2 and 4 steps (gamma 0 and 1, nu 1 and more), side by side
with a consistency (LCM) student and the teacher, on the quickstart's 300 seeds and classes (issue 17).

    python benchmarks/ctm.py --ctm-student runs/digits_ctm/student --lcm-student runs/digits_lcm/student \\
        --out benchmarks/ctm-out

Without ``--ctm-student`` it trains ``digits_ctm`` first (``--preset``, into ``<out>/ctm-run``). Every row:
digits-FID against the 1797 real digits, class accuracy by the digits classifier, and ``grain`` (energy
above the real digits' frequency band, ``benchmarks/grain.py``). Writes ``<out>/table.md``,
``<out>/results.json`` and ``<out>/samples.png`` (teacher | CTM 1 step | CTM 4 steps | LCM ...: same
classes, same seeds). The teacher's row is computed once and kept in ``<out>/teacher.safetensors`` (its samples) and ``<out>/teacher.json`` (its row).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grain import grain, quickstart_seeds  # noqa: E402

TEACHER_STEPS = 50


def score(x: torch.Tensor, labels: list[int]) -> dict:
    from onestep.digits import classify_digits
    from onestep.eval import digits_fid

    acc = float((classify_digits(x) == torch.tensor(labels)).float().mean())
    return {"digits_fid": digits_fid(x), "class_accuracy": acc, "grain": grain(x)}


def teacher_row(out: Path, seeds: list[int], labels: list[int]) -> tuple[dict, torch.Tensor]:
    from onestep.samplers.student import teacher_sample_from_seeds
    from onestep.teachers import load_teacher

    from safetensors.torch import load_file, save_file

    cache, row_file = out / "teacher.safetensors", out / "teacher.json"
    if cache.is_file() and row_file.is_file():
        return json.loads(row_file.read_text()), load_file(cache)["grid"]
    teacher = load_teacher("digits")
    t0 = time.perf_counter()
    x = teacher_sample_from_seeds(teacher.denoiser(), teacher, seeds, labels, TEACHER_STEPS, teacher.guidance_scale, batch_size=100)
    row = {"model": f"teacher (DDIM, CFG {teacher.guidance_scale:g})", "steps": TEACHER_STEPS, "gamma": None, "nu": None,
           "ms_per_sample": 1e3 * (time.perf_counter() - t0) / len(seeds), **score(x, labels)}
    out.mkdir(parents=True, exist_ok=True)
    save_file({"grid": x[:80].contiguous()}, cache)
    row_file.write_text(json.dumps(row, indent=1) + "\n")
    return row, x[:80]


def student_rows(name: str, folder: str, settings: list[tuple[int, float | None, float | None]], seeds, labels) -> tuple[list[dict], dict]:
    """One row per (steps, gamma, nu); gamma / nu None: the student's own (or not a CTM student)."""
    from onestep.export import load_student
    from onestep.samplers.student import sample_student_from_seeds

    student = load_student(folder)
    gen, rows, grids = student.generator, [], {}
    own = (getattr(gen, "gamma", None), getattr(gen, "nu", None))
    for steps, gamma, nu in settings:
        if gamma is not None:
            gen.gamma = gamma
        if nu is not None:
            gen.nu = nu
        ts = student.timesteps_for(steps)
        t0 = time.perf_counter()
        x, _ = sample_student_from_seeds(gen, student, ts, seeds, labels, batch_size=100)
        ms = 1e3 * (time.perf_counter() - t0) / len(seeds)
        rows.append({"model": name, "steps": steps, "gamma": getattr(gen, "gamma", None), "nu": getattr(gen, "nu", None),
                     "timesteps": ts, "ms_per_sample": ms, **score(x, labels)})
        grids[(steps, rows[-1]["gamma"], rows[-1]["nu"])] = x[:80]
        if own[0] is not None:  # back to the student's own
            gen.gamma, gen.nu = own
    return rows, grids


def markdown(rows: list[dict]) -> str:
    lines = ["| model | steps | gamma | nu | digits-FID (300) | class accuracy | grain | ms / sample |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = "-" if r["gamma"] is None else f"{r['gamma']:g}"
        nu = "-" if r["nu"] is None else f"{r['nu']:g}"
        lines.append(f"| {r['model']} | {r['steps']} | {g} | {nu} | {r['digits_fid']:.3f} | {100 * r['class_accuracy']:.1f} % | "
                     f"{r['grain'] * 1e3:.2f}e-3 | {r['ms_per_sample']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctm-student", help="a CTM student folder of the digits teacher (default: train --preset into <out>/ctm-run)")
    p.add_argument("--preset", default="digits_ctm", help="the CTM preset to train when no --ctm-student is given")
    p.add_argument("--lcm-student", help="a consistency (LCM) student folder of the digits teacher, sampled beside it")
    p.add_argument("--steps", default="1,2,4", help="comma-separated step counts")
    p.add_argument("--gammas", default="0,1", help="comma-separated gammas for the multi-step CTM rows")
    p.add_argument("--nus", default="1", help="comma-separated nus for the CTM rows")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "ctm-out")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    seeds, labels = quickstart_seeds()
    steps = [int(v) for v in a.steps.split(",")]
    gammas, nus = [float(v) for v in a.gammas.split(",")], [float(v) for v in a.nus.split(",")]
    student, train_s = a.ctm_student, None
    if student is None:
        from onestep.trainers import load_config, make_trainer

        config = load_config(a.preset, {"overwrite": True, "checkpoint_every": 0, "preview_every": 0, "log_with": "none"},
                             output_dir=str(a.out / "ctm-run"))
        t0 = time.perf_counter()
        student = str(make_trainer(config).train())
        train_s = time.perf_counter() - t0
    t_row, t_grid = teacher_row(a.out, seeds, labels)
    rows, panels = [t_row], [(f"teacher, {TEACHER_STEPS} steps: FID {t_row['digits_fid']:.2f}", t_grid)]
    settings = [(k, g if k > 1 else 0.0, nu) for k in steps for g in (gammas if k > 1 else [0.0]) for nu in nus]
    ctm_rows, ctm_grids = student_rows("CTM", student, settings, seeds, labels)
    rows += ctm_rows
    for r in ctm_rows:
        if r["nu"] == nus[0] and r["gamma"] in (0.0, None):
            panels.append((f"CTM {r['steps']} step{'s' * (r['steps'] > 1)}: FID {r['digits_fid']:.2f}", ctm_grids[(r["steps"], r["gamma"], r["nu"])]))
    if a.lcm_student:
        lcm_rows, lcm_grids = student_rows("consistency (LCM)", a.lcm_student, [(k, None, None) for k in steps], seeds, labels)
        rows += lcm_rows
        panels += [(f"LCM {r['steps']} step{'s' * (r['steps'] > 1)}: FID {r['digits_fid']:.2f}", lcm_grids[(r["steps"], None, None)])
                   for r in lcm_rows if r["steps"] in (steps[0], steps[-1])]
    table = markdown(rows)
    (a.out / "table.md").write_text(table)
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "ctm_student": student, "lcm_student": a.lcm_student, "ctm_train_seconds": train_s}
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    from onestep.viz import save_comparison

    save_comparison(panels, a.out / "samples.png", row_labels=[str(c) for c in range(10)], per_row=8, title="same classes, same seeds")
    print(table)


if __name__ == "__main__":
    main()
