"""Where the quickstart student's grain came from, and what removed it (issue 13).

    python benchmarks/grain.py                          # every variant, two at a time (~12 min on 2 cores)
    python benchmarks/grain.py --variants before,after --out /tmp/grain
    python benchmarks/grain.py --diagnose runs/quickstart/checkpoint-1000   # the DM step against the grain, per t

Each variant trains the ``digits_dmd2`` preset (the quickstart's) with a few fields set, then
samples its student on the quickstart's 300 seeds and classes (the grid's 80, the timing's 100,
120 more) and measures:

- ``digits_fid``: digits-FID of those 300 images against the 1797 real digits (as the quickstart);
- ``grain``: the samples' energy per pixel above the real digits' band. The real digits are 8x8
  images upsampled (bilinear) to 16x16, so they hold little at 5 or more cycles per 16 pixels
  (either axis); salt-and-pepper grain lives there. The teacher's 50-step samples and the real
  digits are measured the same way, as the floor.
- ``grain_at_init``: the same for the generator before training (the teacher's own one-step x0
  prediction at the generator's timestep), to tell inherited grain from grain the training adds.

``--diagnose CHECKPOINT`` loads a run's generator and fake score and prints, for loss timesteps t
from 20 to 900, the share of the distribution-matching step that acts along each sample's own
high-frequency part ``h = x - blur(x)``: ``-<g, h> / <h, h>`` averaged over 200 samples and 4 noise
draws, positive when a descent step adds to the grain and negative when it removes it.

Writes into ``--out`` (default benchmarks/grain-out): results.json, table.md and samples.png (the
teacher and every variant on the grid's seeds, side by side) and before-after.png (the teacher,
``before`` and ``after`` alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

PRESET = "digits_dmd2"
#: label -> (what it changes, the fields it sets on the preset). Every field that differs between
#: the preset before and after issue 13 is set in every row, so the rows do not move with the preset.
BEFORE = {"loss_t_range": [0.02, 0.98], "fake_loss_weighting": "native", "generator_timesteps": [800]}
AFTER = {**BEFORE, "loss_t_range": [0.02, 0.5], "fake_loss_weighting": "snr+1", "generator_timesteps": [600]}
#: digits_sid before issue 13 (its rows pin these, so they do not move with the preset)
SID_BEFORE = {"generator_timesteps": [800], "max_steps": 1000, "fake_updates_per_generator": 1, "lr_generator": 5e-5, "loss_t_range": [0.02, 0.98],
              "fake_loss_weighting": "native", "sid_t_sampling": "uniform", "fake_guidance_scale": None}
VARIANTS = {
    "before": ("the quickstart preset before issue 13", BEFORE),
    "t<=0.5": ("DM loss only at t <= 0.5 T", {**BEFORE, "loss_t_range": [0.02, 0.5]}),
    "snr+1": ("fake-score loss weighted SNR + 1", {**BEFORE, "fake_loss_weighting": "snr+1"}),
    "t<=0.5 & snr+1": ("both", {**BEFORE, "loss_t_range": [0.02, 0.5], "fake_loss_weighting": "snr+1"}),
    "t<=0.5 @600": ("DM loss at t <= 0.5 T, generator at t = 600", {**BEFORE, "loss_t_range": [0.02, 0.5], "generator_timesteps": [600]}),
    "after": ("both, generator at t = 600 (the preset after issue 13)", AFTER),
    # DMD2 with its GAN head on the real digits (the paper's claim: the student beats its teacher)
    "after + GAN": ("`after` with the GAN head on the real digits (weights 1e-3 G, 1e-2 D)", {**AFTER, "gan_weight_generator": 1e-3, "gan_weight_discriminator": 1e-2}),
    "after + GAN x10": ("`after` with the GAN head, generator weight 1e-2", {**AFTER, "gan_weight_generator": 1e-2, "gan_weight_discriminator": 1e-2}),
    "after (seed 1)": ("`after`, training seed 1", {**AFTER, "seed": 1}),
    "after + GAN x10 (seed 1)": ("`after + GAN x10`, training seed 1", {**AFTER, "gan_weight_generator": 1e-2, "gan_weight_discriminator": 1e-2, "seed": 1}),
    # The other one-step methods' digits presets after issue 13 (the same three fields; VSD keeps its own fake loss).
    "fdistill-js": ("digits_fdistill_js preset", {}),
    "fdistill-fkl": ("digits_fdistill_js preset, divergence forward_kl", {"divergence": "forward_kl"}),
    "vsd": ("digits_vsd preset (PG-SB)", {}),
    # The one-step methods whose presets were left unchanged by the first half of issue 13, with and without the fields above.
    "sid": ("digits_sid preset before issue 13", SID_BEFORE),
    "sid @600": ("digits_sid preset before issue 13, generator at t = 600", {**SID_BEFORE, "generator_timesteps": [600]}),
    # SiD's screens (issue 13): generator at 600, 300 or 600 iterations
    "sid @600 300it": ("`sid @600`, 300 iterations", {**SID_BEFORE, "generator_timesteps": [600], "max_steps": 300}),
    "sid @600 karras 300it": ("`sid @600 300it`, noise levels as SiD's code draws them (sid_t_sampling karras, loss_t_range [0, 0.973])",
                              {**SID_BEFORE, "generator_timesteps": [600], "max_steps": 300, "sid_t_sampling": "karras", "loss_t_range": [0.0, 0.973]}),
    "sid @600 fu2 600it": ("`sid @600`, 2 fake-score updates per generator update, 600 iterations",
                           {**SID_BEFORE, "generator_timesteps": [600], "max_steps": 600, "fake_updates_per_generator": 2}),
    "sid @600 fu3 600it": ("`sid @600`, 3 fake-score updates per generator update, 600 iterations",
                           {**SID_BEFORE, "generator_timesteps": [600], "max_steps": 600, "fake_updates_per_generator": 3}),
    "sid @600 fu2 t<=0.5 600it": ("`sid @600 fu2 600it`, loss at t <= 0.5 T",
                                  {**SID_BEFORE, "generator_timesteps": [600], "max_steps": 600, "fake_updates_per_generator": 2, "loss_t_range": [0.02, 0.5]}),
    "sid @600 fu2 lr2e-5 600it": ("`sid @600 fu2 600it`, generator lr 2e-5",
                                  {**SID_BEFORE, "generator_timesteps": [600], "max_steps": 600, "fake_updates_per_generator": 2, "lr_generator": 2e-5}),
    "sid-after": ("digits_sid preset after issue 13", {}),
    "sid-after (seed 1)": ("`sid-after`, training seed 1", {"seed": 1}),
    "sid-after lr_fake 1e-4 300it": ("`sid-after`, fake-score lr 1e-4, 300 iterations", {"lr_fake": 1e-4, "max_steps": 300}),
    "sid-after batch 32": ("`sid-after`, batch 32", {"batch_size": 32}),
    "disback": ("digits_disback preset before issue 13", BEFORE),
    "disback-after": ("digits_disback preset with the three fields of `after` (the preset since)", AFTER),
    "lcm 1-step": ("digits_lcm preset, sampled in 1 step", {}),
    # sCM (issue 17): one run, sampled in 1 and in 2 steps
    "scm 1-step": ("digits_scm preset, sampled in 1 step", {}),
    "scm 2-step": ("digits_scm preset, sampled in 2 steps", {}),
    "rcm 1-step": ("digits_rcm preset (sCM + DMD regulariser), sampled in 1 step", {}),
    "rcm 2-step": ("digits_rcm preset, sampled in 2 steps", {}),
    # BOOT: data-free (noise and class labels only)
    "boot 1-step": ("digits_boot preset (data-free bootstrapping)", {}),
}
#: variants that train another preset than PRESET
VARIANT_PRESETS = {
    "fdistill-js": "digits_fdistill_js", "fdistill-fkl": "digits_fdistill_js", "vsd": "digits_vsd",
    "sid": "digits_sid", "sid @600": "digits_sid", "sid @600 300it": "digits_sid", "sid @600 karras 300it": "digits_sid",
    "sid @600 fu2 600it": "digits_sid", "sid @600 fu3 600it": "digits_sid", "sid @600 fu2 t<=0.5 600it": "digits_sid",
    "sid @600 fu2 lr2e-5 600it": "digits_sid", "sid-after": "digits_sid", "sid-after (seed 1)": "digits_sid",
    "sid-after lr_fake 1e-4 300it": "digits_sid", "sid-after batch 32": "digits_sid",
    "disback": "digits_disback", "disback-after": "digits_disback",
    "lcm 1-step": "digits_lcm", "scm 1-step": "digits_scm", "scm 2-step": "digits_scm",
    "rcm 1-step": "digits_rcm", "rcm 2-step": "digits_rcm", "boot 1-step": "digits_boot",
}
#: variants sampled in another number of steps than their student's own
VARIANT_STEPS = {"lcm 1-step": 1, "scm 1-step": 1, "scm 2-step": 2, "rcm 1-step": 1, "rcm 2-step": 2}
#: variants that sample another variant's student (trained once, by whichever of them runs first)
SAME_RUN = {"scm 2-step": "scm 1-step", "rcm 2-step": "rcm 1-step"}


def slug(label: str) -> str:
    """A folder name for a variant label."""
    return label.replace(" ", "").replace("&", "_").replace("<=", "le").replace("+", "p").replace("@", "_at")


def quickstart_seeds() -> tuple[list[int], list[int]]:
    """The quickstart's 300 (seed, class) pairs: its grid, its timing images, its extra FID images."""
    labels = [c for c in range(10) for _ in range(8)] + [i % 10 for i in range(100)] + [i % 10 for i in range(120)]
    seeds = list(range(80)) + list(range(1000, 1100)) + list(range(2000, 2120))
    return seeds, labels


