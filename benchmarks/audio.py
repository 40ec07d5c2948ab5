"""Audio (issue 18): CoMoSpeech-style consistency and SoundCTM-style CTM students of the ``sounds`` teacher
in one step, against the teacher with 50 DDIM steps, on the same classes and seeds.

    OMP_NUM_THREADS=1 python benchmarks/audio.py --out benchmarks/audio-out
    OMP_NUM_THREADS=1 python benchmarks/audio.py --lcm-student runs/sounds_lcm/student --ctm-student runs/sounds_ctm/student

Without ``--lcm-student`` / ``--ctm-student`` it trains the presets ``sounds_lcm`` / ``sounds_ctm`` first (into
``<out>/lcm-run`` and ``<out>/ctm-run``). Sample ``i`` asks class ``i % 6`` with seed ``--seed + i`` (default
seeds 1000.., not the seeds anything was tuned on). Every row: class accuracy by the referee classifier
(:mod:`onestep.eval.audio`) and mel-FID against the 600 held-out real sounds; a "real" row gives the floor
(600 training sounds against the held-out ones). Goal (issue 18): one-step mel-FID within 1.5x the teacher's.

Writes ``<out>/results.json``, ``<out>/table.md``, ``<out>/mels.png`` (per class: real | teacher 50 steps |
consistency 1 step | CTM 1 step; low frequencies at the bottom) and ``<out>/wav/{model}_{class}.wav`` (the
first sample of each class, through the Griffin-Lim vocoder of :mod:`onestep.audio`). The teacher's row is
kept in ``<out>/teacher.json`` (scores) and ``<out>/teacher.safetensors`` (samples) and reused.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

TEACHER_STEPS = 50
PER_ROW = 4


def _train(preset: str, out: Path) -> tuple[str, float]:
    from onestep.trainers import load_config, make_trainer

    config = load_config(preset, {"overwrite": True, "checkpoint_every": 0, "preview_every": 0, "log_with": "none"}, output_dir=str(out))
    t0 = time.perf_counter()
    student = str(make_trainer(config).train())
    return student, time.perf_counter() - t0


def _teacher(out: Path, seeds: list[int], labels: list[int], steps: int) -> tuple[dict, torch.Tensor]:
    from onestep.eval.audio import audio_scores
    from onestep.samplers.student import teacher_sample_from_seeds
    from onestep.teachers import load_teacher
    from safetensors.torch import load_file, save_file

    cache, scores = out / "teacher.safetensors", out / "teacher.json"  # no pickle: tensors and JSON scores
    if cache.is_file() and scores.is_file():
        saved = json.loads(scores.read_text())
        if saved["seeds"] == seeds and saved["labels"] == labels and saved["steps"] == steps:
            return saved["row"], load_file(str(cache))["x"]
    teacher = load_teacher("sounds")
    t0 = time.perf_counter()
    x = teacher_sample_from_seeds(teacher.denoiser(), teacher, seeds, labels, steps, teacher.guidance_scale, batch_size=200)
    row = {"model": f"teacher (DDIM, CFG {teacher.guidance_scale:g})", "steps": steps,
           "ms_per_sample": 1e3 * (time.perf_counter() - t0) / len(seeds), **audio_scores(x, labels)}
    save_file({"x": x.detach().float().contiguous()}, str(cache))
    scores.write_text(json.dumps({"row": row, "seeds": seeds, "labels": labels, "steps": steps}) + "\n")
    return row, x


def _student(name: str, folder: str, steps: int, seeds, labels) -> tuple[dict, torch.Tensor]:
    from onestep.eval.audio import audio_scores
    from onestep.export import load_student
    from onestep.samplers.student import sample_student_from_seeds

    st = load_student(folder)
    ts = st.timesteps_for(steps)
    t0 = time.perf_counter()
    x, _ = sample_student_from_seeds(st.generator, st, ts, seeds, labels, batch_size=200)
    ms = 1e3 * (time.perf_counter() - t0) / len(seeds)
    return {"model": name, "steps": steps, "timesteps": ts, "ms_per_sample": ms, **audio_scores(x, labels)}, x


def _per_class(x: torch.Tensor, labels: list[int], num_classes: int) -> torch.Tensor:
    """``PER_ROW`` samples of each class, row-major, flipped so that low frequencies are at the bottom."""
    y = torch.tensor(labels)
    return torch.cat([x[y == c][:PER_ROW] for c in range(num_classes)]).flip(-2)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lcm-student", help="consistency student folder of the sounds teacher (default: train sounds_lcm)")
    p.add_argument("--ctm-student", help="CTM student folder of the sounds teacher (default: train sounds_ctm)")
    p.add_argument("--num", type=int, default=600, help="samples per row (class i %% 6 for sample i)")
    p.add_argument("--seed", type=int, default=1000, help="first seed; sample i uses seed + i")
    p.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS)
    p.add_argument("--multi-steps", type=int, default=4, help="also score the students at this many steps (0: no)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "audio-out")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)

    from onestep.audio import CLASS_NAMES, NUM_CLASSES, sounds_dataset, write_sounds
    from onestep.eval.audio import audio_scores
    from onestep.viz import save_comparison

    seeds, labels = list(range(a.seed, a.seed + a.num)), [i % NUM_CLASSES for i in range(a.num)]
    train_s = {}
    students = {"consistency (CoMoSpeech)": a.lcm_student, "CTM (SoundCTM)": a.ctm_student}
    for (name, folder), preset, run in zip(list(students.items()), ("sounds_lcm", "sounds_ctm"), ("lcm-run", "ctm-run")):
        if folder is None:
            students[name], train_s[name] = _train(preset, a.out / run)
    real_train, y_train = sounds_dataset("train")
    real_rows = {"model": "real (600 train sounds)", "steps": 0, "ms_per_sample": 0.0,
                 **audio_scores(real_train[:600], y_train[:600])}
    t_row, xt = _teacher(a.out, seeds, labels, a.teacher_steps)
    rows, panels, samples = [real_rows, t_row], [], {"teacher": xt}
    real_test, y_test = sounds_dataset("test")
    panels.append(("real", _per_class(real_test, y_test.tolist(), NUM_CLASSES)))
    panels.append((f"teacher {a.teacher_steps} steps\nmel-FID {t_row['mel_fid']:.2f}", _per_class(xt, labels, NUM_CLASSES)))
    for name, folder in students.items():
        for k in [1] + ([a.multi_steps] if a.multi_steps > 1 else []):
            row, x = _student(name, folder, k, seeds, labels)
            rows.append(row)
            if k == 1:
                samples[name.split()[0]] = x
                panels.append((f"{name.split()[0]} 1 step\nmel-FID {row['mel_fid']:.2f}", _per_class(x, labels, NUM_CLASSES)))
    goals = {}
    for r in rows[2:]:
        if r["steps"] == 1:
            ratio = r["mel_fid"] / t_row["mel_fid"]
            goals[r["model"]] = {"mel_fid_ratio_to_teacher": ratio, "within_1.5x": ratio <= 1.5,
                                 "accuracy_ratio_to_teacher": r["class_accuracy"] / max(t_row["class_accuracy"], 1e-9)}

    save_comparison(panels, a.out / "mels.png", row_labels=list(CLASS_NAMES), per_row=PER_ROW,
                    title="log-mel spectrograms (low frequencies at the bottom), same classes and seeds")
    for model, x in samples.items():
        first = [labels.index(c) for c in range(NUM_CLASSES)]
        for c, path in zip(range(NUM_CLASSES), write_sounds(x[first], a.out / "wav", prefix=model.replace(" ", "_"))):
            path.rename(path.with_name(f"{model.replace(' ', '_')}_{c}_{CLASS_NAMES[c].replace(' ', '-')}.wav"))

    lines = ["| model | steps | class accuracy | mel-FID (600) | ms / sample |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {100 * r['class_accuracy']:.1f} % | {r['mel_fid']:.3f} | {r['ms_per_sample']:.2f} |")
    for name, g in goals.items():
        lines += ["", f"Goal check, {name}: mel-FID {g['mel_fid_ratio_to_teacher']:.2f}x the teacher's "
                      f"({'within' if g['within_1.5x'] else 'NOT within'} 1.5x); accuracy {g['accuracy_ratio_to_teacher']:.3f}x the teacher's."]
    table = "\n".join(lines) + "\n"
    (a.out / "table.md").write_text(table)
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "students": students, "train_seconds": train_s,
            "command": ["benchmarks/audio.py", *(sys.argv[1:] if argv is None else argv)], "seeds": [seeds[0], seeds[-1]]}
    result = {"meta": meta, "rows": rows, "goals": goals}
    (a.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
