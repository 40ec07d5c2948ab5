"""What a benchmark's JSON says about the run: torch threads, torch version, machine."""

from __future__ import annotations

import platform

import torch


def run_meta() -> dict:
    """``{"threads", "torch", "machine"}`` of this process."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
