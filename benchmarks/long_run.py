"""A long training run: does the trainer's memory stay flat, and does checkpoint pruning keep its word?

    python benchmarks/long_run.py
    python benchmarks/long_run.py --config gmm_dmd2 --steps 5000 --checkpoint_every 250 --checkpoint_total_limit 3 --json long_run.json

Runs ``onestep train CONFIG`` (default the ``gmm_dmd2`` preset: the analytic 8-mode ring teacher, an
MLP student, DMD2 with a regression warm start) as its own process for ``--steps`` iterations (5000: about
40 min on a 2-core CPU shared with other work),
writing a checkpoint every ``--checkpoint_every`` and keeping at most ``--checkpoint_total_limit``.
The training step is read from the progress bar; the resident memory of the process tree (the
trainer and any children) is sampled every ``--sample_every`` seconds. Reports RSS at start (the
first sample at or after ``--warmup_step``), settled (the first sample once every one-off has run:
``--warmup_step`` steps after the latest of the first preview, the first checkpoint and the end of
the regression warm start; the first preview imports matplotlib, about 35 MiB once), max, and end
(the last sample of the loop, before the export), and whether end lies within ``--tolerance`` of
settled (the verdict) and of start. While the run goes it also watches the run folder:
the most ``checkpoint-*`` folders seen at once. At the end it counts the ``checkpoint-*`` folders
left (at most the limit) and the staging folders (``.checkpoint-N.incomplete`` / ``.*.old``; none
may be left), and checks the student was exported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_load import tree_rss_bytes  # noqa: E402 - one process-tree RSS reader for both benchmarks

BAR_RE = re.compile(r"distillation:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def checkpoint_dirs(run: Path) -> list[Path]:
    return sorted((p for p in run.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()), key=lambda p: int(p.name.split("-")[-1]))


def staging_dirs(run: Path) -> list[Path]:
    return sorted(p for p in run.glob(".*") if p.name.endswith((".incomplete", ".old")))


class Watch:
    """Reads the trainer's output (the tqdm bar gives the step) and samples its RSS and run folder."""

    def __init__(self, proc: subprocess.Popen, run: Path, log: Path, every: float):
        self.proc, self.run, self.every = proc, run, every
        self.step = 0
        self.samples: list[tuple[float, int, int]] = []  # (seconds, step, bytes)
        self.max_checkpoints = 0
        self.max_staging = 0
        self.t0 = time.perf_counter()
        self._log = open(log, "w")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.reader.start()
        self.sampler.start()

    def _read(self) -> None:
        buf = ""
        for chunk in iter(lambda: self.proc.stdout.read1(4096) if hasattr(self.proc.stdout, "read1") else self.proc.stdout.read(4096), b""):
            text = chunk.decode(errors="replace")
            self._log.write(text)
            buf += text
            *parts, buf = re.split(r"[\r\n]", buf)
            for part in parts:
                m = BAR_RE.search(part)
                if m:
                    self.step = int(m.group(1))
        self._log.close()

    def _sample(self) -> None:
        while self.proc.poll() is None:
            rss = tree_rss_bytes(self.proc.pid)
            if rss and self.proc.poll() is None:
                self.samples.append((time.perf_counter() - self.t0, self.step, rss))
            self.max_checkpoints = max(self.max_checkpoints, len(checkpoint_dirs(self.run)))
            self.max_staging = max(self.max_staging, len(staging_dirs(self.run)))
            time.sleep(self.every)


def first_at(samples, step: int):
    return next((s for s in samples if s[1] >= step), None)


