"""torch.compile and channels-last, before and after (issue 15): one-step sampling and training steps.

    python benchmarks/speed_features.py                        # every row and variant (~15 min on 2 cores, compiling)
    python benchmarks/speed_features.py --rows sample-1 --variants eager,compile --json sf.json

Rows:
    sample-1, sample-64   the digits teacher's UNet as a one-step generator: one forward (no grad) at batch 1 / 64
    step-dmd2             a digits_dmd2 training step (batch 16: generator and fake-score updates as the preset
                          alternates them), built with the config fields the variant sets
Variants (the trainer's config fields ``channels_last`` and ``torch_compile``; for sampling the same done to the UNet):
    eager, channels_last, compile, compile+channels_last

Each variant is timed in blocks, interleaved with the others (``--blocks`` rounds of ``--reps`` calls each, after
``--warmup`` calls); the figure is the median block's time per call. For compiled variants the first calls
(compilation) are timed apart: ``compile_s``, and the number of calls after which compiling has paid for itself
against eager (``break_even``). Compiled kernels are cached on disk by torch (``TORCHINDUCTOR_CACHE_DIR``): a
second run on the same machine compiles much faster; ``--inductor-cache fresh`` (the default) times the first
run's compile in an empty cache, ``reuse`` keeps torch's own.

Output: a markdown table (printed, and written to ``--out``) and ``--json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = {"eager": {}, "channels_last": {"channels_last": True}, "compile": {"torch_compile": True},
            "compile+channels_last": {"channels_last": True, "torch_compile": True}}
ROWS = ("sample-1", "sample-64", "step-dmd2")


def sampler(fields: dict, batch: int):
    """A callable that runs one no-grad forward of the digits UNet at ``batch``, set up as ``fields`` say."""
    from onestep.teachers import load_teacher

    unet = load_teacher("digits").denoiser().backbone.eval().requires_grad_(False)
    if fields.get("channels_last"):
        unet.to(memory_format=torch.channels_last)
    if fields.get("torch_compile"):
        unet.compile()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(batch, 1, 16, 16, generator=g), torch.full((batch,), 600), torch.arange(batch) % 10

    def call():
        with torch.no_grad():
            unet(x, t, class_labels=y)

    return call


def stepper(fields: dict, work: Path):
    """A callable that runs one ``digits_dmd2`` training step, the trainer built with ``fields``."""
    from onestep.trainers import load_config, make_trainer

    config = load_config("digits_dmd2", {"log_with": "none", "preview_every": 0, "checkpoint_every": 0, "overwrite": True,
                                         "max_steps": 100_000, **fields}, output_dir=str(work))
    trainer = make_trainer(config)
    return trainer.train_step


def build(row: str, fields: dict, work: Path):
    if row.startswith("sample-"):
        return sampler(fields, int(row.split("-")[1]))
    if row == "step-dmd2":
        return stepper(fields, work)
    raise SystemExit(f"unknown row {row!r}; choose from {', '.join(ROWS)}")


def measure(row: str, variants: list[str], warmup: int, reps: int, blocks: int, work: Path) -> list[dict]:
    calls, first = {}, {}
    for v in variants:
        call = build(row, VARIANTS[v], work / f"{row}-{v}")
        t0 = time.perf_counter()
        for _ in range(warmup):
            call()
        first[v] = time.perf_counter() - t0
        calls[v] = call
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(blocks):
        for v in variants:
            t0 = time.perf_counter()
            for _ in range(reps):
                calls[v]()
            times[v].append((time.perf_counter() - t0) / reps)
    out = []
    eager = statistics.median(times["eager"]) if "eager" in times else None
    for v in variants:
        per_call = statistics.median(times[v])
        rec = {"row": row, "variant": v, "ms": per_call * 1e3, "warmup_s": first[v], "blocks_ms": [t * 1e3 for t in times[v]]}
        if eager:
            rec["speedup"] = eager / per_call
            if "compile" in v:
                # compiling's extra cost: the warm-up beyond what as many eager calls take
                rec["compile_s"] = first[v] - warmup * eager
                gain = eager - per_call
                rec["break_even"] = rec["compile_s"] / gain if gain > 0 else None
        out.append(rec)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| row | variant | ms / call | vs eager | compile s | calls to break even |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        compile_s = f"{r['compile_s']:.0f}" if "compile_s" in r else "-"
        be = f"{r['break_even']:.0f}" if r.get("break_even") else ("never" if "compile_s" in r else "-")
        lines.append(f"| {r['row']} | {r['variant']} | {r['ms']:.2f} | {speedup} | {compile_s} | {be} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)} (eager first)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--inductor-cache", choices=("fresh", "reuse"), default="fresh",
                   help="fresh: compile into an empty cache (a first run's cost); reuse: torch's own cache")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.inductor_cache == "fresh":
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor-cache")
        for row in [r.strip() for r in args.rows.split(",")]:
            print(f"{row}: {', '.join(variants)} ...", file=sys.stderr, flush=True)
            rows += measure(row, variants, args.warmup, args.reps, args.blocks, Path(tmp))
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        from bench_meta import write_rows

        write_rows(str(args.json), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
