"""PSO against naive fine-tuning: tune the quickstart's one-step digits student toward thickened digits.

    python benchmarks/pso_style.py                                   # trains the student first (digits_dmd2)
    python benchmarks/pso_style.py --student runs/quickstart/student # tune an existing student
    python benchmarks/pso_style.py --student S --variants naive,pso,pso-offline,pso-pairs --steps 300

Stages (each logged as it starts; the trainings show their own progress bars):

1. the student: ``--student`` or a fresh ``digits_dmd2`` run (``--start-steps`` shortens it) into ``RUNS/start``;
2. each variant tunes that student with the ``digits_pso`` preset for ``--steps`` iterations, the same
   batch, learning rate and seed for all: ``naive`` is plain diffusion fine-tuning on the thick digits
   (``naive: true``), ``pso`` online PSO, and the others PSO's offline and preference-pair modes;
3. the untuned student and every tuned one sample the quickstart's 300 seeds and classes in one step and
   are scored: digits-FID against the style set (the 1797 thick digits) and against the real digits,
   ``grain`` (benchmarks/grain.py: energy per pixel at 5+ cycles per 16 pixels; blur lowers it, speckle
   raises it; the style set's own value is the floor to compare with) and class accuracy (the digits SVC);
4. writes ``OUT/samples.png`` (style set | untuned | naive | pso, the same seeds and classes), ``OUT/all-variants.png``,
   ``OUT/table.md`` and ``OUT/results.json``.

OUT is ``--out`` (default benchmarks/pso-out), RUNS ``--runs`` (default runs/pso_style, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from grain import grain, quickstart_seeds  # noqa: E402  (benchmarks/, the measure the quickstart's grain was fixed with)

PRESET = "digits_pso"
#: label -> (what it is, fields set on the preset)
VARIANTS = {
    "naive": ("plain diffusion fine-tuning on the targets, at the student's t", {"naive": True}),
    "naive-uniform": ("plain diffusion fine-tuning, t ~ U{0 .. T-1}", {"naive": True, "noise_levels": "uniform"}),
    "pso": ("PSO, online reference images (the current student)", {}),
    "pso-offline": ("PSO, offline reference images (the initial student, generated once)", {"pairs": "offline"}),
    "pso-pairs": ("PSO on given pairs: each thick digit over its own thin one", {"pairs": "pairs", "losers": "digits"}),
}


def log(msg: str) -> None:
    print(f"[pso_style {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def score(samples: torch.Tensor, style: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """digits-FID of ``samples`` against the style set and against the real digits, and their ``grain``."""
    from onestep.eval import digits_fid

    return {"fid_style": digits_fid(samples, style), "fid_real": digits_fid(samples, real), "grain": grain(samples)}


def accuracy(samples: torch.Tensor, labels: list[int]) -> float:
    from onestep.digits import classify_digits

    return float((classify_digits(samples) == torch.tensor(labels)).float().mean())


def train_start(out: Path, steps: int | None) -> Path:
    from onestep.trainers import load_config, make_trainer

    fields = {"overwrite": True, "checkpoint_every": 0, "preview_every": 0, "log_with": "none"}
    if steps:
        fields["max_steps"] = steps
    return make_trainer(load_config("digits_dmd2", fields, output_dir=str(out / "start"))).train()


def tune(label: str, student: Path, out: Path, steps: int | None, extra: dict, reuse: bool) -> tuple[Path, float]:
    from onestep.trainers import load_config, make_trainer

    done = out / label / "pso_style.json"
    if reuse and done.is_file():
        return Path(json.loads(done.read_text())["student"]), json.loads(done.read_text())["train_seconds"]

    fields = {**VARIANTS[label][1], **extra, "student": str(student), "overwrite": True, "checkpoint_every": 0,
              "preview_every": 0, "log_with": "none"}
    if steps:
        fields["max_steps"] = steps
    trainer = make_trainer(load_config(PRESET, fields, output_dir=str(out / label)))
    start = time.perf_counter()
    folder = trainer.train()
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"student": str(folder), "train_seconds": seconds}))
    return folder, seconds


def sample(student_dir: Path) -> torch.Tensor:
    from onestep.export import load_student
    from onestep.samplers.student import sample_student_from_seeds

    s = load_student(student_dir)
    seeds, labels = quickstart_seeds()
    return sample_student_from_seeds(s.generator, s, s.timesteps[:1], seeds, labels, batch_size=100)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", type=Path, default=None, help="the one-step student to tune (default: train digits_dmd2 first)")
    p.add_argument("--start-steps", type=int, default=None, help="iterations of the digits_dmd2 run that makes the student (default: the preset's 1000)")
    p.add_argument("--variants", default="naive,naive-uniform,pso,pso-offline,pso-pairs", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=None, help="tuning iterations of every variant (default: the digits_pso preset's)")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("FIELD", "VALUE"),
                   help="a config field for every variant (a YAML value), e.g. --set lr_generator 2e-5")
    p.add_argument("--reuse", action="store_true", help="score the variants already tuned in RUNS as they are (train only the others)")
    p.add_argument("--out", type=Path, default=HERE / "pso-out", help="where the picture, table and results.json go")
    p.add_argument("--runs", type=Path, default=HERE.parent / "runs" / "pso_style", help="the training runs (git-ignored runs/ by default)")
    args = p.parse_args()
    import yaml

    labels = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in labels if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    extra = {k: yaml.safe_load(v) for k, v in args.set}
    args.out.mkdir(parents=True, exist_ok=True)
    from onestep.digits import digits_dataset
    from onestep.styles import thick_digits

    style, real = thick_digits()[0], digits_dataset()[0]
    _, classes = quickstart_seeds()
    student = args.student
    if student is None:
        log(f"1/4 training the student: digits_dmd2 ({args.start_steps or 'preset'} steps) into {args.runs / 'start'}")
        student = train_start(args.runs, args.start_steps)
    else:
        log(f"1/4 the student: {student}")
    results = {}
    for i, label in enumerate(labels):
        log(f"2/4 tuning {label} ({i + 1}/{len(labels)}): {VARIANTS[label][0]}")
        folder, seconds = tune(label, student, args.runs, args.steps, extra, args.reuse)
        results[label] = {"student": os.path.relpath(folder, HERE.parent), "train_seconds": seconds}
    log("3/4 sampling (one step, the quickstart's 300 seeds) and scoring")
    grids = {}
    for label, folder in [("untuned", student)] + [(k, Path(v["student"])) for k, v in results.items()]:
        x = sample(folder)
        grids[label] = x[:80]
        results.setdefault(label, {"student": str(folder), "train_seconds": 0.0}).update({**score(x, style, real), "accuracy": accuracy(x, classes)})
        log(f"    {label}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[label].items() if isinstance(v, float)))
    refs = {"style set": {**score(style[:300], style, real), "grain": grain(style)}, "real digits": {"grain": grain(real)}}
    log("4/4 writing the picture and the table")
    write_report(args.out, ["untuned"] + labels, results, refs, style, grids, args, extra)


def write_report(out: Path, labels: list[str], results: dict, refs: dict, style: torch.Tensor, grids: dict, args, extra: dict) -> None:
    from onestep.viz import save_comparison

    _, classes = quickstart_seeds()
    what = {"untuned": "the quickstart student (digits_dmd2), one step", **{k: v[0] for k, v in VARIANTS.items()}}
    rows = [f"| style set (300 thick digits) | the targets | {refs['style set']['fid_style']:.2f} | {refs['style set']['fid_real']:.2f} | "
            f"{refs['style set']['grain'] * 1e3:.2f} | - | - |",
            f"| real digits | - | - | - | {refs['real digits']['grain'] * 1e3:.2f} | - | - |"]
    for label in labels:
        r = results[label]
        rows.append(f"| {label} | {what[label]} | {r['fid_style']:.2f} | {r['fid_real']:.2f} | {r['grain'] * 1e3:.2f} | "
                    f"{r['accuracy']:.3f} | {r['train_seconds']:.0f} |")
    table = ("| student | what | digits-FID to style (300) | digits-FID to real (300) | grain (1e-3) | class accuracy | tune s |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    (out / "table.md").write_text(table)
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv), "steps": args.steps, "set": extra}
    (out / "results.json").write_text(json.dumps({"meta": meta, "references": refs, "students": results}, indent=1))
    # the style set's panel: the thick digit of each class, in the grid's order
    grid_classes = classes[:80]
    from onestep.digits import digits_dataset

    y = digits_dataset()[1]
    picks = [int((y == c).nonzero()[k % int((y == c).sum()), 0]) for k, c in enumerate(grid_classes)]
    panels = [("style set (targets)", style[picks])]
    for label in labels:
        r = results[label]
        panels.append((f"{label}: FID style {r['fid_style']:.2f}, grain {r['grain'] * 1e3:.2f}e-3", grids[label]))
    rows_of = dict(row_labels=[str(c) for c in range(10)], per_row=8, title="one step, same classes, same seeds")
    main = [panels[0]] + [panels[1 + labels.index(v)] for v in ("untuned", "naive", "pso") if v in labels]
    save_comparison(main, out / "samples.png", **rows_of)  # the comparison that matters: untuned | naive | PSO
    save_comparison(panels, out / "all-variants.png", **rows_of)
    print(table)


if __name__ == "__main__":
    main()
