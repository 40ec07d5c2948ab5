"""Quality benchmark: every score-distillation method on the exact gmm teachers and on digits.

    python benchmarks/quality.py                       # the full benchmark, two runs at a time (2 CPU cores)
    python benchmarks/quality.py --teachers gmm-ring8-unbalanced --methods dmd2 fdistill-js --iterations 600

For each teacher and method, with fixed seeds, it trains a one-step student and evaluates
it every ``--eval-every`` iterations on fixed-seed samples (EMA weights when the preset
uses EMA):

- gmm teachers: mode coverage, mode-weight TV, share within 3 std, sliced W2 (exact
  metrics, onestep.eval.mixture), against the teacher's own 50-step DDIM samples (the
  reference row);
- digits: digits-FID (onestep.eval.digits_fid, against the bundled real digits), k-NN
  precision and recall (k = 3, onestep.eval.precision_recall) on the same features against the
  same real digits (a mode-seeking student shows as a low recall), and class accuracy of
  conditional samples, against the teacher's 50-step guided samples.

gmm runs share one warm start per teacher (trained once, then given to every method with
``init_generator`` / ``init_fake_score``): the MLP generator regressed onto teacher ODE
pairs, and the fake score fitted to the teacher's own data, so that every method starts
where a neural teacher's would (fake score = teacher, generator close to the teacher's ODE).
Digits runs start from the teacher's weights.

Writes into ``--out`` (default benchmarks/quality-out): results.json, table.md,
convergence-<teacher>.png (metric against generator steps, DisBack beside its base),
samples-<teacher>.png (scatter plots or digit grids of the final students). Each teacher's table
names every student's sampling steps (consistency-style students sample in their presets'
own), its metric as a ratio to the teacher's and the seconds of its run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

GMM_TEACHERS = ("gmm-ring8-unbalanced", "gmm-grid25")
#: method label -> (preset stem without the teacher prefix, overrides)
METHODS = {
    "dmd2": ("dmd2", {}),
    "vsd": ("vsd", {}),
    "fdistill-js": ("fdistill_js", {}),
    "fdistill-fkl": ("fdistill_js", {"divergence": "forward_kl"}),
    "sid": ("sid", {}),
    "disback-dmd2": ("disback", {}),
    # consistency-style students (digits rows only: the gmm rows share a generator + fake-score warm start),
    # sampled in their presets' own steps
    "lcm": ("lcm", {}),
    "scm": ("scm", {}),
    "ctm": ("ctm", {}),
    "boot": ("boot", {}),
}
DIGITS_METHODS = ("dmd2", "vsd", "fdistill-js", "sid", "disback-dmd2", "lcm", "scm", "ctm", "boot")
#: the gmm rows: score distillation from the shared warm start (generator and fake score), where a gmm preset exists
GMM_METHODS = ("dmd2", "vsd", "fdistill-js", "fdistill-fkl", "sid", "disback-dmd2")



def _load(preset: str, teacher: str, out: Path, overrides: dict):
    from onestep.trainers import load_config, make_trainer

    # overwrite: a rerun into the same folder (the benchmarks that reuse a --work folder) replaces that run
    values = {"log_with": "none", "export": False, "checkpoint_every": 0, "preview_every": 0, "teacher": teacher, "overwrite": True}
    values.update(overrides)
    return make_trainer(load_config(preset, values, output_dir=str(out)))


def gmm_warm_start(teacher: str, out: Path, steps: int, seed: int = 0, pairs_from: str | None = None) -> tuple[Path, Path]:
    """DisBack's stage 0 run alone: the generator regressed onto teacher ODE pairs and the fake score
    fitted to the teacher's data; returns the two safetensors files (cached in ``out``). The gmm rows
    here, ``mode_coverage.py`` and ``disback_claim.py`` all start from it. With ``pairs_from`` another
    teacher, the pairs are that teacher's (a generator pretrained on it, in the network ``teacher``'s
    students use, so that it loads as their start)."""
    from onestep.teachers import load_teacher
    from onestep.weights import save_trainable

    g_path, f_path = out / "warm-generator.safetensors", out / "warm-fake.safetensors"
    if g_path.is_file() and f_path.is_file():
        return g_path, f_path
    # Regression is plain supervised learning: it takes a 10x larger step than distillation does.
    tr = _load("gmm_disback", teacher, out / "warm", {"max_steps": steps, "regression_warmup_steps": steps, "lr_generator": 1e-3, "seed": seed})
    if pairs_from is not None and pairs_from != teacher:
        own = tr.teacher
        tr.teacher = load_teacher(pairs_from).denoiser().to(tr.device)
        tr.warm_start._pairs = tr.warm_start.make_pairs()  # noise -> the other teacher's ODE sample
        tr.teacher = own
    _run(tr, steps, desc=f"{teacher} warm start")
    out.mkdir(parents=True, exist_ok=True)
    save_trainable(tr.generator.backbone, g_path)
    save_trainable(tr.fake.backbone, f_path)
    return g_path, f_path


def _run(tr, iterations: int, desc: str, evaluate=None, eval_every: int = 0) -> list[dict]:
    from tqdm.auto import tqdm

    curve, gen_steps = [], 0
    for _ in tqdm(range(iterations), desc=desc, leave=False):
        step = tr.state.step
        gen_steps += int(tr.is_generator_step(step))
        tr.train_step()
        if evaluate is not None and eval_every and (tr.state.step % eval_every == 0 or tr.state.step == iterations):
            curve.append({"iteration": tr.state.step, "generator_steps": gen_steps, **evaluate(tr)})
    return curve


def _student_samples(tr, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    x, cond = tr.preview_samples(n)
    return x.float().cpu(), None if cond is None else cond.cpu()


def gmm_evaluator(mixture, n: int):
    from onestep.eval.mixture import mixture_metrics

    def evaluate(tr) -> dict:
        x, _ = _student_samples(tr, n)
        m = mixture_metrics(x, mixture)
        m.pop("mode_weights")
        return m

    return evaluate


def digits_scores(x: torch.Tensor, labels: torch.Tensor) -> dict:
    """digits-FID, k-NN precision and recall (k = 3) against the real digits, and class accuracy."""
    from onestep.digits import classify_digits, digits_dataset
    from onestep.eval import digits_features, digits_fid
    from onestep.eval.precision_recall import precision_recall

    pr = precision_recall(digits_features(x), digits_features(digits_dataset()[0]))
    acc = float((torch.as_tensor(classify_digits(x)) == torch.as_tensor(labels)).float().mean())
    return {"digits_fid": digits_fid(x), "precision": pr["precision"], "recall": pr["recall"], "class_accuracy": acc}


def digits_evaluator(n: int):
    def evaluate(tr) -> dict:
        x, cond = _student_samples(tr, n)
        return digits_scores(x, cond)

    return evaluate


def teacher_reference(teacher_name: str, n: int) -> tuple[dict, torch.Tensor]:
    """The teacher's 50-step DDIM samples (guided for digits), scored like the students."""
    from onestep.samplers.student import teacher_sample_from_seeds
    from onestep.teachers import load_teacher

    t = load_teacher(teacher_name)
    labels = [i % 10 for i in range(n)] if t.conditioning.kind == "class" else None
    x = teacher_sample_from_seeds(t.denoiser(), t, range(n), labels=labels, num_steps=50, guidance_scale=t.guidance_scale, progress=True)
    x = x.float().cpu()
    if teacher_name.startswith("gmm"):
        from onestep.eval.mixture import mixture_metrics
        from onestep.teachers.gmm import gmm_mixture

        m = mixture_metrics(x, gmm_mixture(teacher_name))
        m.pop("mode_weights")
        return m, x
    return digits_scores(x, torch.tensor(labels)), x


