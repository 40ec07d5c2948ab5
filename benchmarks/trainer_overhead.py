"""Trainer overhead: a whole training step against the network passes it must run (issue 15, item 1).

For each trainer row and teacher this times ``trainer.train_step()`` and compares it with the sum
of the network passes that step runs, each timed alone on the same shapes. The goal is a ratio
step / passes of at most 1.10; what is above it is overhead (optimizer and clipping, EMA, batch
making, loss glue, ``.item()`` syncs, copies, Python), which the script attributes and names.

Method (everything through the public API: ``load_config(preset, overrides)`` + ``make_trainer``):

1. Build the trainer from the row's digits preset (its batch size, 16), or on the tiny SD pipeline
   of ``tests/t2i_fixtures.py`` (batch 2; a captioned image folder as ``real_images`` for rows
   whose GAN / consistency term reads real images).
2. Warm up, then time ``train_step()`` with ``time.perf_counter`` (wall) and ``time.process_time``
   (CPU), median per step, separately for each step kind: ``G+F`` (generator update then
   fake-score / head update), ``G`` (generator only: consistency) and ``F`` (fake score only,
   the two time-scale rule's extra updates).
3. Record the passes: forward pre/post hooks on every network the trainer holds (the generator,
   teacher and fake-score Denoisers, which tells a LoRA fake score from the teacher that shares
   its backbone; consistency views and targets; DisBack's node target; the heads; the VAE and
   text encoder if any; bare backbones, for calls that bypass a Denoiser) record, for one step
   of each kind, every outermost call: the role, its inputs (detached copies), whether grad was
   enabled, which parameters required grad, and whether its output required grad.
4. Replay each recorded call alone, on the same module with the same inputs and the same
   ``requires_grad`` flags: the forward, plus, when the step ran it with gradient, the backward
   of the sum of its outputs. The median of a few replays is that pass's time; their sum is the
   step kind's "passes" time.
5. Attribute the rest with a second set of steps run under light instrumentation: time spent
   in ``make_batch``, the losses (less the forward passes inside them: "loss glue"), the
   backward calls (less the replayed backwards), ``_update`` (gradient averaging, clipping,
   AdamW, the LR scheduler), ``after_generator_step`` (EMA, target update) and the rest of
   ``train_step``; and cProfile over the same steps for the Python functions of onestep /
   trainers / torch.optim / accelerate with the most self time, and the count of ``.item()`` calls.

Both wall-clock (``perf_counter``) and CPU-time (``process_time``) ratios are reported: on a
machine shared with other jobs the wall figures include time the process was not scheduled, and
the CPU-time ratio is the steadier one. Run with ``OMP_NUM_THREADS=1`` (one thread: CPU time is
then comparable with wall time), and nothing else beside it if the figures are to be compared.

    OMP_NUM_THREADS=1 python benchmarks/trainer_overhead.py --rows dmd2,sid --teachers digits --steps 8
"""

from __future__ import annotations

import argparse
import cProfile
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # t2i_fixtures: the tiny SD pipeline, prompts, captioned images
sys.path.insert(0, str(ROOT / "benchmarks"))

#: row name -> (digits preset, overrides)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "dmd2": ("digits_dmd2", {}),
    "dmd2-gan": ("digits_dmd2", {"gan_weight_generator": 1e-3}),
    "vsd": ("digits_vsd", {}),
    "fdistill-js": ("digits_fdistill_js", {}),
    "sid": ("digits_sid", {}),
    # Stage 1 (record, fake-score only) is kept short so the warm-up reaches stage 2 (backtracking).
    "disback-dmd2": ("digits_disback", {"disback_nodes": 2, "disback_record_steps": 2, "disback_interval": 10_000}),
    "consistency": ("digits_lcm", {}),
}
#: rows whose term reads real images (on tiny-sd: a captioned image folder)
REAL_ROWS = {"dmd2-gan", "fdistill-js", "consistency"}
TEACHERS = ("digits", "tiny-sd")
COMMON = dict(log_with="none", preview_every=0, checkpoint_every=0, eval_every=0, max_steps=100_000)


# ---------------------------------------------------------------- building
def tiny_sd_assets(root: Path) -> dict[str, str]:
    """The tiny SD pipeline, a prompt file and a captioned image folder under ``root`` (built once)."""
    from t2i_fixtures import make_tiny_sd, write_image_folder, write_prompts

    root.mkdir(parents=True, exist_ok=True)
    sd = root / "sd"
    if not (sd / "model_index.json").is_file():
        make_tiny_sd(sd)
    prompts = write_prompts(root / "prompts.txt")
    images = root / "images"
    if not (images / "metadata.jsonl").is_file():
        write_image_folder(images)
    return {"sd": str(sd), "prompts": str(prompts), "images": str(images)}


