"""What an export writes for plain diffusers users besides the student: an fp16 / bf16 weight variant
(``export_variant``) and, for a LoRA generator of an SD teacher, a diffusers LoRA file that the
teacher's own pipeline loads with ``load_lora_weights`` (onestep/export_variants.py)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import tiny_config
from t2i_fixtures import latent_cache_in_tmp, make_tiny_sd, prompt_file  # noqa: F401 (fixtures)

from onestep.errors import ConfigError


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def _pipe(folder, **kwargs):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


@pytest.fixture(scope="module")
def lora_student(sd_dir, prompt_file, tmp_path_factory):
    """A DMD2 student of the tiny SD pipeline trained as LoRA adapters (rank 4, alpha 8: scaling 2, so a
    file that dropped the scaling would be off) on every Linear and Conv2d layer, exported with an fp16 variant."""
    from onestep.trainers import make_trainer

    tmp = tmp_path_factory.mktemp("lora_run")
    config = tiny_config("dmd2", tmp, sd_dir, prompts=str(prompt_file), generator_timesteps=[999], batch_size=2, max_steps=2,
                         fake_updates_per_generator=1, generator_lora_rank=4, generator_lora_alpha=8.0, export_variant="fp16")
    trainer = make_trainer(config)
    with torch.no_grad():  # adapters far from zero, so the LoRA visibly changes the UNet (a few steps barely move B = 0)
        gen = torch.Generator().manual_seed(0)
        for name, p in trainer.generator.backbone.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return trainer.train()


def test_the_lora_file_on_the_teacher_pipeline_is_the_merged_student(lora_student, sd_dir):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from onestep.export_variants import LORA_WEIGHT_NAME

    student = lora_student
    meta = json.loads((student / "onestep.json").read_text())
    assert meta["diffusers_lora"] == {"rank": 4, "alpha": 8.0, "file": f"lora/{LORA_WEIGHT_NAME}"}
    with safe_open(str(student / "lora" / LORA_WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert {"unet.conv_in.lora_A.weight", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"} <= set(keys)

    teacher = _pipe(sd_dir)
    base = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")
    teacher.load_lora_weights(student / "lora", weight_name=LORA_WEIGHT_NAME)
    merged = UNet2DConditionModel.from_pretrained(student, subfolder="unet")
    gen = torch.Generator().manual_seed(3)
    x, t, text = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([999, 421]), torch.randn(2, 16, 16, generator=gen)
    with torch.no_grad():
        ours, theirs, plain = (net(x, t, text).sample for net in (merged, teacher.unet, base))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # the adapters matter: a wrong alpha / rank scaling would show

    # The model card's LoRA snippet, as written: the teacher's pipeline, the LoRA, this folder's scheduler.
    card = (student / "README.md").read_text()
    snippet = next(code for code in _python_blocks(card) if "load_lora_weights" in code)
    scope: dict = {}
    exec(snippet.replace("path/to/the/teacher", str(sd_dir)).replace("path/to/this/folder", str(student)), scope)
    assert scope["image"].size == (16, 16)
    lora_pipe = scope["pipe"]
    lora_pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a red cube", "never seen in training"], [5, 6]

    def images(pipe):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(prompt=prompts, num_inference_steps=1, guidance_scale=1.0, generator=gens, output_type="pt").images

    one_step = images(_pipe(student))
    assert lora_pipe.scheduler.timesteps.tolist() == meta["timesteps"] == [999]
    torch.testing.assert_close(images(lora_pipe), one_step, rtol=0, atol=1e-5)
    assert (one_step[0] - one_step[1]).abs().max() > 1e-4


def test_fp16_variant_loads_in_plain_diffusers_and_is_the_float32_weights_cast(lora_student):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from onestep.export import load_student

    student = lora_student
    unet_dir = student / "unet"
    assert {p.name for p in unet_dir.glob("*.safetensors")} == {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"}
    full = UNet2DConditionModel.from_pretrained(student, subfolder="unet")
    half = UNet2DConditionModel.from_pretrained(student, subfolder="unet", variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16 and full.dtype == torch.float32
    ref = full.state_dict()
    assert all(torch.equal(v, ref[k].to(torch.float16)) for k, v in half.state_dict().items())
    # student_unet.safetensors is still the float32 UNet; onestep loads the float32 weights
    single = load_file(str(student / "student_unet.safetensors"))
    assert all(v.dtype == torch.float32 and torch.equal(v, ref[k]) for k, v in single.items())
    assert load_student(student).generator.backbone.dtype == torch.float32

    pipe = _pipe(student, variant="fp16", torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    assert torch.equal(pipe.unet.conv_in.weight, half.conv_in.weight)
    meta = json.loads((student / "onestep.json").read_text())
    assert meta["weight_variants"] == ["fp16"]
    card = (student / "README.md").read_text()
    assert 'variant="fp16", torch_dtype=torch.float16' in card and "diffusion_pytorch_model.fp16.safetensors" in card


def test_bf16_variant_of_a_unet2d_student(tmp_path, tiny_teacher_dir):
    from diffusers import UNet2DModel

    from onestep.export import export_student
    from onestep.teachers import load_teacher

    teacher = load_teacher(tiny_teacher_dir)
    net = teacher.new_backbone()
    out = export_student(tmp_path / "s", net, teacher, "dmd2", [800], variant="bf16")
    assert (out / "generator" / "diffusion_pytorch_model.bf16.safetensors").is_file()
    assert next(net.parameters()).dtype == torch.float32  # the network itself is left in float32
    card = (out / "README.md").read_text()
    snippet = next(code for code in _python_blocks(card) if "variant=" in code)
    scope: dict = {}
    exec(snippet.replace("path/to/this/folder", str(out)), scope)
    assert isinstance(scope["net"], UNet2DModel) and scope["net"].dtype == torch.bfloat16
    full = UNet2DModel.from_pretrained(out / "generator").state_dict()
    assert all(torch.equal(v, full[k].to(torch.bfloat16)) for k, v in scope["net"].state_dict().items())
    assert "diffusers_lora" not in json.loads((out / "onestep.json").read_text())


def test_export_variant_is_validated(tmp_path, tiny_teacher_dir):
    with pytest.raises(ConfigError, match="export_variant"):
        tiny_config("dmd2", tmp_path, tiny_teacher_dir, export_variant="fp8")
    assert tiny_config("dmd2", tmp_path, tiny_teacher_dir).export_variant == "none"


def test_when_a_diffusers_lora_file_cannot_describe_the_student(sd_dir, tiny_teacher_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from onestep.export_variants import diffusers_lora_blocker
    from onestep.lora import add_lora
    from onestep.teachers import load_teacher
    from onestep.weights import save_state, save_trainable

    teacher = load_teacher(sd_dir)
    gen = teacher.new_backbone()
    add_lora(gen, 2, None, "generator", "attention")
    assert diffusers_lora_blocker(gen, teacher) is None
    assert "averaged" in diffusers_lora_blocker(gen, teacher, average_with="other/student")
    # init_generator with adapters only keeps the teacher's base weights; with every weight it does not
    assert diffusers_lora_blocker(gen, teacher, init_generator=save_trainable(gen, tmp_path / "adapters.safetensors")) is None
    assert "init_generator" in diffusers_lora_blocker(gen, teacher, init_generator=save_state(gen, tmp_path / "all.safetensors"))
    # a student with an added input (a consistency student's guidance embedding) is not the teacher's UNet
    cfg = {k: v for k, v in teacher.backbone.config.items() if not k.startswith("_")}
    guided = UNet2DConditionModel.from_config({**cfg, "time_cond_proj_dim": 8})
    assert "not the teacher's" in diffusers_lora_blocker(guided, teacher)
    digits = load_teacher(tiny_teacher_dir)
    assert "Stable Diffusion" in diffusers_lora_blocker(digits.new_backbone(), digits)


def test_an_averaged_lora_export_has_no_lora_file_and_says_why(sd_dir, prompt_file, tmp_path, caplog):
    import logging

    from onestep.trainers import make_trainer

    # the teacher's own UNet file is "another student of the same network" for export_average_with
    config = tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file), generator_timesteps=[999], batch_size=2, max_steps=1,
                         generator_lora_rank=2, export_average_with=str(sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    trainer = make_trainer(config)
    with caplog.at_level(logging.WARNING):
        student = trainer.export()
    assert not (student / "lora").exists() and (student / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    lora = json.loads((student / "onestep.json").read_text())["diffusers_lora"]
    assert lora["file"] is None and "export_average_with" in lora["reason"]
    assert "no diffusers LoRA file" in caplog.text and "export_average_with" in caplog.text
    assert "load_lora_weights" not in (student / "README.md").read_text()


def test_the_lora_file_loads_into_an_sdxl_pipeline(tmp_path):
    """The same file layout serves SDXL teachers (``StableDiffusionXLPipeline.load_lora_weights``)."""
    from diffusers import StableDiffusionXLPipeline
    from t2i_fixtures import make_tiny_sdxl

    from onestep.export_variants import write_diffusers_lora
    from onestep.lora import add_lora, lora_layers_for_diffusers, merged_lora

    folder = make_tiny_sdxl(tmp_path / "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, use_safetensors=True)
    gen = copy.deepcopy(pipe.unet)
    add_lora(gen, 2, 6.0, "generator", "all")
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in gen.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    write_diffusers_lora(tmp_path / "student", lora_layers_for_diffusers(gen, "generator"))
    merged = merged_lora(gen).eval()
    pipe.load_lora_weights(tmp_path / "student" / "lora")
    g = torch.Generator().manual_seed(2)
    x, t, text = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 10]), torch.randn(2, 16, 32, generator=g)
    added = {"text_embeds": torch.randn(2, 8, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    with torch.no_grad():
        ours = merged(x, t, text, added_cond_kwargs=added).sample
        theirs = pipe.unet(x, t, text, added_cond_kwargs=added).sample
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
