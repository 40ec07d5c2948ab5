"""Mode coverage: can a divergence bring back the modes a one-step student has dropped?

    python benchmarks/mode_coverage.py                  # the default run (~25 min on 2 shared CPU cores)
    python benchmarks/mode_coverage.py --iterations 400 --eval-every 100 --out /tmp/mc   # a quick look

f-distill's claim: mode-seeking reverse KL (DMD2's gradient, h = 1) keeps a student that
misses modes stuck there, while Jensen-Shannon (h = r / (r + 1)) and forward KL (h = r)
upweight samples where the teacher's density exceeds the student's and so recover them.

The start that misses modes. The teacher is ``gmm-ring8-unbalanced`` (8 modes on a ring, weights
1..8 / 36). A second, *restricted* teacher keeps only ``--keep-modes`` of its components (their
means, stds and weights, renormalised) and is registered for this process only as
``gmm-ring8-unbalanced-half``. The shared warm start is built exactly as in
``benchmarks/quality.py`` (the ``gmm_disback`` preset run for ``--warm-steps`` iterations of the
regression warm start alone), but against the restricted teacher: the MLP generator is regressed
onto the restricted teacher's ODE pairs and the fake score is fitted to the restricted teacher's
data. So every method starts from a generator that puts all its mass on the kept modes, with a
fake score that already describes that generator (the state of a run that has dropped modes).

Then each method trains against the *full* teacher from those weights (``init_generator`` /
``init_fake_score``), the same iterations and seed (the preset's, 0), evaluated every
``--eval-every`` iterations on fixed-seed samples with the exact mixture metrics
(``onestep.eval.mixture``) plus ``missing_share``: the share of on-mode samples held by the
dropped modes (the teacher's value is the dropped modes' total weight).

Methods (all from ``configs/gmm_fdistill_js.yaml`` unless stated; only ``divergence`` differs,
so the discriminator, GAN terms and update ratio are identical):

- ``fdistill-js``: divergence ``js``;
- ``fdistill-fkl``: divergence ``forward_kl``;
- ``fdistill-rkl``: divergence ``reverse_kl`` (h = 1: DMD2's gradient, with the same GAN terms);
- ``dmd2``: the ``gmm_dmd2`` preset (DMD2 without a GAN term), for reference.

Writes into ``--out`` (default benchmarks/mode-coverage-out): results.json, table.md,
curves.png (modes covered, missing share, TV, sliced W2 against iterations) and samples.png
(the teacher, the start, and every method at a few iterations).
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
from quality import _load, _student_samples, gmm_warm_start, teacher_reference  # noqa: E402

TEACHER = "gmm-ring8-unbalanced"
HALF = "gmm-ring8-unbalanced-half"
#: label -> (preset, overrides)
METHODS = {
    "fdistill-rkl": ("gmm_fdistill_js", {"divergence": "reverse_kl"}),
    "fdistill-js": ("gmm_fdistill_js", {"divergence": "js"}),
    "fdistill-fkl": ("gmm_fdistill_js", {"divergence": "forward_kl"}),
    "dmd2": ("gmm_dmd2", {}),
}


def register_half_teacher(keep: list[int]) -> None:
    """Add the restricted mixture to the gmm presets of this process (nothing is written to disk)."""
    from onestep.teachers.gmm import GMM_PRESETS, gmm_mixture

    means, stds, weights = gmm_mixture(TEACHER)
    idx = torch.tensor(keep)
    w = weights[idx]
    GMM_PRESETS[HALF] = (means[idx].clone(), stds[idx].clone(), w / w.sum())


def evaluate(x: torch.Tensor, mixture, dropped: list[int]) -> dict:
    from onestep.eval.mixture import mixture_metrics

    m = mixture_metrics(x, mixture)
    mw = m.pop("mode_weights")
    m["missing_share"] = round(sum(mw[k] for k in dropped), 4)
    m["mode_weights"] = mw
    return m


def train(label: str, init: dict, iterations: int, eval_every: int, n: int, mixture, dropped, snap_at: set[int], out: Path, seed: int):
    preset, overrides = METHODS[label]
    tr = _load(preset, TEACHER, out / "runs" / label, {**init, **overrides, "max_steps": iterations, "regression_warmup_steps": 0, "seed": seed})
    x0 = _student_samples(tr, n)[0]
    curve = [{"iteration": 0, "generator_steps": 0, **evaluate(x0, mixture, dropped)}]
    snaps = {0: x0}
    gen_steps = 0
    start = time.time()
    for _ in range(iterations):
        gen_steps += int(tr.is_generator_step(tr.state.step))
        tr.train_step()
        it = tr.state.step
        if it % eval_every == 0 or it == iterations:
            x = _student_samples(tr, n)[0]
            curve.append({"iteration": it, "generator_steps": gen_steps, **evaluate(x, mixture, dropped)})
            if it in snap_at:
                snaps[it] = x
            p = curve[-1]
            print(f"  {label:13s} it {it:5d}  modes {p['modes_covered']}/8  missing_share {p['missing_share']:.3f}  tv {p['tv']:.3f}  swd {p['sliced_w2']:.3f}", flush=True)
    return curve, snaps, time.time() - start


def plot_curves(result: dict, path: Path) -> None:
    from onestep.viz import _plt, _save

    plt = _plt()
    keys = ("modes_covered", "missing_share", "tv", "sliced_w2")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    ref = result["reference"]
    for ax, key in zip(axes, keys):
        for label, r in result["methods"].items():
            ax.plot([p["iteration"] for p in r["curve"]], [p[key] for p in r["curve"]], marker=".", label=label)
        ax.axhline(ref[key], color="black", linewidth=1, label="teacher 50-step")
        ax.set_xlabel("iterations")
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
    axes[3].set_yscale("log")
    axes[0].legend(fontsize=8)
    _save(fig, path, dpi=80)


def plot_samples(teacher_x: torch.Tensor, start_x: torch.Tensor, snaps: dict, path: Path, means: torch.Tensor, dropped: list[int]) -> None:
    from onestep.viz import _plt, _save

    plt = _plt()
    its = sorted({i for s in snaps.values() for i in s if i > 0})
    rows, cols = len(snaps), 1 + len(its)
    fig, axes = plt.subplots(rows + 1, cols, figsize=(2.2 * cols, 2.3 * (rows + 1)), squeeze=False)

    def draw(ax, x, title):
        ax.scatter(x[:, 0], x[:, 1], s=0.4, alpha=0.3)
        ax.scatter(means[dropped, 0], means[dropped, 1], marker="x", color="red", s=20, linewidths=1)
        ax.set_xlim(-6, 6)
        ax.set_ylim(-6, 6)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=8)

    for ax in axes[0]:
        ax.axis("off")
    draw(axes[0][0], teacher_x, "teacher 50-step")
    axes[0][1].axis("on")
    draw(axes[0][1], start_x, "start (all methods)")
    for r, (label, s) in enumerate(snaps.items(), start=1):
        axes[r][0].axis("off")
        axes[r][0].text(0.5, 0.5, label, ha="center", va="center", fontsize=10)
        for c, it in enumerate(its, start=1):
            if it in s:
                draw(axes[r][c], s[it], f"{label} it {it}")
            else:
                axes[r][c].axis("off")
    fig.suptitle("red x: the dropped modes", fontsize=9)
    _save(fig, path, dpi=70)


def table(result: dict, dropped_weight: float) -> str:
    cols = ("modes_covered", "missing_share", "tv", "within_3std", "sliced_w2")
    lines = ["| row | iterations (gen. steps) | " + " | ".join(cols) + " | seconds |", "|---" * (len(cols) + 3) + "|"]
    fmt = lambda m, c: f"{m[c]}/{m['num_modes']}" if c == "modes_covered" else f"{m[c]:.4g}"  # noqa: E731
    ref = result["reference"]
    lines.append("| teacher 50-step DDIM | - | " + " | ".join(fmt(ref, c) for c in cols) + " | - |")
    s = result["start"]
    lines.append("| start (half-mode warm start) | 0 | " + " | ".join(fmt(s, c) for c in cols) + " | - |")
    for label, r in result["methods"].items():
        m = r["final"]
        lines.append(f"| {label} | {m['iteration']} ({m['generator_steps']}) | " + " | ".join(fmt(m, c) for c in cols) + f" | {r['seconds']} |")
    lines.append(f"\n(true weight of the dropped modes: {dropped_weight:.4f})\n")
    lines.append("modes covered every eval (iteration: " + " ".join(str(p["iteration"]) for p in next(iter(result["methods"].values()))["curve"]) + "):\n")
    for label, r in result["methods"].items():
        lines.append(f"- {label}: " + " ".join(str(p["modes_covered"]) for p in r["curve"]))
    lines.append("\nmissing_share every eval:\n")
    for label, r in result["methods"].items():
        lines.append(f"- {label}: " + " ".join(f"{p['missing_share']:.3f}" for p in r["curve"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--keep-modes", nargs="+", type=int, default=[4, 5, 6, 7],
                   help="components of gmm-ring8-unbalanced the start covers (default: the 4 heaviest, weights 5..8 / 36)")
    p.add_argument("--iterations", type=int, default=800, help="iterations per method (fake-score and generator steps together)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--warm-steps", type=int, default=400, help="iterations of the half-mode regression warm start")
    p.add_argument("--samples", type=int, default=2000, help="fixed-seed samples per evaluation")
    p.add_argument("--seed", type=int, default=0, help="training seed, the same for the warm start and every method")
    p.add_argument("--out", default="benchmarks/mode-coverage-out")
    p.add_argument("--work", default="/tmp/mode-coverage-work", help="run folders and the warm-start weights (not kept in --out)")
    args = p.parse_args()

    from onestep.teachers.gmm import gmm_mixture

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.time()
    mixture = gmm_mixture(TEACHER)
    dropped = [k for k in range(len(mixture[2])) if k not in args.keep_modes]
    dropped_weight = float(mixture[2][dropped].sum())
    register_half_teacher(args.keep_modes)

    ref, ref_x = teacher_reference(TEACHER, args.samples)
    ref = evaluate(ref_x, mixture, dropped)
    print(f"teacher 50-step: modes {ref['modes_covered']}/8 missing_share {ref['missing_share']:.3f} tv {ref['tv']:.3f}", flush=True)
    w0 = time.time()
    g_path, f_path = gmm_warm_start(HALF, Path(args.work) / "warm", args.warm_steps, seed=args.seed)
    warm_seconds = time.time() - w0
    init = {"init_generator": str(g_path), "init_fake_score": str(f_path)}

    snap_at = {args.iterations // 4 // args.eval_every * args.eval_every, args.iterations // 2 // args.eval_every * args.eval_every, args.iterations}
    result = {"reference": ref, "methods": {}}
    snaps, start_x = {}, None
    for label in args.methods:
        curve, s, secs = train(label, init, args.iterations, args.eval_every, args.samples, mixture, dropped, snap_at, Path(args.work), args.seed)
        if start_x is None:
            start_x, result["start"] = s[0], curve[0]
        elif not torch.equal(start_x, s[0]):
            print(f"warning: {label} did not start from the same samples as the first method", flush=True)
        s.pop(0)
        snaps[label] = s
        result["methods"][label] = {"final": curve[-1], "curve": curve, "seconds": round(secs, 1)}
        # written after every method, so that an interrupted run keeps what it has measured
        plot_curves(result, out / "curves.png")
        plot_samples(ref_x, start_x, snaps, out / "samples.png", mixture[0], dropped)
        summary = {
            "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
            "seconds": round(time.time() - t0, 1),
            "warm_start_seconds": round(warm_seconds, 1),
            "args": vars(args),
            "dropped_modes": dropped,
            "dropped_weight": dropped_weight,
            "results": result,
        }
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        md = table(result, dropped_weight)
        (out / "table.md").write_text(md)
    print(md)
    print(f"total {summary['seconds']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