def grain(x: torch.Tensor) -> float:
    """Energy per pixel at 5 or more cycles per 16 pixels (either axis): above the real digits' band."""
    f = torch.fft.fft2(x.double())
    k = (torch.fft.fftfreq(x.shape[-1]) * x.shape[-1]).abs()
    band = (k[:, None] >= 5) | (k[None, :] >= 5)
    return float((f.abs() ** 2 * band).sum() / x.shape[0] / x[0].numel() ** 2)


def blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k[None, None].to(x))


def references() -> dict:
    from onestep.digits import digits_dataset
    from onestep.eval import digits_fid
    from onestep.samplers.student import teacher_sample_from_seeds
    from onestep.teachers import load_teacher

    teacher = load_teacher("digits")
    seeds, labels = quickstart_seeds()
    xt = teacher_sample_from_seeds(teacher.denoiser(), teacher, seeds, labels, 50, teacher.guidance_scale, batch_size=100)
    real = digits_dataset()[0]
    return {"teacher": {"digits_fid": digits_fid(xt), "grain": grain(xt)}, "real": {"grain": grain(real)}, "teacher_samples": xt[:80]}


def run_variant(label: str, out: Path) -> dict:
    """Train one variant, sample its student on the quickstart's seeds, measure it."""
    from onestep.export import load_student
    from onestep.samplers.student import sample_student_from_seeds
    from onestep.trainers import load_config, make_trainer

    _, fields = VARIANTS[label]
    run_dir = out / "runs" / slug(SAME_RUN.get(label, label))
    config = load_config(VARIANT_PRESETS.get(label, PRESET), {**fields, "overwrite": True, "checkpoint_every": 0, "preview_every": 0, "log_with": "none"}, output_dir=str(run_dir))
    seeds, labels = quickstart_seeds()
    shared = run_dir / "shared-run.json"  # a variant of SAME_RUN finds the student trained by the other
    if label in SAME_RUN.values() or label in SAME_RUN:
        if shared.is_file():
            done = json.loads(shared.read_text())
            return _measure(label, fields, load_student(done["student"]), seeds, labels, out, done["grain_at_init"], done["train_seconds"])
    trainer = make_trainer(config)
    # Consistency students start as the teacher too; their first step is at the grid's top.
    t_init = [config.max_timestep] if getattr(config, "max_timestep", None) is not None else config.generator_timesteps
    x_init, _ = sample_student_from_seeds(trainer.generator, trainer.teacher_spec, t_init, seeds, labels, batch_size=100)
    start = time.perf_counter()
    student_dir = trainer.train()
    wall = time.perf_counter() - start
    shared.write_text(json.dumps({"student": str(student_dir), "grain_at_init": grain(x_init), "train_seconds": wall}))
    return _measure(label, fields, load_student(student_dir), seeds, labels, out, grain(x_init), wall)


