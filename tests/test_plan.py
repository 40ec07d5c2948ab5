"""``onestep train CONFIG --plan``: the memory table built on the meta device counts what a real run
holds, parameter for parameter and byte for byte (weights, gradients, AdamW moments, EMA, frozen copies)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from t2i_fixtures import make_tiny_sd, write_prompts

from onestep.cli import main
from onestep.trainers import make_trainer
from onestep.trainers.plan import format_plan, memory_plan, resident_bytes


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd_plan"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts_plan") / "prompts.txt")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))


def _bytes(rows, role, what):
    return sum(r.bytes for r in rows if r.role.startswith(role) and r.what.startswith(what))


@pytest.mark.parametrize("setting", [
    dict(fake_score="copy", ema_decay=0.9),
    dict(fake_score="lora", lora_rank=4, lora_targets="attention", frozen_dtype="bf16", generator_lora_rank=2),
])
def test_the_plan_counts_what_a_run_holds(setting, sd_dir, prompt_file, tmp_path):
    config = tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file), resolution=16, batch_size=1, max_steps=1,
                         warmup_steps=0, export=False, checkpoint_every=0, preview_every=0, **setting)
    rows, assumptions = memory_plan(config)
    tr = make_trainer(config)
    tr.train()  # one step: AdamW's moments exist

    def trained_bytes(params):
        return sum(4 * p.numel() for p in params if p.requires_grad)

    def moments(opt, params):
        ids = {id(p) for p in params}
        return sum(sum(v.numel() * v.element_size() for k, v in s.items() if k != "step")
                   for p, s in opt.state.items() if id(p) in ids)

    g = [p for p in tr.generator.parameters() if p.requires_grad]
    assert _bytes(rows, "generator", "weights") == trained_bytes(g)
    assert _bytes(rows, "generator", "gradients") == _bytes(rows, "generator", "weights")  # float32, one per weight
    assert _bytes(rows, "generator", "AdamW") == moments(tr.opt_g, g)
    f = tr.triad.trainable_fake_parameters()
    assert _bytes(rows, "fake score", "weights") == trained_bytes(f)
    assert _bytes(rows, "fake score", "AdamW") == moments(tr.opt_f, f)
    frozen = [p for p in tr.teacher.backbone.parameters() if not p.requires_grad]
    assert _bytes(rows, "teacher", "frozen") == sum(p.numel() * p.element_size() for p in frozen)
    if setting.get("generator_lora_rank"):  # the generator's base is the teacher's own tensors: no row of its own
        assert "generator base" in next(r.role for r in rows if r.what.startswith("frozen"))
        assert _bytes(rows, "generator (LoRA) base", "") == 0
        teacher_ids = {id(p) for p in tr.teacher.backbone.parameters()}
        assert all(id(p) in teacher_ids for p in tr.generator.backbone.parameters() if not p.requires_grad)
    if setting.get("ema_decay"):
        assert _bytes(rows, "generator", "EMA") == sum(4 * s.numel() for s in tr.ema.shadow_params)
    vae = tr.teacher_spec.vae
    assert _bytes(rows, "VAE", "frozen") == sum(p.numel() * p.element_size() for p in vae.parameters())
    assert assumptions["frozen_dtype"] == ("bfloat16" if setting.get("frozen_dtype") == "bf16" else "float32")
    assert resident_bytes(rows) < sum(r.bytes for r in rows)  # the text encoders are freed after encoding
    assert "held through training" in format_plan(rows, assumptions)


def test_cli_plan_prints_the_table_and_trains_nothing(sd_dir, prompt_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "sd15_dmd2", "--teacher", str(sd_dir), "--prompts", str(prompt_file), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "fake score (full copy)" in out and "AdamW moments" in out and "text encoders" in out
    assert not any(tmp_path.iterdir())  # no run folder, nothing written


def test_the_plan_counts_a_consistency_student_s_guidance_embedding(sd_dir, prompt_file, tmp_path):
    """LCM with guidance_scale_range: the student carries a guidance embedding the teacher lacks; the plan
    counts the student's weights and AdamW moments exactly."""
    from t2i_fixtures import write_image_folder

    images = write_image_folder(tmp_path / "images", n=3)
    config = tiny_config("consistency", tmp_path, sd_dir, prompts=str(prompt_file), real_images=str(images), resolution=16,
                         batch_size=1, max_steps=1, warmup_steps=0, export=False, checkpoint_every=0, preview_every=0,
                         guidance_scale_range=[2.0, 8.0], fake_score="none")
    rows, _ = memory_plan(config)
    tr = make_trainer(config)
    tr.train()
    g = [p for p in tr.generator.parameters() if p.requires_grad]
    assert sum(p.numel() for p in g) > sum(p.numel() for p in tr.teacher.backbone.parameters())  # the embedding
    assert _bytes(rows, "generator", "weights") == sum(4 * p.numel() for p in g)
    assert _bytes(rows, "generator", "AdamW") == sum(
        sum(v.numel() * v.element_size() for k, v in s.items() if k != "step") for s in tr.opt_g.state.values())
