"""``onestep quickstart``: distil the bundled digits teacher with DMD2, sample, compare, time, score.

The scores compare the one-step student with the teacher's 50-step samples on the same seeds
and classes (classes in turn, ``FID_SAMPLES`` images a side by default): digits-FID against all
1797 real digits (:func:`onestep.eval.digits_fid`), precision and recall on the same features
(k-NN manifolds, k = 3, :func:`onestep.eval.precision_recall.precision_recall`: a mode-seeking
student shows as a low recall) and class accuracy (the digits SVC of
:func:`onestep.digits.classify_digits`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .digits import NUM_CLASSES, classify_digits
from .export import load_student, record_metrics
from .runtime import default_device, timed
from .teachers import load_teacher
from .viz import save_comparison

PRESET = "digits_dmd2"
TEACHER_STEPS = 50
PER_CLASS = 8
FID_SAMPLES = 300


def time_student_and_teacher(
    student, teacher, seeds: list[int], labels: list[int], batch_size: int = 100, progress: bool = False
) -> dict[str, Any]:
    """Sample the same images (seeds, labels) with the student (its own steps) and the teacher
    (50 guided DDIM steps) at the same batch size, after a warm-up call; return both sample sets
    and the seconds each took."""
    from onestep.samplers.student import sample_student_from_seeds, teacher_sample_from_seeds

    sample_student_from_seeds(student.generator, student, student.timesteps, seeds[:2], labels[:2])
    (xs, _), s_sec = timed(sample_student_from_seeds, student.generator, student, student.timesteps, seeds, labels, batch_size=batch_size)
    xt, t_sec = timed(
        teacher_sample_from_seeds, teacher.denoiser(), teacher, seeds, labels, TEACHER_STEPS, teacher.guidance_scale,
        batch_size=batch_size, progress=progress,
    )
    return {"student_samples": xs, "teacher_samples": xt, "student_seconds": s_sec, "teacher_seconds": t_sec}


def compare_student_teacher(
    student_dir: Path, out: Path, timing_samples: int = 100, batch_size: int = 100, fid_samples: int = FID_SAMPLES
) -> dict[str, Any]:
    """Sample the student (its own steps) and the digits teacher (50 guided DDIM steps) for the same
    classes and seeds; write ``samples.png``; time both on ``timing_samples`` images; score both with
    digits-FID and class accuracy on ``max(fid_samples, 80 + timing_samples)`` images a side (the grid's
    and the timing images, plus more seeds when needed)."""
    from onestep.samplers.student import sample_student_from_seeds, teacher_sample_from_seeds

    student = load_student(student_dir)
    teacher = load_teacher("digits")
    t_den = teacher.denoiser()
    labels = [c for c in range(NUM_CLASSES) for _ in range(PER_CLASS)]
    seeds = list(range(len(labels)))
    xs, _ = sample_student_from_seeds(student.generator, student, student.timesteps, seeds, labels)
    xt = teacher_sample_from_seeds(t_den, teacher, seeds, labels, TEACHER_STEPS, teacher.guidance_scale)
    k = len(student.timesteps)
    save_comparison(
        [(f"student: {k} step{'s' if k > 1 else ''}", xs), (f"teacher: {TEACHER_STEPS} DDIM steps, CFG {teacher.guidance_scale:g}", xt)],
        out / "samples.png",
        row_labels=[str(c) for c in range(NUM_CLASSES)],
        per_row=PER_CLASS,
        title="same classes, same seeds",
    )

    t_labels = [i % NUM_CLASSES for i in range(timing_samples)]
    timing = time_student_and_teacher(student, teacher, list(range(1000, 1000 + timing_samples)), t_labels, batch_size)
    s_sec, t_sec = timing["student_seconds"], timing["teacher_seconds"]
    xs_all, xt_all = torch.cat([xs, timing["student_samples"]]), torch.cat([xt, timing["teacher_samples"]])
    extra = max(0, fid_samples - len(xs_all))
    if extra:
        e_seeds, e_labels = list(range(2000, 2000 + extra)), [i % NUM_CLASSES for i in range(extra)]
        xs_all = torch.cat([xs_all, sample_student_from_seeds(student.generator, student, student.timesteps, e_seeds, e_labels, batch_size=batch_size)[0]])
        xt_all = torch.cat([xt_all, teacher_sample_from_seeds(t_den, teacher, e_seeds, e_labels, TEACHER_STEPS, teacher.guidance_scale, batch_size=batch_size)])
        t_labels = t_labels + e_labels
    y = torch.tensor(labels + t_labels)
    acc_s = float((classify_digits(xs_all) == y).float().mean())
    acc_t = float((classify_digits(xt_all) == y).float().mean())
    scores = digits_scores(xs_all, xt_all)
    return {
        "student_steps": k,
        "teacher_steps": TEACHER_STEPS,
        "teacher_guidance_scale": teacher.guidance_scale,
        "timing_samples": timing_samples,
        "timing_batch_size": batch_size,
        "student_sec_per_image": s_sec / timing_samples,
        "teacher_sec_per_image": t_sec / timing_samples,
        "speedup": t_sec / s_sec,
        "student_class_accuracy": acc_s,
        "teacher_class_accuracy": acc_t,
        "class_accuracy_samples": len(y),
        **scores,
        "device": default_device().type,
        "threads": torch.get_num_threads(),
    }


def digits_scores(student_images: torch.Tensor, teacher_images: torch.Tensor) -> dict[str, Any]:
    """digits-FID of both sample sets against all 1797 real digits, and the floor: as many real
    digits (a fixed random subset, seed 0) against the same reference. The floor is a lower bound,
    as those digits are part of the reference. Then precision and recall (k = 3) of both sets on
    the same features and reference, and the recall of that real subset (what a sampler of the
    real distribution gets with as many samples; its precision is 1, as it is part of the reference)."""
    from onestep.digits import digits_dataset
    from onestep.eval import digits_features, digits_fid
    from onestep.eval.precision_recall import precision_recall

    n = len(student_images)
    real = digits_dataset()[0]
    subset = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:n]]
    scores = {
        "fid_extractor": "onestep-digits (the shipped digits classifier, onestep.eval.digits_fid)",
        "fid_reference": f"all {len(real)} real digits",
        "fid_samples": n,
        "student_digits_fid": digits_fid(student_images),
        "teacher_digits_fid": digits_fid(teacher_images),
        "real_digits_fid_floor": digits_fid(subset),
    }
    real_f = digits_features(real)
    pr = {who: precision_recall(digits_features(x), real_f) for who, x in (("student", student_images), ("teacher", teacher_images), ("real_digits", subset))}
    scores.update(
        prc_neighborhood=pr["student"]["prc_neighborhood"],
        prc_reference=f"all {len(real)} real digits, digits-classifier features (as digits-FID)",
        student_precision=pr["student"]["precision"],
        student_recall=pr["student"]["recall"],
        teacher_precision=pr["teacher"]["precision"],
        teacher_recall=pr["teacher"]["recall"],
        real_digits_recall=pr["real_digits"]["recall"],
    )
    return scores


def print_scores(report: dict[str, Any]) -> None:
    """The side-by-side table the quickstart ends with."""
    k, n = report["student_steps"], report["fid_samples"]
    heads = [f"student ({k} step{'s' if k > 1 else ''})", f"teacher ({TEACHER_STEPS} steps, CFG {report['teacher_guidance_scale']:g})"]
    rows = [
        ("ms/image", f"{report['student_sec_per_image'] * 1e3:.2f}", f"{report['teacher_sec_per_image'] * 1e3:.2f}"),
        (f"digits-FID ({n} samples)", f"{report['student_digits_fid']:.3f}", f"{report['teacher_digits_fid']:.3f}"),
        (f"precision (k={report['prc_neighborhood']})", f"{report['student_precision']:.3f}", f"{report['teacher_precision']:.3f}"),
        (f"recall (k={report['prc_neighborhood']})", f"{report['student_recall']:.3f}", f"{report['teacher_recall']:.3f}"),
        (f"class accuracy ({report['class_accuracy_samples']})", f"{report['student_class_accuracy']:.1%}", f"{report['teacher_class_accuracy']:.1%}"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w = [max(len(heads[i]), *(len(r[i + 1]) for r in rows)) for i in range(2)]
    print(f"{'':{w0}}  {heads[0]:>{w[0]}}  {heads[1]:>{w[1]}}")
    for name, a, b in rows:
        print(f"{name:{w0}}  {a:>{w[0]}}  {b:>{w[1]}}")
    print(
        f"speed-up: {report['speedup']:.0f}x; {n} real digits against the same reference: digits-FID {report['real_digits_fid_floor']:.3f}, "
        f"recall {report['real_digits_recall']:.3f}"
    )


def run_quickstart(out: Path, max_steps: int | None = None, timing_samples: int = 100, fid_samples: int = FID_SAMPLES) -> dict[str, Any]:
    from onestep.trainers import load_config, make_trainer

    overrides = {"overwrite": True}  # the quickstart redoes its own folder each time
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    config = load_config(PRESET, overrides, output_dir=str(out))
    start = time.perf_counter()
    trainer = make_trainer(config)
    student_dir = trainer.train()
    wall = time.perf_counter() - start
    print(f"distilled the digits teacher with DMD2 in {wall:.0f} s ({config.max_steps} iterations)")
    print("sampling student and teacher for the comparison grid and timings ...")
    report = {"preset": PRESET, "student": str(student_dir), "distill_wall_seconds": wall, "iterations": config.max_steps}
    report.update(compare_student_teacher(Path(student_dir), out, timing_samples=timing_samples, fid_samples=fid_samples))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    record_metrics(student_dir, {  # the student's card says what the quickstart measured of it
        "digits_fid": report["student_digits_fid"], "teacher_digits_fid": report["teacher_digits_fid"],
        "precision": report["student_precision"], "recall": report["student_recall"],
        "class_accuracy": report["student_class_accuracy"], "samples": report["fid_samples"], "reference": report["fid_reference"],
    })
    print_scores(report)
    print(f"wrote {out / 'samples.png'}, {out / 'report.json'} and the student in {student_dir}")
    return report
