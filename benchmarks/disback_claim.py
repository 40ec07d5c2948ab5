"""DisBack's claim in its own setting: a generator that starts far from the teacher.

    python benchmarks/disback_claim.py                          # gmm-ring8 from a gmm-grid25 student, seeds 0 1
    python benchmarks/disback_claim.py --seeds 0 --iterations 1000 --variants 4:200:25

DisBack (Zhang et al., 2024) claims faster convergence than its base method (here DMD2) when the
generator starts far from the teacher. The setting built here (issue 13):

- the start: a one-step MLP generator pretrained on *another* teacher (``--start-teacher``,
  default gmm-grid25: 25 blobs on a grid), by regression onto that teacher's 50-step ODE pairs;
- the target: ``--teacher`` (default gmm-ring8: 8 blobs on a ring of radius 4), whose fake
  score starts fitted to the teacher's own data (the analogue of "the fake score is a copy
  of the teacher" for an analytic teacher), for both methods;
- DMD2 (configs/gmm_dmd2.yaml) and DisBack around DMD2 (configs/gmm_disback.yaml, or
  ``--variants`` N:record:interval) from that same start, with the same seeds. Both runs get the
  same number of generator steps; DisBack's recording stage comes on top (its iterations are
  counted in "iterations").

The metric is the sliced W2 distance to the exact mixture (``onestep.eval.mixture``) of
``--samples`` fixed-seed one-step samples, measured every ``--eval-every`` generator steps.
For each seed and DisBack variant the script reports the generator steps (and iterations, the
recording stage included) DisBack needs to reach DMD2's final sliced W2, and the share of DMD2's
generator steps that is (the claim's goal: at most 0.6). "final" is DMD2's last evaluation;
the table also gives the steps to reach the mean of DMD2's last three evaluations, which is
less sensitive to one lucky evaluation.

Writes into ``--out`` (default benchmarks/disback-out): results.json, table.md,
convergence.png (sliced W2 against generator steps and against iterations) and samples.png
(the start, the teacher, and each method's final samples, seed 0). ``--reuse`` keeps the runs
already in results.json and adds the others (the picture is then samples-added.png when the
earlier runs' samples were not kept in ``--work``).
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
from quality import _load, gmm_warm_start  # noqa: E402


def evaluator(teacher: str, n: int):
    from onestep.eval.mixture import mixture_metrics
    from onestep.teachers.gmm import gmm_mixture

    mixture = gmm_mixture(teacher)

    def evaluate(tr) -> dict:
        x, _ = tr.preview_samples(n)
        m = mixture_metrics(x.float().cpu(), mixture)
        m.pop("mode_weights")
        return m

    return evaluate


def run(tr, generator_steps: int, evaluate, eval_every: int) -> list[dict]:
    """Train until ``generator_steps`` generator updates; evaluate at the start and every
    ``eval_every`` generator updates. Each point: iteration, generator steps, metrics, stage."""
    gen = 0
    curve = [{"iteration": 0, "generator_steps": 0, **evaluate(tr)}]
    while gen < generator_steps:
        step = tr.state.step
        g = int(tr.is_generator_step(step))
        tr.train_step()
        gen += g
        if g and gen % eval_every == 0:
            point = {"iteration": tr.state.step, "generator_steps": gen, **evaluate(tr)}
            if hasattr(tr, "current_target"):
                point["target"] = tr.current_target
            curve.append(point)
    return curve


def first_reach(curve: list[dict], target: float, key: str = "sliced_w2") -> dict | None:
    p = next((p for p in curve if p["generator_steps"] > 0 and p[key] <= target), None)
    return None if p is None else {"generator_steps": p["generator_steps"], "iteration": p["iteration"]}


REUSE_KEYS = ("teacher", "start_teacher", "generator_steps", "warm_steps", "samples", "eval_every")


def reusable_runs(path: Path, args) -> dict:
    """The runs of an earlier results.json made with the same settings (``{}`` if none)."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if any(old["args"].get(k) != getattr(args, k) for k in REUSE_KEYS):
        return {}
    return old["runs"]


def parse_variant(s: str) -> dict:
    n, rec, inter = (int(v) for v in s.split(":"))
    return {"disback_nodes": n, "disback_record_steps": rec, "disback_interval": inter}


def compare(dmd2: list[dict], db: list[dict], key: str = "sliced_w2") -> dict:
    base_steps = dmd2[-1]["generator_steps"]
    final = dmd2[-1][key]
    final3 = sum(p[key] for p in dmd2[-3:]) / len(dmd2[-3:])
    out = {"dmd2_final": final, "dmd2_final_mean3": final3, "dmd2_generator_steps": base_steps,
           "dmd2_first_reach": first_reach(dmd2, final, key), "disback_final": db[-1][key]}
    for name, tgt in (("final", final), ("final_mean3", final3)):
        r = first_reach(db, tgt, key)
        out[f"disback_reach_{name}"] = r
        out[f"share_{name}"] = None if r is None else round(r["generator_steps"] / base_steps, 3)
    out["dmd2_reach_final_mean3"] = first_reach(dmd2, final3, key)
    return out


