"""A run SIGKILLed for real (a subprocess, not a simulated exception) and re-run with ``--resume
latest`` ends bit-identical to an uninterrupted run with the same seed: every trainer, one process
and two. Each kill lands at a moment read off the run folder (see ``kill_testing``): during an
iteration, while a checkpoint is being written, while the student is being exported.
``benchmarks/kill_matrix.py`` runs the whole matrix (every trainer x every moment x 1 and 2 processes).

A real kill costs three fresh interpreters (about 25 s on 2 cores), so the suite kills one case per
moment (``KILLED`` and the two-process test) and resumes the other cases in process instead: a run stopped by an exception after
its checkpoint and resumed with ``resume="latest"`` must end bit-identical too, which checks that every
trainer's checkpoint holds all of its state (the kill itself is trainer-agnostic: staging and renames)."""

from __future__ import annotations

import json

import pytest

import dataclasses

from conftest import tiny_config
from kill_testing import differing, final_tensors, killed_then_resumed, launch, write_config

#: Each run starts a fresh interpreter (5-10 s of imports): the uninterrupted reference runs beside the killed one.
SLOW = pytest.mark.slow

#: case -> (method, config overrides, the moment of the kill, the first checkpoint a "step" kill waits for)
CASES = {
    # DMD2 with its update ratio (K=2), GAN head and EMA
    "dmd2": ("dmd2", dict(fake_updates_per_generator=2, gan_weight_generator=0.1, ema_decay=0.9), "checkpoint", 2),
    # f-distill: the running ratio means are part of the state
    "fdistill": ("fdistill", dict(gan_weight_generator=0.1, gan_weight_discriminator=0.1), "step", 2),
    "sid": ("sid", dict(), "export", 2),
    "vsd": ("vsd", dict(fake_score="lora", lora_rank=2), "step", 4),
    # DisBack: nodes 0-2 recorded in steps 0-4 (generator frozen), then the backtracking stage; killed in it
    "disback-backtrack": (
        "disback-dmd2", dict(disback_nodes=2, disback_record_steps=4, disback_interval=1, fake_updates_per_generator=1), "step", 6,
    ),
    # ... and killed while recording its nodes (steps 0-7, nodes written at 0, 4 and 8)
    "disback-record": (
        "disback-dmd2", dict(disback_nodes=2, disback_record_steps=8, disback_interval=1, fake_updates_per_generator=1), "step", 2,
    ),
    # consistency distillation with its EMA target
    "consistency": ("consistency", dict(num_ddim_timesteps=10, target_ema_decay=0.9), "checkpoint", 2),
}
#: Killed for real in the suite, one process: mid-export and mid-iteration in a stage switch (the two-process
#: test below kills DMD2 mid-checkpoint); the rest are resumed in process below, and all are killed by
#: ``benchmarks/kill_matrix.py``.
KILLED = ("sid", "disback-backtrack")


#: Every run: 10 iterations, a checkpoint every 2, all kept, no previews.
RUN = dict(max_steps=10, checkpoint_every=2, checkpoint_total_limit=0, preview_every=0)


def _config(method: str, tmp_path, teacher, **overrides):
    values = {**RUN, **overrides}
    return write_config(tiny_config(method, tmp_path, teacher, **values), tmp_path / "config.yaml")


def _assert_same_run(reference, resumed):
    diff = differing(final_tensors(reference), final_tensors(resumed))
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"


@SLOW
@pytest.mark.parametrize("case", KILLED)
def test_a_killed_run_resumes_bit_identical(case, tmp_path, tiny_teacher_dir):
    method, overrides, phase, first = CASES[case]
    config = _config(method, tmp_path, tiny_teacher_dir, **overrides)
    reference = launch(config, tmp_path / "reference", log=tmp_path / "reference.log")
    hits = killed_then_resumed(config, tmp_path / "killed", [phase], first, seed=len(case))
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert hits[0] != "finished first" and hits[0].startswith({"step": "step", "checkpoint": "checkpoint", "export": "export"}[phase])
    _assert_same_run(tmp_path / "reference", tmp_path / "killed")
    if method.startswith("disback"):  # the nodes are compared above; the stage record too
        states = [json.loads((tmp_path / r / "disback" / "state.json").read_text()) for r in ("reference", "killed")]
        assert states[0] == states[1] and states[0]["stage"] == "backtrack" and len(states[0]["nodes"]) == 3


@SLOW
def test_a_two_process_run_killed_mid_checkpoint_resumes_bit_identical(tmp_path, tiny_teacher_dir):
    """Under `accelerate launch` the kill takes the launcher and both ranks, here while a checkpoint is being
    written; each rank's random state and the shared weights come back from the last whole checkpoint.
    (`benchmarks/kill_matrix.py` kills two-process runs at every moment.)"""
    _, overrides, _, _ = CASES["dmd2"]
    config = _config("dmd2", tmp_path, tiny_teacher_dir, **{**overrides, "max_steps": 6})
    reference = launch(config, tmp_path / "reference", processes=2, log=tmp_path / "reference.log")
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    hits = killed_then_resumed(config, tmp_path / "killed", ["checkpoint"], 2, processes=2, seed=1)
    assert "finished first" not in hits, hits
    _assert_same_run(tmp_path / "reference", tmp_path / "killed")


@pytest.mark.parametrize("case", [c for c in CASES if c not in KILLED])
def test_a_run_stopped_after_a_checkpoint_resumes_bit_identical_in_process(case, tmp_path, tiny_teacher_dir):
    """The same comparison without the interpreters: the run dies (an exception) in the iteration after
    checkpoint ``first + 2`` was written, a new trainer resumes ``latest`` and runs to the end."""
    from onestep.trainers import make_trainer

    method, overrides, _, first = CASES[case]
    config = tiny_config(method, tmp_path, tiny_teacher_dir, **{**RUN, **overrides})
    make_trainer(dataclasses.replace(config, output_dir=str(tmp_path / "reference"))).train()
    stopped = make_trainer(dataclasses.replace(config, output_dir=str(tmp_path / "stopped")))
    step, dies_at = stopped.train_step, first + 3

    def dies():
        if stopped.state.step == dies_at:
            raise KeyboardInterrupt
        return step()

    stopped.train_step = dies
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    assert not (tmp_path / "stopped" / "student").exists() and (tmp_path / "stopped" / f"checkpoint-{first + 2}").is_dir()
    resumed = make_trainer(dataclasses.replace(config, output_dir=str(tmp_path / "stopped"), resume="latest"))
    resumed.train()
    assert resumed.state.step == config.max_steps
    _assert_same_run(tmp_path / "reference", tmp_path / "stopped")
