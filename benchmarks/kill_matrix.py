"""Kill every trainer for real at every kind of moment, resume, and compare bit for bit.

    python benchmarks/kill_matrix.py                                   # every trainer, 1 and 2 processes
    python benchmarks/kill_matrix.py --cases dmd2 sid --launches 1 2-fsdp --repeats 2 --json kills.json

For each trainer (on a tiny diffusers UNet teacher built from config; DisBack twice, killed first
in its recording stage and first in its backtracking stage) and each launch (``1``: one
process; ``2``: ``accelerate launch`` with two CPU processes; ``2-fsdp``: the same, sharded) it runs
the same config twice from scratch: once uninterrupted, once SIGKILLed during an iteration, then
(resumed with ``--resume latest``) killed while a checkpoint is being written, then (resumed) killed
while the student is being exported, then resumed to the end. Each kill takes the launcher and every
process under it. A row passes when every tensor of the two runs (the student, the last checkpoint's
weights, optimizer states, EMA and extra networks, DisBack's nodes) is bit-identical. ``--repeats``
runs each row again with other random kill delays.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "tests"))  # the kill harness and the tiny teacher are test support


def main() -> int:
    from conftest import make_tiny_teacher, tiny_config
    from kill_testing import PHASES, differing, final_tensors, killed_then_resumed, launch, write_config
    from test_kill_resume import CASES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="trainers (and DisBack stages) to kill (default: all)")
    p.add_argument("--launches", nargs="+", default=["1", "2"], choices=["1", "2", "2-fsdp"], help="process counts (default: 1 2)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each row, each with other random kill delays")
    p.add_argument("--max-steps", type=int, default=10, help="iterations of each run (a checkpoint every 2)")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--keep", type=Path, help="keep the run folders here (default: a temporary folder, removed)")
    args = p.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="kill-matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher = make_tiny_teacher(work / "teacher")
    rows = []
    for case in args.cases:
        method, overrides, _, first = CASES[case]
        for launch_kind in args.launches:
            processes, fsdp = int(launch_kind[0]), launch_kind.endswith("fsdp")
            for repeat in range(args.repeats):
                folder = work / f"{case}-{launch_kind}-{repeat}"
                folder.mkdir()
                values = {"max_steps": args.max_steps, "checkpoint_every": 2, "checkpoint_total_limit": 0, "preview_every": 0}
                config = write_config(
                    tiny_config(method, folder, teacher, **{**values, **overrides, "fsdp": fsdp}), folder / "config.yaml"
                )
                t0 = time.perf_counter()
                reference = launch(config, folder / "reference", processes, log=folder / "reference.log")
                if processes > 1:  # two ranks already fill two cores: one run at a time
                    reference.wait()
                hits = killed_then_resumed(config, folder / "killed", list(PHASES), first, processes, seed=repeat)
                rc = reference.wait()
                ref = final_tensors(folder / "reference") if rc == 0 else {}
                diff = differing(ref, final_tensors(folder / "killed")) if rc == 0 else ["reference failed"]
                row = {
                    "case": case, "method": method, "launch": launch_kind, "repeat": repeat, "kills": hits,
                    "tensors": len(ref),
                    "identical": not diff, "differing": diff[:5], "seconds": round(time.perf_counter() - t0, 1),
                }
                rows.append(row)
                print(f"{case:18s} {launch_kind:6s} #{repeat} {'identical' if not diff else 'DIFFERENT'} "
                      f"({row['tensors']} tensors, {row['seconds']} s): " + "; ".join(hits), flush=True)
                if not args.keep:
                    shutil.rmtree(folder)
    if not args.keep:
        shutil.rmtree(work)
    bad = [r for r in rows if not r["identical"]]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} rows bit-identical after {sum(len(r['kills']) for r in rows)} kills")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