def plot_convergence(results: dict, ref: float, path: Path, key: str = "sliced_w2", ylabel: str = "sliced W2 to the teacher's mixture",
                     title: str = "far start: DMD2 vs DisBack-DMD2 (DisBack's generator steps start after its recording stage)") -> None:
    """``key`` of every run's curve against generator steps and against iterations, seeds as line styles; ``ref``
    (the teacher's value) as a black line."""
    from onestep.viz import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for si, (seed, runs) in enumerate(results.items()):
        for ri, (label, r) in enumerate(runs.items()):
            c = colors[ri % len(colors)]
            ls = "-" if si == 0 else ":"
            for ax, xkey in zip(axes, ("generator_steps", "iteration")):
                xs = [p[xkey] for p in r["curve"]]
                ax.plot(xs, [p[key] for p in r["curve"]], color=c, linestyle=ls, linewidth=1, label=f"{label} (seed {seed})")
    for ax, xl in zip(axes, ("generator steps", "iterations (DisBack's recording stage included)")):
        ax.axhline(ref, color="black", linewidth=1, label="teacher 50-step DDIM")
        ax.set_xlabel(xl)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper right", ncol=2)
    fig.suptitle(title)
    _save(fig, path, dpi=110)


def plot_samples(panels: dict[str, torch.Tensor], path: Path) -> None:
    from onestep.viz import _plt, _save

    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.8 * n, 3.0))
    for ax, (label, x) in zip(axes, panels.items()):
        ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.3)
        ax.set_xlim(-6, 6)
        ax.set_ylim(-6, 6)
        ax.set_aspect("equal")
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path, dpi=110)