def prepare_teacher(teacher: str, n_eval: int, warm_steps: int, out: Path) -> tuple[dict, torch.Tensor, dict]:
    """The teacher's reference scores and samples, and the overrides every method's run on it takes
    (gmm: the shared warm start, trained once)."""
    ref, ref_x = teacher_reference(teacher, n_eval)
    if not teacher.startswith("gmm"):
        return ref, ref_x, {}
    g_path, f_path = gmm_warm_start(teacher, out / teacher, warm_steps)
    return ref, ref_x, {"init_generator": str(g_path), "init_fake_score": str(f_path), "regression_warmup_steps": 0}


def run_method(teacher: str, label: str, iterations: int, eval_every: int, n_eval: int, overrides_all: dict, out: Path, threads: int = 0):
    """Train one method on one teacher (evaluated along the way); returns its result and final samples."""
    if threads:
        torch.set_num_threads(threads)
    if teacher.startswith("gmm"):
        from onestep.teachers.gmm import gmm_mixture

        evaluate = gmm_evaluator(gmm_mixture(teacher), n_eval)
    else:
        evaluate = digits_evaluator(n_eval)
    stem, overrides = METHODS[label]
    start = time.time()
    prefix = "gmm" if teacher.startswith("gmm") else "digits"
    tr = _load(f"{prefix}_{stem}", teacher, out / teacher / label, {**overrides_all, **overrides, "max_steps": iterations})
    curve = _run(tr, iterations, f"{teacher} {label}", evaluate, eval_every)
    seconds = time.time() - start
    final = _student_samples(tr, n_eval)[0]
    result = {"final": curve[-1], "curve": curve, "seconds": round(seconds, 1), "sampling_steps": len(tr.export_timesteps())}
    print(f"{teacher:22s} {label:14s} {json.dumps({k: _r(v) for k, v in curve[-1].items()})}  ({seconds:.0f} s)", flush=True)
    return result, final


