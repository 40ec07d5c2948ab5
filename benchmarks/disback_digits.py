"""DisBack's claim on digits: a one-step generator that starts far from the teacher (issue 13).

    OMP_NUM_THREADS=1 python benchmarks/disback_digits.py --out benchmarks/disback-digits-out     # about 40 min on one thread
    python benchmarks/disback_digits.py --seeds 0 --generator-steps 200 --variants 4:100:25      # a shorter look

The paper's setting is a generator pretrained on another teacher; benchmarks/disback_claim.py builds it on the
gmm mixtures, this script on the digits teacher:

- the start: the quickstart's generator (the digits teacher's UNet read at t = 600) regressed onto the teacher's
  50-step ODE digits *transposed* (mirrored about the diagonal), ``--start-steps`` iterations of DMD's regression
  warm start on ``--pairs`` noise / sample pairs: a one-step generator of another image distribution, which
  starts every run below (``init_generator``); the fake score starts as the teacher's copy, as in the quickstart;
- from that start: DMD2 (configs/digits_dmd2.yaml, the quickstart's preset) and DisBack around it (the same
  config with ``method: disback-dmd2`` and each ``--variants`` N:record:interval), same seeds, the same
  number of generator steps; DisBack's recording stage comes on top (counted in "iterations").

Metric: digits-FID (the project's digits classifier features, against the 1797 real digits) of ``--samples``
fixed-seed one-step samples of the generator an export would hold (EMA weights), every ``--eval-every``
generator steps. Reported per seed and variant: the generator steps (iterations) DisBack needs to reach DMD2's
final digits-FID and the mean of its last three evaluations, and that share of DMD2's steps (the claim's goal:
at most 0.6). Writes results.json, table.md, convergence.png and samples.png into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from disback_claim import compare, parse_variant, plot_convergence, run  # noqa: E402
from quality import _load  # noqa: E402

PRESET = "digits_dmd2"


def far_start(work: Path, steps: int, pairs: int, seed: int = 0) -> Path:
    """The generator regressed onto transposed teacher digits (cached in ``work``)."""
    from onestep.weights import save_trainable

    path = work / "far-generator.safetensors"
    if path.is_file():
        return path
    tr = _load(PRESET, "digits", work / "start", {"max_steps": steps, "regression_warmup_steps": steps, "regression_pairs": pairs,
                                                  "lr_regression": 5e-4, "seed": seed, "ema_decay": 0.0})
    z, x, cond = tr.warm_start.make_pairs()
    tr.warm_start._pairs = (z, x.transpose(-1, -2).contiguous(), cond)  # the other "teacher": its digits mirrored
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc="far start (transposed digits)", leave=False):
        tr.train_step()
    work.mkdir(parents=True, exist_ok=True)
    save_trainable(tr.generator.backbone, path)
    return path


def evaluator(n: int):
    from onestep.eval import digits_fid

    def evaluate(tr) -> dict:
        x, _ = tr.preview_samples(n)
        return {"fid": float(digits_fid(x.float().cpu()))}

    return evaluate


def table(summary: dict) -> str:
    a = summary["args"]
    fmt = lambda r: "not reached" if r is None else f"{r['generator_steps']} ({r['iteration']})"  # noqa: E731
    lines = [
        f"digits teacher, generator started on transposed digits (digits-FID {summary['start']['fid']:.3f}); teacher 50-step DDIM "
        f"{summary['teacher_fid']:.3f}; {a['generator_steps']} generator steps per run; {a['samples']} samples per evaluation\n",
        "| seed | method | N:record:interval | final digits-FID | gen. steps to DMD2's final (iterations) | share | "
        "to DMD2's last-3 mean (iterations) | share | seconds |",
        "|---" * 9 + "|",
    ]
    for seed, by_label in summary["runs"].items():
        for label, r in by_label.items():
            if label == "dmd2":
                c = compare(r["curve"], r["curve"], "fid")
                reach, reach3, share, share3, setting = c["dmd2_first_reach"], c["dmd2_reach_final_mean3"], "1 (base)", "1 (base)", "-"
            else:
                c = summary["compare"][seed][label]
                reach, reach3, share, share3 = c["disback_reach_final"], c["disback_reach_final_mean3"], c["share_final"], c["share_final_mean3"]
                setting = label.split(" ", 1)[1]
            lines.append(f"| {seed} | {label.split(' ')[0]} | {setting} | {r['curve'][-1]['fid']:.3f} | {fmt(reach)} | {share} | "
                         f"{fmt(reach3)} | {share3} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator-steps", type=int, default=400, help="generator steps per run (DMD2 and DisBack alike)")
    p.add_argument("--start-steps", type=int, default=800, help="iterations of regression onto transposed digits for the start")
    p.add_argument("--pairs", type=int, default=2048, help="noise / transposed-sample pairs of that regression")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=["4:100:25"], help="DisBack settings as N:record_steps:interval")
    p.add_argument("--samples", type=int, default=500, help="fixed-seed samples per digits-FID")
    p.add_argument("--eval-every", type=int, default=25, help="evaluate every N generator steps")
    p.add_argument("--out", type=Path, default=Path("benchmarks/disback-digits-out"))
    p.add_argument("--work", type=Path, default=None, help="folder for the start and the runs (default: a temporary folder)")
    args = p.parse_args(argv)

    from onestep.eval import digits_fid
    from onestep.samplers.student import teacher_sample_from_seeds
    from onestep.teachers import load_teacher
    from onestep.viz import save_samples_picture

    start_time = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="disback-digits-")
    work = args.work or Path(tmp.name)
    t = load_teacher("digits")
    labels = [i % 10 for i in range(args.samples)]  # the trainer's preview labels
    teacher_x = teacher_sample_from_seeds(t.denoiser(), t, range(args.samples), labels, 50, t.guidance_scale).float().cpu()
    start = far_start(work, args.start_steps, args.pairs)
    evaluate = evaluator(args.samples)
    far = {"init_generator": str(start)}
    tr0 = _load(PRESET, "digits", work / "start-eval", {**far, "max_steps": 1})
    panels = {"start (transposed digits)": tr0.preview_samples(20)[0], "teacher, 50 steps": teacher_x[:20]}
    summary = {"machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "command": "python benchmarks/disback_digits.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "teacher_fid": float(digits_fid(teacher_x)), "start": evaluate(tr0), "runs": {}, "compare": {}}
    for seed in args.seeds:
        summary["runs"][seed], summary["compare"][seed] = {}, {}
        jobs = [("dmd2", {})] + [(f"disback-dmd2 {v}", {"method": "disback-dmd2", **parse_variant(v)}) for v in args.variants]
        for label, extra in jobs:
            t0 = time.time()
            tr = _load(PRESET, "digits", work / f"seed{seed}" / label.replace(" ", "_").replace(":", "-"),
                       {**far, **extra, "seed": seed, "max_steps": 10**6})
            curve = run(tr, args.generator_steps, evaluate, args.eval_every)
            summary["runs"][seed][label] = {"curve": curve, "seconds": round(time.time() - t0, 1)}
            if label != "dmd2":
                summary["compare"][seed][label] = compare(summary["runs"][seed]["dmd2"]["curve"], curve, "fid")
            if seed == args.seeds[0]:
                panels[label] = tr.preview_samples(20)[0]
            print(f"seed {seed} {label:24s} digits-FID {curve[-1]['fid']:.3f} ({time.time() - t0:.0f} s)", flush=True)
            summary["seconds"] = round(time.time() - start_time, 1)
            (args.out / "results.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
            (args.out / "table.md").write_text(f"Command: `{summary['command']}`\n\n" + table(summary))
            plot_convergence(summary["runs"], summary["teacher_fid"], args.out / "convergence.png", key="fid", ylabel="digits-FID",
                             title="digits from a far start (a generator of transposed digits): DMD2 vs DisBack-DMD2")
    grid = torch.cat([x[:20].float().cpu() for x in panels.values()])
    save_samples_picture(grid, args.out / "samples.png", title="rows of 10: " + " | ".join(panels), nrow=10)
    print(table(summary))
    if tmp is not None:
        tmp.cleanup()
    return summary


if __name__ == "__main__":
    main()