def table(summary: dict) -> str:
    a = summary["args"]
    lines = [
        f"teacher {a['teacher']}, generator pretrained on {a['start_teacher']}; {a['generator_steps']} generator steps per run; "
        f"sliced W2 of {a['samples']} samples (teacher 50-step DDIM: {summary['reference']['sliced_w2']:.4g}; "
        f"start: {summary['start']['sliced_w2']:.4g})\n",
        "| seed | method | N:record:interval | final sliced W2 | modes | gen. steps to DMD2's final (iterations) | share of DMD2's | "
        "to DMD2's last-3 mean (iterations) | share | seconds |",
        "|---" * 10 + "|",
    ]
    for seed, runs in summary["runs"].items():
        for label, r in runs.items():
            m = r["curve"][-1]
            if label == "dmd2":
                c = compare(r["curve"], r["curve"])
                reach, reach3 = c["dmd2_first_reach"], c["dmd2_reach_final_mean3"]
                share = share3 = "1 (base)"
                setting = "-"
            else:
                c = summary["compare"][seed][label]
                reach, reach3 = c["disback_reach_final"], c["disback_reach_final_mean3"]
                share, share3 = c["share_final"], c["share_final_mean3"]
                setting = label.split(" ", 1)[1]
            fmt = lambda r: "not reached" if r is None else f"{r['generator_steps']} ({r['iteration']})"  # noqa: E731
            lines.append(
                f"| {seed} | {label.split(' ')[0]} | {setting} | {m['sliced_w2']:.4g} | {m['modes_covered']}/{m['num_modes']} | "
                f"{fmt(reach)} | {share} | {fmt(reach3)} | {share3} | {r['seconds']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="gmm-ring8", help="the teacher to distil (gmm preset name)")
    p.add_argument("--start-teacher", default="gmm-grid25", help="the teacher the starting generator was regressed onto")
    p.add_argument("--generator-steps", type=int, default=400, help="generator steps per run (DMD2 and DisBack alike)")
    p.add_argument("--warm-steps", type=int, default=1000, help="iterations of each regression warm start")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=["preset"],
                   help="DisBack settings as N:record_steps:interval, or 'preset' (configs/gmm_disback.yaml)")
    p.add_argument("--samples", type=int, default=3000, help="fixed-seed samples per evaluation")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate every N generator steps")
    p.add_argument("--out", default="benchmarks/disback-out")
    p.add_argument("--reuse", action="store_true", help="keep the runs (seed, method, setting) already in --out's results.json "
                   "when it was made with the same teacher, start, steps, samples and evaluation interval; run only the others")
    p.add_argument("--work", default=None, help="folder for the warm starts (reused when present) and run folders "
                   "(default: a fresh temporary folder, removed at the end)")
    args = p.parse_args()

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="disback-claim-")
    work = Path(args.work or tmp.name)
    start_time = time.time()
    from onestep.eval.mixture import mixture_metrics
    from onestep.samplers.student import teacher_sample_from_seeds
    from onestep.teachers import load_teacher
    from onestep.teachers.gmm import gmm_mixture
    from onestep.trainers import load_config
    from safetensors.torch import load_file, save_file

    t = load_teacher(args.teacher)
    ref_x = teacher_sample_from_seeds(t.denoiser(), t, range(args.samples), num_steps=50, guidance_scale=t.guidance_scale).float().cpu()
    reference = mixture_metrics(ref_x, gmm_mixture(args.teacher))
    reference.pop("mode_weights")

    g_path, _ = gmm_warm_start(args.teacher, work / f"warm-{args.start_teacher}", args.warm_steps, pairs_from=args.start_teacher)
    _, f_path = gmm_warm_start(args.teacher, work / f"warm-{args.teacher}", args.warm_steps)
    far = {"init_generator": str(g_path), "init_fake_score": str(f_path), "regression_warmup_steps": 0}
    evaluate = evaluator(args.teacher, args.samples)

    # the starting generator's samples (the same for every run)
    tr0 = _load("gmm_dmd2", args.teacher, work / "start", {**far, "max_steps": 1})
    panels: dict[str, torch.Tensor] = {f"start (from {args.start_teacher})": tr0.preview_samples(args.samples)[0].float().cpu(),
                                       f"teacher {args.teacher}": ref_x}
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(args),
        "reference": reference,
        "start": evaluate(tr0),
        "runs": {},
        "compare": {},
    }
    runs, compare_all = summary["runs"], summary["compare"]
    picture = "samples.png"

    def write() -> None:
        summary["seconds"] = round(time.time() - start_time, 1)  # of this invocation (each run has its own)
        (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (out / "table.md").write_text(table(summary))
        plot_convergence(runs, reference["sliced_w2"], out / "convergence.png")
        plot_samples(panels, out / picture)

    c = load_config("gmm_disback", {"teacher": args.teacher})
    preset_setting = f"{c.disback_nodes}:{c.disback_record_steps}:{c.disback_interval}"
    earlier = reusable_runs(out / "results.json", args) if args.reuse else {}
    for seed in args.seeds:
        runs[seed], compare_all[seed] = {}, {}
        jobs = [("dmd2", "gmm_dmd2", {})] + [
            (f"disback-dmd2 {v}" if v != "preset" else f"disback-dmd2 {preset_setting}", "gmm_disback", {} if v == "preset" else parse_variant(v))
            for v in args.variants
        ]
        if args.reuse:  # also keep the earlier run's other variants
            jobs += [(k, None, None) for k in earlier.get(str(seed), {}) if k not in {j[0] for j in jobs}]
        for label, preset, extra in jobs:
            samples_file = work / f"samples-seed{seed}-{label.replace(' ', '_').replace(':', '-')}.safetensors"
            if label in earlier.get(str(seed), {}):
                runs[seed][label] = earlier[str(seed)][label]
                if label != "dmd2":
                    compare_all[seed][label] = compare(runs[seed]["dmd2"]["curve"], runs[seed][label]["curve"])
                if seed == args.seeds[0]:
                    if samples_file.is_file():
                        panels[label] = load_file(str(samples_file))["x"]
                    else:  # an earlier run whose samples were not kept: keep the earlier samples.png too
                        picture = "samples-added.png"
                print(f"seed {seed} {label:28s} reused from {out / 'results.json'}", flush=True)
                continue
            if preset is None:
                continue
            t0 = time.time()
            tr = _load(preset, args.teacher, work / f"seed{seed}" / label.replace(" ", "_").replace(":", "-"),
                       {**far, **extra, "seed": seed, "max_steps": 10**6})
            curve = run(tr, args.generator_steps, evaluate, args.eval_every)
            runs[seed][label] = {"curve": curve, "seconds": round(time.time() - t0, 1)}
            if label != "dmd2":
                compare_all[seed][label] = compare(runs[seed]["dmd2"]["curve"], curve)
            if seed == args.seeds[0]:
                panels[label] = tr.preview_samples(args.samples)[0].float().cpu()
                save_file({"x": panels[label].contiguous()}, str(samples_file))
            last = curve[-1]
            print(f"seed {seed} {label:28s} sliced_w2 {last['sliced_w2']:.4f} modes {last['modes_covered']}/{last['num_modes']} "
                  f"({runs[seed][label]['seconds']:.0f} s)", flush=True)
            write()  # everything so far, rewritten after each run
    write()
    print(table(summary))
    print(f"total {summary['seconds']:.0f} s; wrote {out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
