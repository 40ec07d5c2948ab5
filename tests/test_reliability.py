"""Crash safety of the loop: checkpoints and students are written aside and renamed into place,
``--resume latest`` skips incomplete checkpoints and starts fresh when there is none, SIGTERM makes
the run checkpoint and leave, and non-finite gradients are skipped, counted and finally stop the run
before a non-finite weight is ever written."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_dmd2_config
from onestep.errors import ConfigError, TrainingDiverged
from onestep.trainers import DMD2Trainer
from onestep.trainers.checkpoint import CHECKPOINT_MARKER


def test_checkpoints_are_staged_then_renamed_and_incomplete_ones_are_skipped(tmp_path, tiny_teacher_dir, caplog):
    cfg = tiny_dmd2_config(tmp_path, tiny_teacher_dir, max_steps=4, checkpoint_every=2, checkpoint_total_limit=0, export=False)
    DMD2Trainer(cfg).train()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))) == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((run / "checkpoint-4" / CHECKPOINT_MARKER).read_text())["step"] == 4
    # a crash of an older onestep left checkpoint-6 half written (no marker): latest skips it, naming it
    (run / "checkpoint-6").mkdir()
    (run / "checkpoint-6" / "model.safetensors").write_bytes(b"")
    resumed = DMD2Trainer(dataclasses.replace(cfg, max_steps=5, resume="latest"))
    with caplog.at_level(logging.WARNING):
        assert resumed.load_checkpoint("latest") is True
    assert resumed.state.step == 4 and "skipping" in caplog.text and "checkpoint-6" in caplog.text
    with pytest.raises(Exception, match="incomplete checkpoint"):
        resumed.load_checkpoint(str(run / "checkpoint-6"))


def test_resume_latest_without_a_checkpoint_starts_a_new_run(tmp_path, tiny_teacher_dir, caplog):
    tr = DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir, max_steps=2, resume="latest", export=False))
    with caplog.at_level(logging.WARNING):
        tr.train()
    assert tr.state.step == 2 and tr.steps_run == 2 and "starting a new run" in caplog.text


def test_an_existing_student_is_replaced_only_whole(tmp_path, tiny_teacher_dir, monkeypatch):
    import onestep.export as export

    tr = DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir, max_steps=1))
    student = tr.train()
    before = {p.relative_to(student): p.read_bytes() for p in student.rglob("*") if p.is_file()}
    real = export.export_student

    def crashes_half_way(out, *args, **kwargs):
        (Path(out) / "onestep.json").write_text("{")  # half a file, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(export, "export_student", crashes_half_way)
    with pytest.raises(OSError, match="disk full"):
        tr.export()
    after = {p.relative_to(student): p.read_bytes() for p in student.rglob("*") if p.is_file()}
    assert after == before  # the old student is untouched
    monkeypatch.setattr(export, "export_student", real)
    assert tr.export() == student and (student / "onestep.json").is_file()
    assert not list(tmp_path.joinpath("run").glob(".student*"))  # no staging folder left behind


def test_nonfinite_gradients_skip_the_update_and_stop_after_n_in_a_row(tmp_path, tiny_teacher_dir):
    tr = DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir, max_steps=20, fake_updates_per_generator=1,
                                      max_nonfinite_updates=3, checkpoint_every=1, export=False))
    loss = tr.generator_loss
    bad_steps = {1, 3, 4, 5}
    tr.generator_loss = lambda batch: (lambda out: (out[0] * float("nan"), out[1]) if tr.state.step in bad_steps else out)(loss(batch))
    tr.train_step()  # step 0: fine
    weights = {k: v.clone() for k, v in tr.generator.state_dict().items()}
    logs = tr.train_step()  # step 1: NaN -> skipped, counted
    assert logs["nonfinite/skipped"] == 1.0 and all(torch.equal(v, tr.generator.state_dict()[k]) for k, v in weights.items())
    tr.train_step()  # step 2: fine again, resets the run of bad ones
    tr.save_checkpoint()
    tr.train_step()
    tr.train_step()  # steps 3, 4: two in a row
    with pytest.raises(TrainingDiverged, match=r"step 5: 3 generator updates in a row .*run/checkpoint-3 "):
        tr.train_step()
    assert all(torch.isfinite(p).all() for p in tr.generator.parameters())  # nothing non-finite got in


def test_a_nonfinite_weight_never_reaches_a_checkpoint_or_a_student(tmp_path, tiny_teacher_dir):
    tr = DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir, max_steps=1))
    with torch.no_grad():
        next(tr.generator.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="non-finite weights"):
        tr.save_checkpoint()
    with pytest.raises(TrainingDiverged, match="no student written"):
        tr.export()
    assert not (tmp_path / "run" / "student").exists() and not tr.checkpoints()


def test_sigterm_writes_a_checkpoint_and_the_same_command_resumes(tmp_path, tiny_teacher_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    def command(max_steps: int) -> list[str]:
        return [sys.executable, "-m", "onestep.cli", "train", "digits_dmd2", "--teacher", str(tiny_teacher_dir),
                "--max_steps", str(max_steps), "--batch_size", "2", "--log_with", "none", "--preview_every", "0",
                "--checkpoint_every", "0", "--output-dir", str(tmp_path / "run")]

    proc = subprocess.Popen(command(100000), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "config.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(2.0)  # inside the loop
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume latest" in err and "Traceback" not in err
    ckpts = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / CHECKPOINT_MARKER).is_file()
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 0 < stopped_at < 100000 and not (tmp_path / "run" / "student").exists()
    # the same command, resumed, continues from there to a new max_steps
    again = subprocess.run(command(stopped_at + 2) + ["--resume", "latest"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "run" / f"checkpoint-{stopped_at + 2}").is_dir() and (tmp_path / "run" / "student").is_dir()


def test_a_folder_holding_another_run_is_refused_unless_resumed_or_overwritten(tmp_path, tiny_teacher_dir):
    from onestep.errors import ConfigError

    cfg = tiny_dmd2_config(tmp_path, tiny_teacher_dir, max_steps=1)
    DMD2Trainer(cfg).train()
    run = tmp_path / "run"
    (run / "notes.txt").write_text("mine")  # a file of the user's, not of the run
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(ConfigError, match=r"holds another run .*--resume latest.*--overwrite true"):
        DMD2Trainer(cfg).train()
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written or removed
    DMD2Trainer(dataclasses.replace(cfg, max_steps=2, overwrite=True)).train()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]  # the old run's checkpoint-1 is gone
    assert (run / "notes.txt").read_text() == "mine" and (run / "student").is_dir()


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape"])
def test_a_damaged_student_gives_one_clear_line_and_exit_code_2(damage, tmp_path, tiny_teacher_dir):
    from onestep.errors import StudentFormatError
    from onestep.export import load_student

    student = DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir, max_steps=1)).train()
    weights = student / "generator" / "diffusion_pytorch_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = "not a whole safetensors file"
    else:
        cfg_file = student / "generator" / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["block_out_channels"] = [c * 2 for c in cfg["block_out_channels"]]  # the weights no longer fit
        cfg_file.write_text(json.dumps(cfg))
        expected = "the generator does not load"
    with pytest.raises(StudentFormatError, match=expected):
        load_student(student)
    r = subprocess.run([sys.executable, "-m", "onestep.cli", "sample", "--student", str(student), "--num-samples", "1",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()  # one line, nothing written


def test_signal_handlers_are_restored_however_the_run_ends(tmp_path, tiny_teacher_dir):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    tr = DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir, max_steps=3, export=False))
    seen = []
    step = tr.train_step

    def fails():
        seen.append(signal.getsignal(signal.SIGTERM))  # during the run: the loop's handler
        raise RuntimeError("boom")

    tr.train_step = fails
    with pytest.raises(RuntimeError, match="boom"):
        tr.train()
    assert seen and seen[0] not in before
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # a Ctrl-C still interrupts
    tr.train_step = step


def test_checkpoints_hold_no_pickle_and_a_foreign_pickle_is_refused(tmp_path, tiny_teacher_dir):
    """Resume reads safetensors and JSON only: a checkpoint folder holding a pickle is refused, unread."""
    cfg = tiny_dmd2_config(tmp_path, tiny_teacher_dir, max_steps=2, ema_decay=0.9, gan_weight_generator=0.1, export=False)
    tr = DMD2Trainer(cfg)
    tr.train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    suffixes = {p.suffix for p in ckpt.iterdir()}
    assert suffixes == {".safetensors", ".json"}, suffixes
    assert json.loads((ckpt / "checkpoint.json").read_text())["format"] == 2
    (ckpt / "random_states_0.pkl").write_bytes(b"\x80\x04not read")
    resumed = DMD2Trainer(dataclasses.replace(cfg, resume="latest"))
    with pytest.raises(ConfigError, match="holds pickle files .*random_states_0.pkl.* never unpickles"):
        resumed.load_checkpoint("latest")


def test_random_states_round_trip_without_pickle():
    """The global generators (torch, NumPy, Python) come back exactly from a checkpoint's random states."""
    import random

    import numpy as np

    from onestep.trainers.checkpoint_files import random_states, set_random_states
    from onestep.weights import save_tensors

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.rand(5), np.random.normal(size=3)  # a cached Gaussian in NumPy's state too
    saved = random_states()
    expected = torch.rand(4), np.random.normal(size=4), random.random()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    from safetensors import safe_open

    file = save_tensors(saved[0], Path(tempfile.mkdtemp()) / "r.safetensors", metadata=saved[1])
    with safe_open(str(file), "pt") as f:
        set_random_states({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    again = torch.rand(4), np.random.normal(size=4), random.random()
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]
