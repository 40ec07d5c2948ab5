"""DisBack from a generator that starts far from the teacher (issue 13): the gmm setting of
benchmarks/disback_claim.py, at a few iterations, and that benchmark's step counting."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import changed, state_of
from onestep.trainers import load_config, make_trainer
from onestep.weights import save_trainable

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(batch_size=64, log_with="none", export=False, checkpoint_every=0, preview_every=0, regression_warmup_steps=0)


def _far_start(tmp_path: Path) -> dict:
    """A generator whose samples lie far from gmm-ring8's (its output layer's bias shifted by 3) and a
    fresh fake score, saved for ``init_generator`` / ``init_fake_score``."""
    from onestep.teachers import load_teacher

    spec = load_teacher("gmm-ring8")
    torch.manual_seed(0)
    gen, fake = spec.student_factory(), spec.student_factory()
    with torch.no_grad():
        for net in (gen, fake):  # the output layer starts at zero: give both a non-trivial one
            last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.normal_(0, 0.1)
        last_g = [m for m in gen.modules() if isinstance(m, torch.nn.Linear)][-1]
        last_g.bias.add_(3.0)
    g = save_trainable(gen, tmp_path / "far-generator.safetensors")
    f = save_trainable(fake, tmp_path / "fake.safetensors")
    return {"init_generator": str(g), "init_fake_score": str(f)}


def test_far_start_records_from_the_fake_score_on_g0_then_backtracks(tmp_path):
    init = _far_start(tmp_path)
    cfg = {**SMALL, **init, "max_steps": 26, "disback_nodes": 2, "disback_record_steps": 12, "disback_interval": 2,
           "fake_updates_per_generator": 4}
    tr = make_trainer(load_config("gmm_disback", cfg, output_dir=str(tmp_path / "run")))
    assert tr.stage(0) == "record"  # no stage 0 with init_fake_score: recording starts at once
    g0 = state_of(tr.generator)
    torch.manual_seed(0)
    z = torch.randn(500, 2)
    t = torch.full((500,), tr.config.generator_timesteps[0])
    with torch.no_grad():
        x_g0 = tr.generator(z, t, None).float()
    targets = []
    while tr.state.step < 26:
        step = tr.state.step
        tr.train_step()
        if step < 12:
            assert changed(g0, tr.generator) == 0, step  # G0 frozen while the path is recorded
        elif tr.is_generator_step(step):
            targets.append(tr.current_target)
    assert changed(g0, tr.generator) > 0
    # Generator steps at 12, 16, 20, 24: node 1 for two of them, then the teacher itself.
    assert targets == [1, 1, 0, 0]
    nodes = {i: load_file(str(tr.node_path(i))) for i in range(3)}
    fake0 = load_file(init["init_fake_score"])
    assert all(torch.equal(nodes[0][k], fake0[k]) for k in fake0)  # node 0: the fake score the run began with

    # The path leads toward G0's samples: a node further along denoises them better (same noise, same t).
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(x_g0.shape, generator=gen)
    ts = torch.randint(20, 600, (len(x_g0),), generator=gen)
    x_t = tr.schedule.add_noise(x_g0, noise, ts)
    net = tr.extras["node_target"]

    def err(i: int) -> float:
        net.backbone.load_state_dict({**dict(net.backbone.state_dict()), **nodes[i]})
        with torch.no_grad():
            return float((net(x_t, ts, None).float() - x_g0).pow(2).mean())

    assert max(err(1), err(2)) < 0.9 * err(0)
    state = json.loads((tr.node_dir / "state.json").read_text())
    assert state["target"] == "teacher" and state["nodes"] == ["node-00.safetensors", "node-01.safetensors", "node-02.safetensors"]


@pytest.mark.parametrize("max_steps, warned", [(20, True), (21, False)])
def test_a_run_too_short_to_reach_the_teacher_is_warned_about(tmp_path, caplog, max_steps, warned):
    """Record 12, two nodes, interval 2, a generator step every 4th iteration (12, 16, 20, ...): node 1
    for two generator steps, then the teacher from iteration 20 (the grid25 row ran 120 generator steps
    against 3 x 50 of nodes and never reached the teacher)."""
    import logging

    init = _far_start(tmp_path)
    cfg = {**SMALL, **init, "max_steps": max_steps, "disback_nodes": 2, "disback_record_steps": 12, "disback_interval": 2,
           "fake_updates_per_generator": 4}
    with caplog.at_level(logging.WARNING):
        tr = make_trainer(load_config("gmm_disback", cfg, output_dir=str(tmp_path / "run")))
    assert ("ends before the teacher becomes the target" in caplog.text) == warned
    assert "iteration 20" in caplog.text if warned else True
    assert [tr.target_index(s) for s in (12, 16, 20)] == [1, 1, 0] and tr.is_generator_step(20)


def _bench():
    spec = importlib.util.spec_from_file_location("disback_claim", ROOT / "benchmarks" / "disback_claim.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _curve(points, record=0):
    return [{"generator_steps": g, "iteration": record + 5 * g, "sliced_w2": v} for g, v in points]


def test_benchmark_counts_steps_to_reach_the_base_s_final_value():
    b = _bench()
    dmd2 = _curve([(0, 0.5), (10, 0.4), (20, 0.3), (30, 0.25), (40, 0.2)])
    fast = _curve([(0, 0.5), (10, 0.35), (20, 0.19), (30, 0.18), (40, 0.15)], record=200)
    c = b.compare(dmd2, fast)
    assert c["dmd2_final"] == 0.2 and c["dmd2_generator_steps"] == 40
    # DisBack reaches 0.2 at its 20th generator step: iteration 200 (recording) + 100.
    assert c["disback_reach_final"] == {"generator_steps": 20, "iteration": 300}
    assert c["share_final"] == 0.5
    assert c["dmd2_final_mean3"] == pytest.approx(0.25)
    assert c["disback_reach_final_mean3"]["generator_steps"] == 20
    slow = _curve([(0, 0.1), (10, 0.5), (20, 0.45), (30, 0.3), (40, 0.21)])
    c = b.compare(dmd2, slow)
    assert c["disback_reach_final"] is None and c["share_final"] is None  # step 0 (the start) does not count
    assert b.parse_variant("8:400:10") == {"disback_nodes": 8, "disback_record_steps": 400, "disback_interval": 10}


def test_benchmark_reuses_only_runs_made_with_the_same_settings(tmp_path):
    import argparse

    b = _bench()
    args = argparse.Namespace(teacher="gmm-ring8", start_teacher="gmm-grid25", generator_steps=400, warm_steps=1000, samples=3000, eval_every=10)
    runs = {"0": {"dmd2": {"curve": _curve([(0, 0.5), (10, 0.4)]), "seconds": 1.0}}}
    (tmp_path / "results.json").write_text(json.dumps({"args": vars(args), "runs": runs}))
    assert b.reusable_runs(tmp_path / "results.json", args) == runs
    args.generator_steps = 300
    assert b.reusable_runs(tmp_path / "results.json", args) == {}
    assert b.reusable_runs(tmp_path / "absent.json", args) == {}