def _measure(label: str, fields: dict, student, seeds: list[int], labels: list[int], out: Path, grain_init: float, wall: float) -> dict:
    from onestep.eval import digits_fid
    from onestep.samplers.student import sample_student_from_seeds

    steps = VARIANT_STEPS.get(label)
    timesteps = student.timesteps_for(steps) if steps else student.timesteps
    xs, _ = sample_student_from_seeds(student.generator, student, timesteps, seeds, labels, batch_size=100)
    (out / "runs" / slug(label)).mkdir(parents=True, exist_ok=True)
    save_file({"grid": xs[:80].contiguous()}, out / "runs" / slug(label) / "grid.safetensors")
    return {"label": label, "fields": fields, "digits_fid": digits_fid(xs), "grain": grain(xs), "grain_at_init": grain_init, "train_seconds": wall}


@torch.no_grad()
def diagnose(checkpoint: Path, samples: int = 200, draws: int = 4) -> list[dict]:
    """Per loss timestep: how much of the DM descent step runs along the samples' own grain."""
    from onestep.trainers import load_config, make_trainer
    from onestep.trainers.dmd2 import dm_gradient

    run_dir = checkpoint.parent
    config = load_config(str(run_dir / "config.json"), {"resume": None, "overwrite": False}, output_dir=str(run_dir))
    trainer = make_trainer(config)
    trainer.load_checkpoint(str(checkpoint))
    g = torch.Generator().manual_seed(0)
    batch = {"noise": torch.randn(samples, *trainer.teacher_spec.sample_shape, generator=g)}
    batch["cond"] = trainer.conditioning.sample(samples, generator=g, device="cpu")
    batch["uncond"] = trainer.conditioning.null(samples, device="cpu")
    x = trainer.generate(batch)
    h = x - blur(x)
    rows = []
    for t_label in (20, 50, 100, 200, 300, 500, 700, 900):
        t = torch.full((samples,), t_label, dtype=torch.long)
        grads = []
        for _ in range(draws):
            x_t = trainer.schedule.add_noise(x, torch.randn(x.shape, generator=g), t)
            x0_real = trainer.teacher.guided(x_t, t, batch["cond"], batch["uncond"], config.guidance_scale)
            grads.append(dm_gradient(x, x0_real, trainer.fake(x_t, t, batch["cond"])))
        grad = torch.stack(grads).mean(0)
        rows.append({"t": t_label, "step_along_grain": float(-(grad * h).sum() / (h * h).sum()), "mean_abs_grad": float(grad.abs().mean())})
        print(f"t = {t_label:4d}  step along the grain {rows[-1]['step_along_grain']:+.3f}  mean |g| {rows[-1]['mean_abs_grad']:.3f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated labels from: {' | '.join(VARIANTS)}")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "grain-out")
    p.add_argument("--jobs", type=int, default=2, help="variants trained at once (each on one thread)")
    p.add_argument("--reuse", action="store_true", help="keep the results of variants already measured in --out (train only the others)")
    p.add_argument("--diagnose", type=Path, default=None, help="a DMD2 checkpoint folder: print the DM step along the grain per t, and stop")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one variant, in a worker process
    args = p.parse_args()
    if args.diagnose is not None:
        print(json.dumps(diagnose(args.diagnose), indent=1))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only is not None:
        (args.out / "runs").mkdir(exist_ok=True)
        result = run_variant(args.only, args.out)
        (args.out / "runs" / f"{slug(args.only)}.json").write_text(json.dumps(result))
        return
    labels = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in labels if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, running, results = list(labels), [], {}
    if args.reuse:
        for label in labels:
            done = args.out / "runs" / f"{slug(label)}.json"
            if done.is_file():
                results[label] = json.loads(done.read_text())
        pending = [v for v in labels if v not in results]
    while pending or running:
        while pending and len(running) < args.jobs:
            label = pending.pop(0)
            running.append((label, subprocess.Popen([sys.executable, __file__, "--only", label, "--out", str(args.out)], env=env)))
        label, proc = running.pop(0)
        if proc.wait() != 0:
            sys.exit(f"variant {label!r} failed")
        results[label] = json.loads((args.out / "runs" / f"{slug(label)}.json").read_text())
    refs = references()
    write_report(args.out, labels, results, refs)


