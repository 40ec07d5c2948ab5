"""Stopping a run cleanly: SIGINT / SIGTERM make the loop write a checkpoint and leave."""

from __future__ import annotations

import signal
import threading

import torch


class StopRequest:
    """SIGINT / SIGTERM during training ask the loop to write a checkpoint and leave (instead of dying
    mid-step). The request is shared across processes at every check, so all of them stop at the same
    step. Handlers are installed only in the main thread; :meth:`restore` (or leaving the ``with`` block)
    puts the old ones back."""

    def __init__(self, accelerator):
        self.accelerator, self.signal_name = accelerator, None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        asked = self.signal_name is not None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(asked)], device=self.accelerator.device)
            asked = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
            self.signal_name = self.signal_name or ("SIGTERM" if asked else None)
        return asked

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()  # whatever ended the run: the process's own handlers come back

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


__all__ = ["StopRequest"]
