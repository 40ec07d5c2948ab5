import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_dmd2_config
from onestep.trainers import DMD2Trainer


def _weights(tr):
    out = {f"g.{k}": v.clone() for k, v in tr.generator.state_dict().items()}
    out.update({f"f.{k}": v.clone() for k, v in tr.fake.state_dict().items()})
    out.update({f"h.{k}": v.clone() for k, v in tr.heads.state_dict().items()})
    if tr.ema is not None:
        out.update({f"ema.{i}": p.clone() for i, p in enumerate(tr.ema.shadow_params)})
    return out


def test_killed_and_resumed_run_ends_with_same_weights(tmp_path, tiny_teacher_dir):
    common = dict(max_steps=6, checkpoint_every=3, ema_decay=0.9, warmup_steps=2, gan_weight_generator=5e-3, export=False)
    full = DMD2Trainer(tiny_dmd2_config(tmp_path / "a", tiny_teacher_dir, **common))
    full.train()

    cfg = tiny_dmd2_config(tmp_path / "b", tiny_teacher_dir, **common)
    killed = DMD2Trainer(cfg)
    step = killed.train_step

    def dies_at_4():
        if killed.state.step == 4:
            raise KeyboardInterrupt("killed")
        return step()

    killed.train_step = dies_at_4
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert [p.name for p in killed.checkpoints()] == ["checkpoint-3"]

    resumed = DMD2Trainer(dataclasses.replace(cfg, resume="latest"))
    resumed.train()
    assert resumed.state.step == 6
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # and the run did not simply stand still
    fresh = DMD2Trainer(tiny_dmd2_config(tmp_path / "c", tiny_teacher_dir, **common))
    assert any(not torch.equal(v, fresh.generator.state_dict()[k[2:]]) for k, v in a.items() if k.startswith("g."))


def test_checkpoint_total_limit(tmp_path, tiny_teacher_dir):
    tr = DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir, max_steps=5, checkpoint_every=1, checkpoint_total_limit=2, export=False))
    tr.train()
    assert [p.name for p in tr.checkpoints()] == ["checkpoint-4", "checkpoint-5"]


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    # Fresh interpreters per rank (forking a process that has used OpenMP can deadlock), and a port
    # of our own: the default 29500 may belong to another job on a shared CI machine.
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = LAUNCH + ["--main_process_port", str(_free_port())] + args
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _why(r: subprocess.CompletedProcess) -> str:
    """The ranks' own tracebacks come first in stderr, the launcher's summary last: show both ends."""
    err = r.stderr
    return err if len(err) < 6000 else err[:4000] + "\n[...]\n" + err[-2000:]


def test_two_process_data_parallel_keeps_ranks_in_sync(tmp_path, tiny_teacher_dir):
    r = _launch([str(Path(__file__).with_name("ddp_worker.py")), str(tmp_path), str(tiny_teacher_dir)])
    assert r.returncode == 0, _why(r)
    res = json.loads((tmp_path / "ddp.json").read_text())
    assert res["processes"] == 2
    assert res["noise"][0] != res["noise"][1]  # each rank draws its own batch ...
    assert res["param_sums"][0] == res["param_sums"][1]  # ... and the weights stay identical
    # The warm-up (10 updates, lr 1e-3) advances once per update whatever the number of processes:
    # 2 generator updates (steps 0 and 2 of 3) -> lr * 3/10, 3 fake-score updates -> lr * 4/10, as on one process.
    assert res["lr"] == pytest.approx({"generator": 1e-3 * 3 / 10, "fake": 1e-3 * 4 / 10})


def test_documented_accelerate_launch_command_runs_two_processes(tmp_path, tiny_teacher_dir):
    """The README's CPU command: one run, two ranks (a random state saved per rank), one student."""
    r = _launch([
        "-m", "onestep.cli", "train", "digits_dmd2", "--teacher", str(tiny_teacher_dir), "--max_steps", "2",
        "--batch_size", "2", "--log_with", "none", "--output-dir", str(tmp_path / "run"),
    ])
    assert r.returncode == 0, _why(r)
    assert r.stdout.count("student written to") == 1
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert sorted(p.name for p in ckpt.glob("random_states_*.safetensors")) == ["random_states_0.safetensors", "random_states_1.safetensors"]
