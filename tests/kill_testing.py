"""Real SIGKILLs of `onestep train` at chosen moments, then `--resume latest` until the run ends.

Shared by ``tests/test_kill_resume.py`` and ``benchmarks/kill_matrix.py``. A run is a subprocess
(``accelerate launch`` for two processes); a kill is SIGKILL to the launcher and every process
under it, sent when the run folder shows the moment asked for:

- ``step``: a random delay (``delay`` seconds at most) after ``checkpoint-{first}`` appeared,
  so mid-iteration as a rule;
- ``checkpoint``: within 10 ms of a checkpoint's staging folder (``.checkpoint-N.incomplete``)
  appearing, that is while its files are being written (or just after: the hit says which);
- ``export``: the same for the student's staging folder (``.student.incomplete``).

:func:`final_tensors` reads every tensor a finished run leaves (the student, the last checkpoint,
DisBack's nodes) so that two runs can be compared bit for bit.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

PHASES = ("step", "checkpoint", "export")
LAUNCH2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]


def write_config(config, path: Path) -> Path:
    """A trainer config dataclass as the YAML file `onestep train` reads (without its output folder)."""
    from onestep.config import config_to_dict

    values = {k: v for k, v in config_to_dict(config).items() if k != "output_dir"}
    path.write_text(yaml.safe_dump(values))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, out: Path, processes: int = 1, resume: bool = False, log: Path | None = None) -> subprocess.Popen:
    """Start `onestep train CONFIG --output-dir OUT` (``--resume latest`` when ``resume``) in its own session."""
    args = ["-m", "onestep.cli", "train", str(config), "--output-dir", str(out)] + (["--resume", "latest"] if resume else [])
    cmd = [sys.executable, *args] if processes == 1 else LAUNCH2 + ["--main_process_port", str(_free_port()), *args]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    stream = open(log, "ab") if log is not None else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it (torchrun starts its workers in sessions of their own)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [psutil.Process(proc.pid) if proc.poll() is None else None, *family]:
        try:
            if p is not None:
                p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=30)


def _staging(out: Path, prefix: str) -> list[str]:
    try:
        return [n for n in os.listdir(out) if n.startswith(prefix) and n.endswith(".incomplete")]
    except FileNotFoundError:
        return []


def kill_at(proc: subprocess.Popen, out: Path, phase: str, first: int, delay: float, rng: random.Random, timeout: float = 600) -> str:
    """Wait for ``phase`` in the run folder ``out``, then :func:`kill_tree`. Returns what the kill hit:
    ``"step"``, ``"checkpoint write (<staging folder>)"``, ``"export (<staging folder>)"``, or
    ``"finished first"`` when the run ended before the moment came."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "finished first"
        if phase == "step" and (out / f"checkpoint-{first}" / "checkpoint.json").is_file():
            time.sleep(rng.uniform(0, delay))
            kill_tree(proc)
            return "step"
        prefix = {"checkpoint": ".checkpoint-", "export": ".student"}.get(phase)
        if prefix and (seen := _staging(out, prefix)):
            time.sleep(rng.uniform(0, 0.01))  # somewhere in the write
            kill_tree(proc)
            where = "mid-write" if (out / seen[0]).exists() else "after its rename"
            return f"{'checkpoint write' if phase == 'checkpoint' else 'export'} ({seen[0]}, {where})"
        time.sleep(0.0005)
    kill_tree(proc)
    raise TimeoutError(f"{phase} never came in {out}")


def run_to_end(config: Path, out: Path, processes: int = 1, resume: bool = False, log: Path | None = None, timeout: float = 600) -> None:
    proc = launch(config, out, processes, resume, log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""
        raise AssertionError(f"onestep train exited with {rc} in {out}\n{tail}")


def killed_then_resumed(
    config: Path, out: Path, phases: list[str], first: int, processes: int = 1, seed: int = 0, delay: float = 1.0
) -> list[str]:
    """Start a run, kill it at each of ``phases`` in turn (each relaunch with ``--resume latest``), then
    let the last relaunch finish. Returns what each kill hit."""
    rng = random.Random(seed)
    log = out.parent / f"{out.name}.log"
    hits = []
    for i, phase in enumerate(phases):
        proc = launch(config, out, processes, resume=i > 0, log=log)
        hits.append(kill_at(proc, out, phase, first, delay, rng))
    run_to_end(config, out, processes, resume=True, log=log)
    return hits


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a finished run: the student's weights, the last checkpoint's files (weights,
    optimizers, EMA, extra networks; not the per-process random states) and DisBack's nodes."""
    from safetensors.torch import load_file

    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    files = sorted((out / "student").rglob("*.safetensors")) + sorted(last.glob("*.safetensors"))
    files += sorted((out / "disback").glob("*.safetensors")) if (out / "disback").is_dir() else []
    tensors = {}
    for f in files:
        if f.name.startswith("random_states_"):
            continue
        for k, v in load_file(str(f)).items():
            tensors[f"{f.relative_to(out).as_posix().replace(last.name, 'checkpoint-last')}:{k}"] = v
    return tensors


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not bit-identical (or that only one side has)."""
    return sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]


__all__ = ["PHASES", "differing", "final_tensors", "kill_at", "kill_tree", "killed_then_resumed", "launch", "run_to_end", "write_config"]
