"""The trainer's speed switches (trainers/memory.py): channels_last and torch_compile."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import changed, state_of, tiny_config

from onestep.trainers import make_trainer
from onestep.trainers.memory import triad_backbones


def _four_d(net):
    return [p for p in net.parameters() if p.dim() == 4]


def test_channels_last_trains_the_same_weights_in_nhwc(tiny_teacher_dir, tmp_path):
    eager = make_trainer(tiny_config("dmd2", tmp_path / "a", tiny_teacher_dir))
    nhwc = make_trainer(tiny_config("dmd2", tmp_path / "b", tiny_teacher_dir, channels_last=True))
    nets = triad_backbones(nhwc.triad)
    assert len(nets) == 3  # generator, full-copy fake score, teacher
    for net in nets:
        w = _four_d(net)
        assert w and all(p.is_contiguous(memory_format=torch.channels_last) for p in w if p.shape[-1] > 1 or p.shape[-2] > 1)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in _four_d(eager.generator.backbone) if p.shape[-1] > 1)
    teacher_before = state_of(nhwc.teacher.backbone)
    g_before = state_of(nhwc.generator.backbone)
    # the same computation in another layout: the same losses, to float rounding (the weights after an
    # update are not compared: Adam's first step is lr * sign(grad), which rounding can flip where grad ~ 0)
    for _ in range(2):  # a generator step with its fake-score step, then a fake-score step alone
        a, b = eager.train_step(), nhwc.train_step()
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert changed(g_before, nhwc.generator.backbone) > 0 and changed(teacher_before, nhwc.teacher.backbone) == 0


def test_torch_compile_compiles_each_backbone_once_in_place(tiny_teacher_dir, tmp_path):
    eager = make_trainer(tiny_config("dmd2", tmp_path / "a", tiny_teacher_dir, fake_score="lora"))
    compiled = make_trainer(tiny_config("dmd2", tmp_path / "b", tiny_teacher_dir, fake_score="lora", torch_compile=True))
    nets = triad_backbones(compiled.triad)
    assert len(nets) == 2  # the LoRA fake score is the teacher's backbone: compiled once
    assert all(net._compiled_call_impl is not None for net in nets)
    assert all(net._compiled_call_impl is None for net in triad_backbones(eager.triad))
    # in place: the state dict (checkpoints, exports) keeps its keys
    assert list(compiled.generator.backbone.state_dict()) == list(eager.generator.backbone.state_dict())


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ONESTEP_TEST_COMPILE"), reason="compiles the tiny UNet's forward and backward: "
                    "~140 s on 2 CPU cores, past the suite's budget; set ONESTEP_TEST_COMPILE=1 to run it")
def test_a_compiled_run_trains_like_an_eager_one(tiny_teacher_dir, tmp_path):
    eager = make_trainer(tiny_config("dmd2", tmp_path / "a", tiny_teacher_dir, batch_size=2))
    compiled = make_trainer(tiny_config("dmd2", tmp_path / "b", tiny_teacher_dir, batch_size=2, torch_compile=True))
    g_before = state_of(compiled.generator.backbone)
    for _ in range(2):
        a, b = eager.train_step(), compiled.train_step()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert changed(g_before, compiled.generator.backbone) > 0


def test_speed_features_bench_times_each_variant_against_eager(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import speed_features

    rows = speed_features.measure("sample-1", ["eager", "channels_last"], warmup=1, reps=2, blocks=2, work=tmp_path)
    assert [r["variant"] for r in rows] == ["eager", "channels_last"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0 and all(len(r["blocks_ms"]) == 2 for r in rows)
    md = speed_features.table(rows + [{"row": "step-dmd2", "variant": "compile", "ms": 2.0, "speedup": 1.5, "compile_s": 30.0,
                                       "break_even": 45.0}])
    assert "| sample-1 | eager |" in md and "| step-dmd2 | compile | 2.00 | 1.50x | 30 | 45 |" in md
