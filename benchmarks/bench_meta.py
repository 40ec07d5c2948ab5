"""A benchmark's JSON: its rows, and what it says about the run (torch threads, torch version, machine)."""

from __future__ import annotations

import json
import platform

import torch


def run_meta() -> dict:
    """``{"threads", "torch", "machine"}`` of this process."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine()}


def write_rows(path: str, rows: list[dict]) -> None:
    """``{"meta": run_meta(), "rows": rows}`` into ``path`` (JSON, indent 1)."""
    with open(path, "w") as f:
        json.dump({"meta": run_meta(), "rows": rows}, f, indent=1)