def run_all(runs: dict[str, list[str]], iterations: dict[str, int], n_eval: dict[str, int], evals: int, warm_steps: int, out: Path, jobs: int) -> dict:
    """Every (teacher, method) run, ``jobs`` at a time (each in its own process on one thread when ``jobs > 1``);
    then each teacher's convergence and samples pictures."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    prepared = {t: prepare_teacher(t, n_eval[t], warm_steps, out) for t in runs}
    tasks = [(t, m, iterations[t], max(1, iterations[t] // evals), n_eval[t], prepared[t][2], out) for t, ms in runs.items() for m in ms]
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            done = list(pool.map(run_method, *zip(*tasks), [1] * len(tasks)))
    else:
        done = [run_method(*task) for task in tasks]
    results = {}
    for t in runs:
        ref, ref_x, _ = prepared[t]
        mine = [(task[1], d) for task, d in zip(tasks, done) if task[0] == t]
        results[t] = {"reference": ref, "methods": {label: r for label, (r, _) in mine}}
        _plot_convergence(t, results[t], out / f"convergence-{t}.png")
        _plot_samples(t, {"teacher 50-step": ref_x, **{label: x for label, (_, x) in mine}}, out / f"samples-{t}.png")
    return results


def _r(v):
    return round(v, 4) if isinstance(v, float) else v


def _plot_convergence(teacher: str, result: dict, path: Path) -> None:
    from onestep.viz import _plt, _save

    plt = _plt()
    keys = ("sliced_w2", "tv") if teacher.startswith("gmm") else ("digits_fid", "class_accuracy")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, keys):
        for label, r in result["methods"].items():
            xs = [p["generator_steps"] for p in r["curve"]]
            ys = [p[key] for p in r["curve"]]
            ax.plot(xs, ys, marker=".", label=label, linestyle="--" if label.startswith("disback") else "-")
        ax.axhline(result["reference"][key], color="black", linewidth=1, label="teacher 50-step")
        ax.set_xlabel("generator steps")
        ax.set_ylabel(key)
        if key in ("sliced_w2", "digits_fid"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{teacher}: convergence (DisBack's curve starts after its recording stage)")
    _save(fig, path, dpi=110)


def _plot_samples(teacher: str, finals: dict[str, torch.Tensor], path: Path) -> None:
    from onestep.viz import _plt, _save, tile

    plt = _plt()
    n = len(finals)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9))
    for ax, (label, x) in zip(axes, finals.items()):
        if teacher.startswith("gmm"):
            ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.3)
            ax.set_xlim(-6, 6)
            ax.set_ylim(-6, 6)
            ax.set_aspect("equal")
        else:
            ax.imshow(tile(x[:50], nrow=10), cmap="gray", vmin=0, vmax=255)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path, dpi=110)


def table(results: dict) -> str:
    lines = []
    for teacher, res in results.items():
        gmm = teacher.startswith("gmm")
        cols = ("modes_covered", "tv", "within_3std", "sliced_w2") if gmm else ("digits_fid", "precision", "recall", "class_accuracy")
        key = "sliced_w2" if gmm else "digits_fid"
        head = ["method", "steps", f"{key} ratio", *cols, "gen. updates", "seconds"]
        lines += [f"\n**{teacher}**\n", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        ref = res["reference"]
        fmt = lambda m, c: f"{m[c]}/{m['num_modes']}" if c == "modes_covered" else ("-" if c not in m else f"{m[c]:.4g}")  # noqa: E731
        lines.append("| teacher, DDIM | 50 | 1 | " + " | ".join(fmt(ref, c) for c in cols) + " | - | - |")
        for label, r in res["methods"].items():
            m = r["final"]
            lines.append(
                f"| {label} | {r.get('sampling_steps', 1)} | {m[key] / ref[key]:.2f} | " + " | ".join(fmt(m, c) for c in cols)
                + f" | {m['generator_steps']} | {r['seconds']} |"
            )
    return "\n".join(lines) + "\n"


def disback_speedup(results: dict) -> dict:
    """Generator steps DisBack needs to reach its base's final metric, as a share of the base's."""
    out = {}
    for teacher, res in results.items():
        key = "sliced_w2" if teacher.startswith("gmm") else "digits_fid"
        base, db = res["methods"].get("dmd2"), res["methods"].get("disback-dmd2")
        if not base or not db:
            continue
        target = base["final"][key]
        reached = next((p["generator_steps"] for p in db["curve"] if p[key] <= target), None)
        total = base["final"]["generator_steps"]
        out[teacher] = {"base_final": target, "disback_steps_to_reach": reached, "base_steps": total,
                        "share": None if reached is None else round(reached / total, 3)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=[*GMM_TEACHERS, "digits"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--gmm-iterations", type=int, default=800, help="iterations per gmm run (after the shared warm start)")
    p.add_argument("--digits-iterations", type=int, default=300, help="iterations per digits run")
    p.add_argument("--warm-steps", type=int, default=1000, help="iterations of the shared gmm warm start")
    p.add_argument("--gmm-samples", type=int, default=3000)
    p.add_argument("--digits-samples", type=int, default=500)
    p.add_argument("--evals", type=int, default=5, help="evaluations along each run")
    p.add_argument("--out", default="benchmarks/quality-out")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once, each in its own process on one thread (1: in this process)")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    start = time.time()
    from onestep.config import list_presets

    presets = set(list_presets())  # a gmm teacher runs the methods that have a gmm preset
    runs, iterations, samples = {}, {}, {}
    for teacher in args.teachers:
        gmm = teacher.startswith("gmm")
        mine = [m for m in args.methods if m in GMM_METHODS and f"gmm_{METHODS[m][0]}" in presets] if gmm else None
        runs[teacher] = mine if gmm else [m for m in args.methods if m in DIGITS_METHODS]
        iterations[teacher] = args.gmm_iterations if gmm else args.digits_iterations
        samples[teacher] = args.gmm_samples if gmm else args.digits_samples
    results = run_all(runs, iterations, samples, args.evals, args.warm_steps, out, args.jobs)
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, "
        + (f"{args.jobs} runs at once, one thread each" if args.jobs > 1 else f"torch threads {torch.get_num_threads()}"),
        "seconds": round(time.time() - start, 1),
        "args": vars(args),
        "results": results,
        "disback": disback_speedup(results),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = table(results)
    (out / "table.md").write_text(md)
    print(md)
    print("DisBack vs DMD2:", json.dumps(summary["disback"]))
    print(f"total {summary['seconds']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
