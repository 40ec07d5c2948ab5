"""FSDP (FSDP2 via onestep.trainers.sharding) on two CPU processes: sharded training equals unsharded data
parallel, resumes exactly from its safetensors checkpoints, and exports a whole student."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_resume_ddp import _launch, _why

#: The two-process launch (five short runs) takes 30-50 s; the tests share it.
SLOW = pytest.mark.slow


def _student(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "run" / "student" / "generator" / "diffusion_pytorch_model.safetensors"))


def _assert_same_weights(sharded: dict, plain: dict, rtol: float, atol: float, what: str = "") -> None:
    assert sharded.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(sharded[k], plain[k], rtol=rtol, atol=atol, msg=f"{what}{k}")


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_teacher_dir):
    out = tmp_path_factory.mktemp("fsdp")
    r = _launch([str(Path(__file__).with_name("fsdp_worker.py")), str(out), str(tiny_teacher_dir)])
    assert r.returncode == 0, _why(r)
    return out, [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


@SLOW
def test_fsdp_shards_the_generator_across_processes(fsdp_runs):
    _, ranks = fsdp_runs
    for rank in ranks:
        assert rank["fsdp"]["sharded"] and not rank["ddp"]["sharded"]
        assert rank["ddp"]["local_params"] == rank["ddp"]["total_params"]
        # each process holds about half of every parameter (dim-0 chunks, the odd row on rank 0)
        assert rank["fsdp"]["local_params"] < 0.6 * rank["fsdp"]["total_params"]
    assert sum(r["fsdp"]["local_params"] for r in ranks) == ranks[0]["fsdp"]["total_params"]


@SLOW
def test_fsdp_trains_like_data_parallel(fsdp_runs):
    out, _ = fsdp_runs
    _assert_same_weights(_student(out / "fsdp"), _student(out / "ddp"), rtol=1e-4, atol=1e-5)


@SLOW
def test_fsdp_consistency_distillation_trains_like_data_parallel(fsdp_runs):
    out, ranks = fsdp_runs
    assert all(r["lcm_fsdp"]["sharded"] for r in ranks)
    # The tiny teacher's consistency gradients are ~1e8, clipped to norm 10: Adam then sees values
    # near its eps and turns summation-order noise (attention key biases have zero true gradient)
    # into visible updates. Within a tenth of one step (lr 1e-3):
    _assert_same_weights(_student(out / "lcm_fsdp"), _student(out / "lcm_ddp"), rtol=1e-3, atol=1e-4)


@SLOW
def test_fsdp_disback_writes_the_same_nodes_and_student_as_data_parallel(fsdp_runs):
    out, ranks = fsdp_runs
    assert all(r["disback_fsdp"]["sharded"] for r in ranks)
    for node in ("node-00.safetensors", "node-01.safetensors", "node-02.safetensors"):
        plain = load_file(str(out / "disback_ddp" / "run" / "disback" / node))
        assert plain and all("lora_" in k for k in plain)
        _assert_same_weights(load_file(str(out / "disback_fsdp" / "run" / "disback" / node)), plain, rtol=1e-4, atol=1e-5, what=f"{node}: ")
    state = json.loads((out / "disback_fsdp" / "run" / "disback" / "state.json").read_text())
    assert state["target"] == "teacher"  # backtracked through node 1 to the teacher
    # five Adam steps of lr 1e-3 on summation-order noise: within a tenth of a step
    _assert_same_weights(_student(out / "disback_fsdp"), _student(out / "disback_ddp"), rtol=1e-3, atol=1e-4)


@SLOW
def test_fsdp_checkpoint_is_safetensors_and_resumes_exactly(fsdp_runs):
    out, _ = fsdp_runs
    ckpt = out / "fsdp" / "run" / "checkpoint-2"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == sorted([
        "ema.safetensors", "fake_score.safetensors", "generator.safetensors", "generator_export.safetensors",
        "optimizer_fake_score.safetensors", "optimizer_generator.safetensors", "trainer_state.json", "checkpoint.json",
        "random_states_0.safetensors", "random_states_1.safetensors",
    ])  # checkpoint.json, written last, marks it complete
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["ema"]["optimization_step"] >= 1
    fake = load_file(str(ckpt / "fake_score.safetensors"))
    assert fake and all("lora_" in k or k.startswith("heads.") for k in fake)  # adapters and heads, not the base
    _assert_same_weights(_student(out / "resumed"), _student(out / "fsdp"), rtol=0, atol=1e-6)


@SLOW
def test_one_unsharded_process_resumes_a_sharded_checkpoint(fsdp_runs, tiny_teacher_dir, tmp_path):
    """Every launch writes the same checkpoint files: the two-process FSDP checkpoint resumes on one process."""
    from conftest import tiny_dmd2_config
    from onestep.trainers import DMD2Trainer

    out, _ = fsdp_runs
    ckpt = out / "fsdp" / "run" / "checkpoint-2"
    tr = DMD2Trainer(tiny_dmd2_config(
        tmp_path, tiny_teacher_dir, max_steps=4, ema_decay=0.5, fake_score="lora", lora_rank=2, gan_weight_generator=0.1,
        generator_timesteps=[800, 400], max_grad_norm=0.05,
    ))
    assert tr.load_checkpoint(str(ckpt)) and tr.state.step == 2
    saved = load_file(str(ckpt / "generator.safetensors"))
    _assert_same_weights({k: v for k, v in tr.generator.backbone.state_dict().items() if k in saved}, saved, 0, 0)
    ema = load_file(str(ckpt / "ema.safetensors"))
    names = [n for n, p in tr.generator.backbone.named_parameters() if p.requires_grad]
    _assert_same_weights(dict(zip(names, tr.ema.shadow_params)), ema, 0, 0, "ema ")
    assert tr.ema.optimization_step == json.loads((ckpt / "trainer_state.json").read_text())["ema"]["optimization_step"]
    assert all(int(s["step"]) == 1 for s in tr.opt_g.state.values())  # one generator update of two steps (K=2)
    assert tr.train() is not None and tr.state.step == 4


def test_fsdp_with_one_process_trains_unsharded(tiny_teacher_dir, tmp_path):
    from conftest import tiny_dmd2_config
    from onestep.trainers import DMD2Trainer

    tr = DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir, fsdp=True, max_steps=1))
    assert not tr.fsdp
    assert not any(hasattr(p, "to_local") for p in tr.generator.parameters())


def test_fsdp_refuses_fp16(tiny_teacher_dir, tmp_path):
    from conftest import tiny_dmd2_config
    from onestep.errors import ConfigError

    with pytest.raises(ConfigError, match="bf16"):
        tiny_dmd2_config(tmp_path, tiny_teacher_dir, fsdp=True, mixed_precision="fp16")