def build_trainer(row: str, teacher: str, work: Path, assets: dict[str, str] | None = None, overrides: dict[str, Any] | None = None):
    """The row's trainer through ``load_config`` + ``make_trainer`` (run folder under ``work``; ``overrides``
    last, e.g. a smaller batch for a test)."""
    from onestep.trainers import load_config, make_trainer

    preset, extra = ROWS[row]
    extra_overrides = overrides
    overrides = {**COMMON, **extra}
    if teacher == "tiny-sd":
        assets = assets or tiny_sd_assets(work / "tiny-sd-assets")
        overrides.update(teacher=assets["sd"], prompts=assets["prompts"], batch_size=2)
        if row in REAL_ROWS:
            overrides["real_images"] = assets["images"]
        if row == "consistency":  # digits_lcm's first-step label: pixel students only (an LCMScheduler starts at the top)
            overrides["first_step_timestep"] = None
    elif teacher != "digits":
        raise SystemExit(f"unknown teacher {teacher!r}; use one of {', '.join(TEACHERS)}")
    overrides.update(extra_overrides or {})
    config = load_config(preset, overrides, output_dir=str(work / f"run-{row}-{teacher}"))
    return make_trainer(config)


def step_kind(trainer) -> str:
    step = trainer.state.step
    g = trainer.is_generator_step(step)
    f = trainer.is_fake_step(step) and trainer.opt_f is not None
    return "G+F" if g and f else "G" if g else "F" if f else "none"


# ---------------------------------------------------------------- networks
def networks(trainer) -> list[tuple[str, nn.Module]]:
    """Every network the trainer can call, once each, with a role name (first name wins)."""
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def add(name: str, m: Any) -> None:
        if isinstance(m, nn.Module) and id(m) not in seen:
            seen.add(id(m))
            found.append((name, m))

    for name in ("generator", "teacher", "fake", "student", "target", "real_teacher"):
        add(name, getattr(trainer, name, None))
    triad = trainer.triad
    for name in ("teacher", "fake", "generator"):
        add(name, getattr(triad, name, None))
    for name, m in trainer.extras.items():
        add(f"extra.{name}", m)
    for name, m in trainer.heads.items():
        add(f"head.{name}", m)
    for name, v in vars(trainer).items():  # other views (consistency's student/target, ...)
        add(name, v)
    spec = trainer.teacher_spec
    for name, v in vars(spec).items():  # VAE, text encoder (one level into wrappers)
        if isinstance(v, nn.Module):
            add(f"spec.{name}", v)
        elif hasattr(v, "__dict__") and not isinstance(v, (type, torch.Tensor)):
            for sub, w in vars(v).items():
                add(f"spec.{name}.{sub}", w)
    # bare backbones last: recorded only when called outside a Denoiser
    for name, m in list(found):
        add(f"{name}.backbone", getattr(m, "backbone", None))
    return found


def _detach(v):
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


