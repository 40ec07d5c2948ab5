"""Peak RSS of every trainer, full-copy fake score against LoRA fake score, on one SD-shaped pipeline (issue 15).

    python benchmarks/trainer_memory.py                       # every row, small SD (~35M UNet), 128 px, batch 2
    python benchmarks/trainer_memory.py --rows dmd2,vsd --pipeline /tmp/onestep-scale/pipelines/sd15
    python benchmarks/trainer_memory.py --check               # a tiny pipeline, two rows: the script itself

Rows are benchmarks/trainer_overhead.py's (each method's digits preset) with the teacher swapped for the
pipeline, as ``onestep train PRESET --teacher PIPELINE --prompts ... [--real_images ...]`` gives them, once
with ``--fake_score copy`` and once with ``--fake_score lora`` (consistency distillation has no fake score:
one row). Each run is a fresh interpreter (benchmarks/peers.py's child: peak RSS from ``VmHWM`` and the
child's rusage, seconds per step from the progress bar), ``--steps`` steps, float32, no previews or
checkpoints, the student exported at the end (its peak is part of the run's).

Output: a markdown table (printed, and written to ``--out``) and ``--json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: fake-score kinds a row runs with; consistency has none
FAKE_SCORES = ("copy", "lora")


def argv_for(row: str, fake: str | None, teacher: Path, prompts: Path, images: Path, out: Path, resolution: int, batch: int,
             steps: int) -> list[str]:
    """``onestep train`` for one row: the row's digits preset and overrides, on ``teacher``."""
    from trainer_overhead import REAL_ROWS, ROWS

    preset, extra = ROWS[row]
    argv = ["train", preset, "--teacher", str(teacher), "--prompts", str(prompts), "--output-dir", str(out),
            "--resolution", str(resolution), "--batch_size", str(batch), "--max_steps", str(steps), "--mixed_precision", "no",
            "--checkpoint_every", "0", "--preview_every", "0", "--eval_every", "0", "--log_with", "none", "--overwrite", "true"]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    if fake is not None:
        argv += ["--fake_score", fake]  # LoRA on the preset's lora_targets (digits_vsd: all; others: attention)
    if row in REAL_ROWS:
        argv += ["--real_images", str(images)]
    return argv


def table(rows: list[dict]) -> str:
    lines = ["| trainer | fake score | peak RSS GiB | s / step | LoRA / copy (RSS) |", "|---|---|---:|---:|---:|"]
    copy = {r["row"]: r["peak_rss_gib"] for r in rows if r["fake"] == "copy"}
    for r in rows:
        ratio = f"{r['peak_rss_gib'] / copy[r['row']]:.2f}" if r["fake"] == "lora" and r["row"] in copy else "-"
        lines.append(f"| {r['row']} | {r['fake'] or '-'} | {r['peak_rss_gib']:.2f} | {r['s_per_step']:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from trainer_overhead import ROWS

    import peers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    p.add_argument("--pipeline", default="small", help="'small' (benchmarks/peers.py's, built under --workdir) or an SD1.5-layout folder")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the children (default: inherited)")
    p.add_argument("--check", action="store_true", help="a tiny pipeline and the rows dmd2 and consistency: seconds")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/onestep-trainer-memory"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = ["dmd2", "consistency"] if args.check else [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    work = args.workdir
    if args.check:
        teacher = peers.build_sd(work / "check-sd", widths=(8, 8, 16, 16), text_hidden=16, text_layers=1, vae_widths=(8, 8, 8, 8))
    elif args.pipeline == "small":
        teacher = peers.build_sd(work / "small-sd")
    else:
        teacher = Path(args.pipeline)
    images, _, prompts = peers.write_data(work, n=16, side=args.resolution)
    results = []
    for row in rows:
        for fake in ([None] if row == "consistency" else FAKE_SCORES):
            run_dir = work / "runs" / f"{row}-{fake or 'none'}"
            print(f"{row}, fake score {fake or '-'}: {args.steps} steps ...", file=sys.stderr, flush=True)
            argv_row = argv_for(row, fake, teacher, prompts, images, run_dir / "out", args.resolution, args.batch_size, args.steps)
            rec = peers.run_side("onestep", argv_row, args.steps, run_dir, None, "as-is", args.threads)
            rec |= peers.summarise(rec, warmup=1)
            results.append({"row": row, "fake": fake, **{k: rec[k] for k in ("peak_rss_gib", "s_per_step", "startup_s", "wall_s")}})
    text = table(results)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        from bench_meta import write_rows

        write_rows(str(args.json), [r | {"teacher": str(teacher), "batch": args.batch_size, "resolution": args.resolution} for r in results])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
