"""gmm-grid25: one-step DMD2 students in the 25 blobs instead of on the grid lines.

    python benchmarks/grid25.py                      # every variant (about 20 min on one shared CPU thread)
    python benchmarks/grid25.py --variants preset    # only the shipped preset, end to end

The exact 25-mode teacher (onestep.teachers.gmm), one-step DMD2 students, each scored on
``--samples`` fixed-seed samples with the mixture metrics of onestep.eval.mixture (modes
covered, TV of the mode weights, share within 3 std, sliced W2), beside the teacher's own
50-step DDIM samples. The variants separate the two changes of configs/gmm_dmd2_grid25.yaml:

- network: ``plain`` is the MLPDenoiser every gmm teacher used before (2-D input);
  ``fourier`` is the one gmm-grid25 now builds (random Fourier features of the input,
  onestep.teachers.gmm.GMM_STUDENT_CONFIGS);
- schedule: ``quality`` is benchmarks/quality.py's protocol (1000 iterations of regression
  warm start at lr 1e-3, then 800 iterations of DMD2 at lr 1e-4 with a fresh optimizer, noise
  levels t ~ U{0.02 T .. 0.98 T}); ``preset`` is the grid preset run end to end (2000
  iterations of regression at lr_regression 1e-3, then 800 of DMD2 at lr 1e-5 with
  t ~ U{0.05 T .. 0.3 T}).

Each network's ``preset`` run is one whole run of the preset (what ``onestep train
gmm_dmd2_grid25`` does); its generator and fake score after 1000 iterations (mid warm start)
are the start of the ``quality`` run, so a network's warm start is trained once. The rows
"regression only" score the generator at the end of the warm start.

Writes into ``--out`` (default benchmarks/grid25-out): results.json, table.md and
samples.png (each variant's samples over the teacher's blobs).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

TEACHER = "gmm-grid25"
PRESET = "gmm_dmd2_grid25"
NETWORKS = ("plain", "fourier")
VARIANTS = ("quality", "preset")


def _teacher(network: str):
    from onestep.teachers import load_teacher
    from onestep.teachers.gmm import MLPDenoiser

    teacher = load_teacher(TEACHER)
    if network == "plain":  # the network every gmm teacher built before gmm-grid25 got its own
        teacher.student_factory = lambda: MLPDenoiser()
    return teacher


def _trainer(network: str, out: Path, overrides: dict):
    from onestep.trainers import load_config, make_trainer

    values = {"log_with": "none", "export": False, "checkpoint_every": 0, "preview_every": 0}
    values.update(overrides)
    return make_trainer(load_config(PRESET, values, output_dir=str(out)), teacher=_teacher(network))


def _score(tr, n: int) -> tuple[dict, torch.Tensor]:
    from onestep.eval.mixture import mixture_metrics
    from onestep.teachers.gmm import gmm_mixture

    x, _ = tr.preview_samples(n)  # fixed seeds 0 .. n-1
    x = x.float().cpu()
    m = mixture_metrics(x, gmm_mixture(TEACHER))
    m.pop("mode_weights")
    return m, x


def teacher_row(n: int) -> tuple[dict, torch.Tensor]:
    from onestep.eval.mixture import mixture_metrics
    from onestep.samplers.student import teacher_sample_from_seeds
    from onestep.teachers import load_teacher
    from onestep.teachers.gmm import gmm_mixture

    t = load_teacher(TEACHER)
    x = teacher_sample_from_seeds(t.denoiser(), t, range(n), num_steps=50, guidance_scale=1.0).float().cpu()
    m = mixture_metrics(x, gmm_mixture(TEACHER))
    m.pop("mode_weights")
    return m, x


def run_network(network: str, variants: list[str], n: int, out: Path, warm: int | None = None, dm: int = 800,
                snapshot: int = 1000) -> tuple[dict, dict]:
    """The preset run end to end (snapshotting the warm start at ``snapshot`` iterations), then the quality run.
    ``warm`` / ``dm``: the preset's regression and DMD2 iterations (None: the preset's own)."""
    from tqdm.auto import tqdm

    from onestep.weights import save_trainable

    rows, samples = {}, {}
    snap_g, snap_f = out / f"{network}-warm{snapshot}-generator.safetensors", out / f"{network}-warm{snapshot}-fake.safetensors"
    need_snapshot = "quality" in variants and not (snap_g.is_file() and snap_f.is_file())
    if "preset" in variants or need_snapshot:
        start = time.time()
        lengths = {} if warm is None else {"regression_warmup_steps": warm, "max_steps": warm + dm}
        tr = _trainer(network, out / f"run-{network}-preset", lengths)
        c = tr.config
        steps = c.max_steps if "preset" in variants else snapshot
        curve: list[dict] = []
        for _ in tqdm(range(steps), desc=f"{network} preset", leave=False):
            tr.train_step()
            if tr.state.step == snapshot and need_snapshot:
                save_trainable(tr.generator.backbone, snap_g)
                save_trainable(tr.fake.backbone, snap_f)
            if "preset" in variants and tr.state.step > c.regression_warmup_steps and (tr.state.step - c.regression_warmup_steps) % 200 == 0:
                m, _ = _score(tr, n)  # the DMD2 stage's course, every 200 iterations
                curve.append({"iteration": tr.state.step, **{k: m[k] for k in ("modes_covered", "tv", "within_3std", "sliced_w2")}})
                print(network, "preset", json.dumps(_r(curve[-1])), flush=True)
            if tr.state.step == c.regression_warmup_steps and "preset" in variants:
                m, x = _score(tr, n)
                label = f"{network} / regression only ({c.regression_warmup_steps} it)"
                rows[label] = {**m, "seconds": round(time.time() - start, 1)}
                print(label, json.dumps(_r(rows[label])), flush=True)
        if "preset" in variants:
            m, x = _score(tr, n)
            label = f"{network} / preset ({c.regression_warmup_steps} regression + {c.max_steps - c.regression_warmup_steps} DMD2)"
            rows[label] = {**m, "seconds": round(time.time() - start, 1), "dmd2_curve": curve}
            samples[label] = x
        print(network, "preset", json.dumps({k: _r(v) for k, v in rows.items()}), flush=True)
    if "quality" in variants:
        start = time.time()
        iters = dm
        tr = _trainer(network, out / f"run-{network}-quality", {
            "max_steps": iters, "regression_warmup_steps": 0, "lr_regression": None, "loss_t_range": [0.02, 0.98], "lr_generator": 1e-4,
            "init_generator": str(snap_g), "init_fake_score": str(snap_f),
        })
        for _ in tqdm(range(iters), desc=f"{network} quality", leave=False):
            tr.train_step()
        m, x = _score(tr, n)
        label = f"{network} / quality.py protocol ({snapshot} regression + {iters} DMD2)"
        rows[label] = {**m, "seconds (DMD2 only)": round(time.time() - start, 1)}
        samples[label] = x
        print(network, "quality", json.dumps(_r(rows[label])), flush=True)
    return rows, samples


def _r(v):
    if isinstance(v, dict):
        return {k: _r(x) for k, x in v.items()}
    return round(v, 4) if isinstance(v, float) else v


def table(rows: dict) -> str:
    lines = [
        "| variant | modes covered | TV of mode weights | within 3 std | sliced W2 | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for label, m in rows.items():
        secs = m.get("seconds", m.get("seconds (DMD2 only)", "-"))
        lines.append(
            f"| {label} | {m['modes_covered']}/{m['num_modes']} | {m['tv']:.3f} | {m['within_3std']:.3f} | {m['sliced_w2']:.3f} | {secs} |"
        )
    return "\n".join(lines) + "\n"


def plot(samples: dict[str, torch.Tensor], path: Path) -> None:
    from onestep.teachers.gmm import gmm_mixture
    from onestep.viz import _plt, _save

    plt = _plt()
    means, stds, _ = gmm_mixture(TEACHER)
    n = len(samples)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.3))
    axes = [axes] if n == 1 else axes
    for ax, (label, x) in zip(axes, samples.items()):
        for mu, s in zip(means, stds):  # the teacher's blobs: 3-std discs
            ax.add_patch(plt.Circle((float(mu[0]), float(mu[1])), 3 * float(s), color="tab:orange", alpha=0.25, linewidth=0))
        ax.scatter(x[:, 0], x[:, 1], s=0.4, alpha=0.35, color="tab:blue")
        ax.set_xlim(-5.5, 5.5)
        ax.set_ylim(-5.5, 5.5)
        ax.set_aspect("equal")
        ax.set_title(label.replace(" / ", "\n", 1), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path, dpi=110)


def write(out: Path, rows: dict, samples: dict, args: argparse.Namespace, start: float) -> str:
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(time.time() - start, 1),
        "args": vars(args),
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = table(rows)
    (out / "table.md").write_text(md)
    plot(samples, out / "samples.png")
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--samples", type=int, default=3000, help="samples per row (fixed seeds)")
    p.add_argument("--warm-steps", type=int, default=None, help="regression iterations of the preset runs (default: the preset's, 2000)")
    p.add_argument("--dm-iterations", type=int, default=800, help="DMD2 iterations after the warm start (the preset's: 800)")
    p.add_argument("--snapshot", type=int, default=1000, help="warm-start iterations the quality.py-protocol runs start from")
    p.add_argument("--out", default="benchmarks/grid25-out")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    ref, ref_x = teacher_row(args.samples)
    rows, samples = {"teacher 50-step DDIM": ref}, {"teacher / 50-step DDIM": ref_x}
    for network in args.networks:
        r, s = run_network(network, args.variants, args.samples, out, args.warm_steps, args.dm_iterations, args.snapshot)
        rows.update(r)
        samples.update(s)
        md = write(out, rows, samples, args, start)  # after every network: a long run leaves its figures so far
    print(md)
    print(f"total {time.time() - start:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
