"""Shared fixtures: tiny real diffusers teachers built from config, CPU, seconds each."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_UNET = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    num_class_embeds=11,
    norm_num_groups=4,
    attention_head_dim=8,
)
TINY_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True)
TINY_META = dict(format_version=1, conditioning=dict(kind="class", num_classes=10, null_class=10), guidance_scale=2.0, clip_sample=1.0, data="digits")


def make_tiny_teacher(out, seed: int = 0, **unet_overrides):
    from diffusers import UNet2DModel

    from onestep.teachers import save_unet_teacher

    torch.manual_seed(seed)
    unet = UNet2DModel(**{**TINY_UNET, **unet_overrides})
    # Random but not degenerate: diffusers zero-initialises nothing here, so outputs vary with inputs.
    return save_unet_teacher(out, unet, TINY_SCHEDULER, TINY_META)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture
def tiny_teacher(tiny_teacher_dir):
    from onestep.teachers import load_teacher

    return load_teacher(tiny_teacher_dir)


def tiny_dmd2_config(tmp_path, teacher_dir, **overrides):
    return tiny_config("dmd2", tmp_path, teacher_dir, **overrides)


def tiny_config(method: str, tmp_path, teacher_dir, **overrides):
    """A few-step config of ``method`` on the tiny teacher (settings shared by every method's tests)."""
    from onestep.trainers import method_classes

    values = dict(
        teacher=str(teacher_dir),
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        batch_size=4,
        fake_updates_per_generator=2,
        generator_timesteps=[800],
        guidance_scale=2.0,
        lr_generator=1e-3,
        lr_fake=1e-3,
        log_with="none",
        seed=0,
    )
    values.update(overrides)
    return method_classes(method)[0](**values)


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> int:
    after = module.state_dict()
    return sum(not torch.equal(before[k], after[k]) for k in before)


def leave_launch() -> None:
    """End a test worker run under `accelerate launch`, once its results are written and the ranks
    have met: close the process group and exit at once. A normal interpreter exit has aborted a
    rank now and then ("terminate called without an active exception", SIGABRT) while C++ threads
    of the process group were torn down; what the worker reports does not depend on that teardown."""
    import sys

    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