@contextmanager
def recording(trainer, calls: list[dict] | None, timer: dict | None = None):
    """Forward hooks on every network: record each outermost call into ``calls`` (inputs copied), and/or
    add the wall time of outermost forwards to ``timer["forward"]``."""
    depth = [0]
    handles = []

    def pre(role, module):
        def hook(m, args, kwargs):
            depth[0] += 1
            if depth[0] == 1:
                if calls is not None:
                    flat, _ = tree_flatten((args, kwargs))
                    calls.append(dict(
                        role=role, module=m, args=tree_map(_detach, args), kwargs=tree_map(_detach, kwargs),
                        input_grad=[isinstance(x, torch.Tensor) and x.requires_grad for x in flat],
                        grad_enabled=torch.is_grad_enabled(), training=m.training,
                        param_grad=[p.requires_grad for p in m.parameters()],
                        shapes=[tuple(x.shape) for x in flat if isinstance(x, torch.Tensor)],
                    ))
                if timer is not None:
                    timer["_t0"] = time.perf_counter()
        return hook

    def post(m, args, kwargs, out):
        if depth[0] == 1:
            if calls is not None:
                flat, _ = tree_flatten(out)
                calls[-1]["output_grad"] = any(isinstance(x, torch.Tensor) and x.requires_grad for x in flat)
            if timer is not None:
                timer["forward"] = timer.get("forward", 0.0) + time.perf_counter() - timer.pop("_t0")
        depth[0] -= 1

    for role, m in networks(trainer):
        handles.append(m.register_forward_pre_hook(pre(role, m), with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def replay(call: dict, reps: int = 5) -> dict[str, float]:
    """Time one recorded call alone: forward (and backward of its outputs' sum when the step took
    one). Returns medians in ms: ``fwd``, ``bwd``, ``total`` (wall) and ``cpu`` (process time of both)."""
    m = call["module"]
    params = list(m.parameters())
    saved = [(p, p.requires_grad) for p in params]
    saved_grads = [p.grad for p in params]
    was_training = m.training
    backward = call["grad_enabled"] and call.get("output_grad", False)
    flags = iter(call["input_grad"])

    def fresh(v):
        if isinstance(v, torch.Tensor):
            x = v.clone()
            return x.requires_grad_(True) if next(flags) and x.is_floating_point() else x
        return v

    fwd, bwd, cpu = [], [], []
    try:
        for p, flag in zip(params, call["param_grad"]):
            p.requires_grad_(flag)
        m.train(call["training"])
        for i in range(reps + 1):  # the first is a warm-up
            flags = iter(call["input_grad"])
            args = tree_map(fresh, call["args"])
            kwargs = tree_map(fresh, call["kwargs"])
            with torch.set_grad_enabled(call["grad_enabled"]):
                c0 = time.process_time()
                t0 = time.perf_counter()
                out = m(*args, **kwargs)
                t1 = time.perf_counter()
                t2 = t1
                if backward:
                    outs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor) and x.requires_grad]
                    sum(o.float().sum() for o in outs).backward()
                    t2 = time.perf_counter()
                c2 = time.process_time()
            for p in params:
                p.grad = None
            if i:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
                cpu.append(c2 - c0)
    finally:
        for (p, flag), g in zip(saved, saved_grads):
            p.requires_grad_(flag)
            p.grad = g
        m.train(was_training)
    f, b = statistics.median(fwd) * 1e3, statistics.median(bwd) * 1e3
    return {"fwd": f, "bwd": b, "total": f + b, "cpu": statistics.median(cpu) * 1e3}


# ---------------------------------------------------------------- phases
PHASES = ("make_batch", "generator_loss", "fake_score_loss", "_backward", "_update", "after_generator_step")


@contextmanager
def phase_timers(trainer, acc: dict[str, float]):
    """Wrap the trainer's phase methods on the instance; add their wall time to ``acc``."""
    originals = {}
    for name in PHASES:
        fn = getattr(trainer, name)
        originals[name] = fn

        def timed(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_name] = acc.get(_name, 0.0) + time.perf_counter() - t0
        setattr(trainer, name, timed)
    try:
        yield
    finally:
        for name in PHASES:
            delattr(trainer, name)  # the class's method again


def advance_to(trainer, kind: str, limit: int = 50) -> bool:
    """Run steps until the next step is of ``kind`` (False if it never comes)."""
    for _ in range(limit):
        if step_kind(trainer) == kind:
            return True
        trainer.train_step()
    return step_kind(trainer) == kind


def _profile_top(prof: cProfile.Profile, n_steps: int, top: int = 6) -> tuple[list[dict], int, list[dict]]:
    """Functions of onestep / trainers / torch.optim / accelerate / diffusers.training_utils with the most
    self time (ms per step), ``.item()`` calls per step, and the callers of ``.item()``."""
    stats = pstats.Stats(prof)
    keep = ("/onestep/", "/trainers/", "/samplers/", "torch/optim/", "accelerate/", "training_utils", "/torch/nn/utils/clip_grad")
    rows, items = [], 0
    item_callers: dict[str, int] = {}
    for (file, line, fn), (cc, nc, tt, ct, callers) in stats.stats.items():
        if fn == "item" or fn.endswith("'item' of 'torch._C.TensorBase' objects>"):
            items += nc
            for (cf, cl, cfn), cv in callers.items():
                rel = cf.split("/work/main/")[-1] if "/work/main/" in cf else "/".join(cf.split("/")[-3:])
                key = f"{rel}:{cl} {cfn}"
                item_callers[key] = item_callers.get(key, 0) + cv[1]
        if any(k in file for k in keep):
            rel = file.split("/work/main/")[-1] if "/work/main/" in file else "/".join(file.split("/")[-3:])
            rows.append({"where": f"{rel}:{line} {fn}", "self_ms": tt * 1e3 / n_steps, "cum_ms": ct * 1e3 / n_steps, "calls": nc / n_steps})
    rows.sort(key=lambda r: -r["self_ms"])
    callers = sorted(item_callers.items(), key=lambda kv: -kv[1])[:top]
    return rows[:top], round(items / n_steps), [{"where": k, "calls": v / n_steps} for k, v in callers]


