"""benchmarks/trainer_overhead.py on one cheap row, in-process: the step is timed against passes it really ran."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_dmd2_digits_step_against_its_passes(tmp_path):
    import trainer_overhead as bench

    # the digits_dmd2 preset at batch 4 (the benchmark runs the preset's 16), few steps: seconds
    rows = bench.run_row("dmd2", "digits", tmp_path, steps=2, warmup=1, reps=1, profile_steps=1, overrides={"batch_size": 4})
    kinds = {r["kind"]: r for r in rows}
    # digits_dmd2: two fake-score updates per generator update
    assert set(kinds) == {"G+F", "F"}
    gen = kinds["G+F"]
    roles = {(p["role"], p["grad"]) for p in gen["passes"]}
    assert ("generator", True) in roles  # G(z) with its backward
    assert ("teacher", False) in roles  # the guided teacher, no gradient
    assert ("fake", True) in roles and ("fake", False) in roles  # DM pass, then the fake-score loss
    teacher = next(p for p in gen["passes"] if p["role"] == "teacher")
    assert teacher["shapes"][0][0] == 2 * gen["batch"]  # CFG: cond and uncond in one batched pass
    assert {p["role"] for p in kinds["F"]["passes"]} == {"generator", "fake"}
    for r in rows:
        assert r["batch"] == 4 and r["steps_timed"] == 2
        assert r["passes_ms"] > 0 and all(p["total"] > 0 for p in r["passes"])
        assert r["step_ms"] >= 0.5 * r["passes_ms"]
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and math.isfinite(r["ratio_cpu"])
        assert r["overhead_parts_ms"]["optimizer (_update: grad avg, clip, AdamW, sched)"] > 0
    md = bench.table(rows)
    assert "| dmd2 | digits | 4 | G+F |" in md


def test_help_explains_the_method(capsys):
    import pytest

    import trainer_overhead as bench

    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert "replay" in out.lower() and "--rows" in out and "--teachers" in out and "--steps" in out