def measure(args) -> dict:
    tmp = None
    if args.output_dir:
        run = Path(args.output_dir)
    else:
        tmp = tempfile.mkdtemp(prefix="long_run_")
        run = Path(tmp) / "run"
    cmd = [
        sys.executable, "-m", "onestep.cli", "train", args.config, "--output-dir", str(run),
        "--max_steps", str(args.steps), "--checkpoint_every", str(args.checkpoint_every),
        "--checkpoint_total_limit", str(args.checkpoint_total_limit), "--overwrite", "true",
    ]
    for kv in args.set:
        k, _, v = kv.partition("=")
        cmd += [f"--{k}", v]
    log = Path(args.log) if args.log else run.parent / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    watch = Watch(proc, run, log, args.sample_every)
    timed_out = False
    try:
        proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.terminate()  # the trainer checkpoints and stops on SIGTERM
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t0
    watch.reader.join(30)
    watch.sampler.join(30)

    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    warm_start = int(config.get("regression_warmup_steps") or 0)
    samples = watch.samples
    loop = [s for s in samples if s[1] < args.steps] or samples  # before the final checkpoint and export
    start = first_at(samples, args.warmup_step)
    # Every one-off has happened by then: the first preview (matplotlib), the first checkpoint, the warm start.
    preview_every = int(config.get("preview_every") or 0)
    settle_step = max(args.warmup_step, preview_every, args.checkpoint_every, warm_start) + args.warmup_step
    settled = first_at(samples, settle_step)
    end = loop[-1] if loop else None
    mb = lambda s: None if s is None else s[2] / 2**20  # noqa: E731
    ckpts, staged = checkpoint_dirs(run), staging_dirs(run)
    out = {
        "command": " ".join(cmd[1:]).replace("-m onestep.cli", "onestep"),
        "config": args.config, "steps": args.steps, "steps_reached": watch.step,
        "checkpoint_every": args.checkpoint_every, "checkpoint_total_limit": args.checkpoint_total_limit,
        "checkpoints_written": args.steps // args.checkpoint_every + (0 if args.steps % args.checkpoint_every == 0 else 1),
        "regression_warmup_steps": warm_start,
        "returncode": proc.returncode, "timed_out": timed_out, "wall_seconds": wall,
        "steps_per_second": watch.step / wall if wall else None,
        "rss_start_mb": mb(start), "rss_start_at_step": start and start[1],
        "rss_settled_mb": mb(settled), "rss_settled_at_step": settled and settled[1],
        "rss_max_mb": max(s[2] for s in samples) / 2**20 if samples else None,
        "rss_end_mb": mb(end), "rss_end_at_step": end and end[1],
        "rss_samples": len(samples),
        "checkpoints_left": [p.name for p in ckpts],
        "checkpoints_left_count": len(ckpts),
        "max_checkpoints_seen_during_run": watch.max_checkpoints,
        "staging_left": [p.name for p in staged],
        "max_staging_seen_during_run": watch.max_staging,
        "student_exported": (run / "student" / "onestep.json").is_file(),
        "log": str(log),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
    }
    out["rss_end_vs_start"] = out["rss_end_mb"] / out["rss_start_mb"] - 1 if start and end else None
    out["rss_flat_from_start"] = out["rss_end_vs_start"] is not None and abs(out["rss_end_vs_start"]) <= args.tolerance
    out["rss_end_vs_settled"] = out["rss_end_mb"] / out["rss_settled_mb"] - 1 if settled and end else None
    out["rss_flat"] = out["rss_end_vs_settled"] is not None and abs(out["rss_end_vs_settled"]) <= args.tolerance
    # a thinned series for the JSON: about 200 points
    stride = max(1, len(samples) // 200)
    out["rss_series"] = [(round(t, 1), st, round(b / 2**20, 1)) for t, st, b in samples[::stride]]
    out["passed"] = bool(
        proc.returncode == 0 and not timed_out and out["rss_flat"]
        and len(ckpts) <= args.checkpoint_total_limit and not staged and out["student_exported"]
    )
    if tmp and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
        out["log"] = None
    return out


def report(out: dict) -> str:
    f = lambda v, fmt="{:.0f}": "-" if v is None else fmt.format(v)  # noqa: E731
    pct = lambda v: "-" if v is None else f"{100 * v:+.1f} %"  # noqa: E731
    rows = [
        ("command", out["command"]),
        ("steps reached / asked", f"{out['steps_reached']} / {out['steps']} (exit code {out['returncode']}{', TIMED OUT' if out['timed_out'] else ''})"),
        ("wall time", f"{out['wall_seconds']:.0f} s ({f(out['steps_per_second'], '{:.1f}')} steps/s, start-up and export included)"),
        ("RSS start", f"{f(out['rss_start_mb'])} MiB (step {out['rss_start_at_step']})"),
        ("RSS settled (one-offs done)", f"{f(out['rss_settled_mb'])} MiB (step {out['rss_settled_at_step']})"),
        ("RSS max / end", f"{f(out['rss_max_mb'])} / {f(out['rss_end_mb'])} MiB (end: step {out['rss_end_at_step']})"),
        ("RSS end vs settled", f"{pct(out['rss_end_vs_settled'])} ({'flat' if out['rss_flat'] else 'NOT flat'})"),
        ("RSS end vs start", f"{pct(out['rss_end_vs_start'])} ({'within' if out['rss_flat_from_start'] else 'NOT within'} the tolerance)"),
        ("checkpoints written / left / limit", f"{out['checkpoints_written']} / {out['checkpoints_left_count']} / {out['checkpoint_total_limit']} ({', '.join(out['checkpoints_left'])})"),
        ("most checkpoints seen at once", str(out["max_checkpoints_seen_during_run"])),
        ("staging folders left", str(len(out["staging_left"])) + (f" ({', '.join(out['staging_left'])})" if out["staging_left"] else "")),
        ("student exported", str(out["student_exported"])),
        ("passed", str(out["passed"])),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gmm_dmd2", help="preset name or YAML file")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--checkpoint_every", type=int, default=250)
    p.add_argument("--checkpoint_total_limit", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another config override (repeatable)")
    p.add_argument("--warmup_step", type=int, default=200, help="RSS at the first sample at or after this step is 'start'")
    p.add_argument("--tolerance", type=float, default=0.05, help="'flat': end RSS within this fraction of settled (and, reported, of start)")
    p.add_argument("--sample_every", type=float, default=1.0, help="seconds between RSS samples")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped (SIGTERM)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None, help="run folder (default: a temporary one, removed); a previous run there is overwritten")
    p.add_argument("--keep", action="store_true", help="keep the temporary run folder")
    p.add_argument("--log", default=None, help="the trainer's output goes here (default: beside the run folder)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()
    out = measure(args)
    print(report(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