def measure(trainer, steps: int = 8, warmup: int = 3, reps: int = 5, profile_steps: int = 3) -> list[dict]:
    """Time each step kind of ``trainer``; returns one result dict per kind."""
    torch.manual_seed(0)
    for _ in range(warmup):
        trainer.train_step()
    if hasattr(trainer, "backtrack_start"):  # DisBack: time stage 2 (backtracking)
        while trainer.state.step < trainer.backtrack_start + 1:
            trainer.train_step()
    kinds: list[str] = []
    for _ in range(max(1, trainer.config.fake_updates_per_generator) + 1):
        k = step_kind(trainer)
        if k not in kinds and k != "none":
            kinds.append(k)
        trainer.train_step()
    results = []
    for kind in kinds:
        wall, cpu = [], []
        while len(wall) < steps:
            if not advance_to(trainer, kind):
                break
            w0, c0 = time.perf_counter(), time.process_time()
            trainer.train_step()
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        # one recorded step of this kind
        advance_to(trainer, kind)
        calls: list[dict] = []
        with recording(trainer, calls):
            trainer.train_step()
        passes = []
        for call in calls:
            t = replay(call, reps)
            backward = call["grad_enabled"] and call.get("output_grad", False)
            passes.append({"role": call["role"], "shapes": call["shapes"][:1], "grad": backward, **t})
        passes_ms = sum(p["total"] for p in passes)
        passes_cpu_ms = sum(p["cpu"] for p in passes)
        # attribution: phases + forward time inside the step, then cProfile
        phase: dict[str, float] = {}
        timer: dict[str, float] = {}
        step_ms = []
        for _ in range(profile_steps):
            advance_to(trainer, kind)
            with phase_timers(trainer, phase), recording(trainer, None, timer):
                t0 = time.perf_counter()
                trainer.train_step()
                step_ms.append(time.perf_counter() - t0)
        n = profile_steps
        ph = {k: v * 1e3 / n for k, v in phase.items()}
        fwd_in_step = timer.get("forward", 0.0) * 1e3 / n
        inst_step = sum(step_ms) * 1e3 / n
        replay_fwd = sum(p["fwd"] for p in passes)
        replay_bwd = sum(p["bwd"] for p in passes)
        losses = ph.get("generator_loss", 0.0) + ph.get("fake_score_loss", 0.0)
        parts = {
            "optimizer (_update: grad avg, clip, AdamW, sched)": ph.get("_update", 0.0),
            "after_generator_step (EMA / target)": ph.get("after_generator_step", 0.0),
            "make_batch": ph.get("make_batch", 0.0),
            "loss glue (losses - forwards in them)": losses - fwd_in_step,
            "forwards in step - replayed forwards": fwd_in_step - replay_fwd,
            "backward in step - replayed backwards": ph.get("_backward", 0.0) - replay_bwd,
            "rest of train_step": inst_step - sum(ph.get(k, 0.0) for k in PHASES),
        }
        prof = cProfile.Profile()
        for _ in range(profile_steps):
            advance_to(trainer, kind)
            prof.enable()
            trainer.train_step()
            prof.disable()
        top, items, item_callers = _profile_top(prof, profile_steps)
        step_med = statistics.median(wall) * 1e3 if wall else float("nan")
        step_cpu = statistics.median(cpu) * 1e3 if cpu else float("nan")
        results.append({
            "kind": kind,
            "steps_timed": len(wall),
            "step_ms": step_med,
            "step_cpu_ms": step_cpu,
            "passes_ms": passes_ms,
            "ratio": step_med / passes_ms if passes_ms > 0 else float("inf"),
            "passes_cpu_ms": passes_cpu_ms,
            "ratio_cpu": step_cpu / passes_cpu_ms if passes_cpu_ms > 0 else float("inf"),
            "passes": passes,
            "overhead_parts_ms": parts,
            "instrumented_step_ms": inst_step,
            "item_calls_per_step": items,
            "profile_top": top,
            "item_callers": item_callers,
        })
    return results