def write_report(out: Path, labels: list[str], results: dict, refs: dict) -> None:
    from onestep.viz import save_comparison

    rows = [f"| teacher, 50 DDIM steps | - | {refs['teacher']['digits_fid']:.3f} | {refs['teacher']['grain']:.5f} | - | - |", f"| real digits | - | - | {refs['real']['grain']:.5f} | - | - |"]
    for label in labels:
        r = results[label]
        rows.append(f"| {label} | {VARIANTS[label][0]} | {r['digits_fid']:.3f} | {r['grain']:.5f} | {r['grain_at_init']:.5f} | {r['train_seconds']:.0f} |")
    table = "| variant | what | digits-FID (300) | grain | grain at init | train s |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    (out / "table.md").write_text(table)
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    (out / "results.json").write_text(json.dumps({"meta": meta, "teacher": refs["teacher"], "real": refs["real"], "variants": results}, indent=1))
    panels = [("teacher: 50 DDIM steps", refs["teacher_samples"])]
    for label in labels:
        grid = load_file(out / "runs" / slug(label) / "grid.safetensors")["grid"]
        panels.append((f"{label}: FID {results[label]['digits_fid']:.2f}, grain {results[label]['grain'] * 1e3:.2f}e-3", grid))
    save_comparison(panels, out / "samples.png", row_labels=[str(c) for c in range(10)], per_row=8, title="same classes, same seeds")
    if "before" in labels and "after" in labels:  # the pair that matters, large enough to see the grain
        pair = [panels[0]] + [panels[1 + labels.index(v)] for v in ("before", "after")]
        save_comparison(pair, out / "before-after.png", row_labels=[str(c) for c in range(10)], per_row=8, title="same classes, same seeds")
    print(table)


if __name__ == "__main__":
    main()