def run_row(row: str, teacher: str, work: Path, steps: int, assets: dict[str, str] | None = None,
            overrides: dict[str, Any] | None = None, **kw) -> list[dict]:
    trainer = build_trainer(row, teacher, work, assets, overrides)
    out = []
    for r in measure(trainer, steps=steps, **kw):
        out.append({"row": row, "teacher": teacher, "batch": trainer.config.batch_size, **r})
    return out


# ---------------------------------------------------------------- report
def _top_overheads(r: dict, n: int = 3) -> str:
    parts = sorted(r["overhead_parts_ms"].items(), key=lambda kv: -kv[1])
    return "; ".join(f"{k} {v:.1f}" for k, v in parts[:n] if v > 0)


def _pass_summary(r: dict) -> str:
    agg: dict[str, list[float]] = {}
    for p in r["passes"]:
        key = p["role"] + (" f+b" if p["grad"] else " f")
        agg.setdefault(key, []).append(p["total"])
    return ", ".join(f"{k}" + (f" x{len(v)}" if len(v) > 1 else "") + f" {sum(v):.1f}" for k, v in agg.items())


def table(rows: list[dict]) -> str:
    lines = [
        "| row | teacher | batch | step kind | step ms | passes ms | step/passes | CPU: step ms | CPU: passes ms | CPU: step/passes | passes (role, wall ms) | top overhead (ms) | .item()/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['teacher']} | {r['batch']} | {r['kind']} | {r['step_ms']:.1f} | {r['passes_ms']:.1f} | {r['ratio']:.2f} | "
            f"{r['step_cpu_ms']:.1f} | {r['passes_cpu_ms']:.1f} | {r['ratio_cpu']:.2f} | "
            f"{_pass_summary(r)} | {_top_overheads(r)} | {r['item_calls_per_step']} |"
        )
    lines.append("")
    lines.append("Python self time per step (cProfile; onestep, trainers, torch.optim, accelerate):")
    lines.append("")
    for r in rows:
        top = "; ".join(f"{t['where']} {t['self_ms']:.1f} ms" for t in r["profile_top"][:4])
        items = ", ".join(f"{c['where']} x{c['calls']:.0f}" for c in r["item_callers"][:3])
        lines.append(f"- {r['row']} / {r['teacher']} / {r['kind']}: {top}; `.item()` from: {items}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all: {', '.join(ROWS)})")
    p.add_argument("--teachers", default=",".join(TEACHERS), help="comma-separated: digits, tiny-sd")
    p.add_argument("--steps", type=int, default=8, help="timed steps per step kind (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--reps", type=int, default=5, help="replays per recorded pass (median)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps for the overhead attribution")
    p.add_argument("--work", default=None, help="folder for run folders and the tiny SD assets (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "trainer-overhead-out" / "table.md"), help="markdown table")
    p.add_argument("--json", default=None, help="rows as JSON (bench_meta.write_rows)")
    a = p.parse_args(argv)
    rows = [r for r in a.rows.split(",") if r]
    teachers = [t for t in a.teachers.split(",") if t]
    for r in rows:
        if r not in ROWS:
            p.error(f"unknown row {r!r}; rows: {', '.join(ROWS)}")
    for t in teachers:
        if t not in TEACHERS:
            p.error(f"unknown teacher {t!r}; teachers: {', '.join(TEACHERS)}")
    print(f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})", file=sys.stderr)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="trainer-overhead-") as tmp:
        work = Path(a.work) if a.work else Path(tmp)
        assets = tiny_sd_assets(work / "tiny-sd-assets") if "tiny-sd" in teachers else None
        for teacher in teachers:
            for row in rows:
                t0 = time.perf_counter()
                got = run_row(row, teacher, work, a.steps, assets, warmup=a.warmup, reps=a.reps, profile_steps=a.profile_steps)
                for r in got:
                    print(f"{row:14s} {teacher:8s} {r['kind']:4s} step {r['step_ms']:8.1f} ms  passes {r['passes_ms']:8.1f} ms  "
                          f"ratio {r['ratio']:.2f}  (CPU time: {r['ratio_cpu']:.2f})", file=sys.stderr)
                print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
                results.extend(got)
    md = table(results)
    print(md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    if a.json:
        from bench_meta import write_rows

        clean = [{k: v for k, v in r.items()} for r in results]
        for r in clean:
            for key in ("ratio", "ratio_cpu"):
                r[key] = r[key] if math.isfinite(r[key]) else None
        write_rows(a.json, clean)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
