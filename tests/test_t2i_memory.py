"""Memory and data switches of text-to-image runs on tiny SD pipelines: the sharded VAE-latent cache
of real images, the attention backend and frozen weights in bf16."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import changed, state_of, tiny_config
from t2i_fixtures import make_tiny_sd, write_image_folder, write_prompts

from onestep.errors import ConfigError
from onestep.trainers.memory import resolve_frozen_dtype, storage_bytes
from onestep.teachers import load_teacher
from onestep.teachers.latents import LatentVAE, encode_image_folder, latent_cache_dir, load_image, read_image_captions


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd_mem"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts_mem") / "prompts.txt")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images_mem"), n=5)


@pytest.fixture(autouse=True)
def _latent_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))


class CountingVAE(LatentVAE):
    """The teacher's real VAE, counting the images it encodes; raises once ``fail_after`` images are done."""

    def __init__(self, vae, fail_after: int | None = None):
        super().__init__(vae)
        self.images = 0
        self.fail_after = fail_after

    def encode(self, images):
        if self.fail_after is not None and self.images >= self.fail_after:
            raise RuntimeError("interrupted")
        self.images += len(images)
        return super().encode(images)


# ------------------------------------------------------------------ latent cache


def test_latent_cache_is_sharded_resumes_and_loads_without_the_vae(sd_dir, image_dir):
    vae = load_teacher(sd_dir).vae.vae
    pairs = read_image_captions(image_dir)
    # An encode interrupted after the first shard (2 images a shard, batches of 1) keeps that shard.
    first = CountingVAE(vae, fail_after=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        encode_image_folder(pairs, first, 16, batch_size=1, shard_size=2)
    (folder,) = latent_cache_dir().iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["shard-00000.safetensors"]  # no index, no temp file

    # Run again: only the two missing shards (3 images) are encoded, then the index is written.
    second = CountingVAE(vae)
    latents = encode_image_folder(pairs, second, 16, batch_size=1, shard_size=2)
    assert second.images == 3
    index = json.loads((folder / "index.json").read_text())
    assert index["images"] == 5 and index["shard_size"] == 2 and index["size"] == 16
    assert index["shards"] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert sorted(p.name for p in folder.iterdir()) == ["index.json"] + index["shards"]
    # Every row is the VAE latent of its image, whichever run encoded it.
    expected = LatentVAE(vae).encode(torch.stack([load_image(p, 16) for p, _ in pairs]))
    assert latents.shape == (5, 4, 8, 8) and latents.dtype == torch.float32
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)

    # A complete cache loads without touching the VAE, even with another shard size asked for.
    broken = CountingVAE(vae, fail_after=0)
    assert torch.equal(encode_image_folder(pairs, broken, 16, shard_size=1024), latents)
    # Another resolution is another cache.
    with pytest.raises(RuntimeError, match="interrupted"):
        encode_image_folder(pairs, broken, 32)


@pytest.mark.slow  # two fresh interpreters (forking after torch has run can deadlock): about 20 s
def test_latent_cache_on_two_processes_is_written_by_the_main_one(sd_dir, image_dir):
    from test_resume_ddp import _launch, _why

    r = _launch([str(Path(__file__).with_name("latent_cache_worker.py")), str(sd_dir), str(image_dir)])
    assert r.returncode == 0, _why(r)
    ranks = [json.loads((latent_cache_dir() / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [images for images, _ in ranks] == [5, 0]  # rank 1 waited and read the main process's cache
    assert ranks[0][1] == ranks[1][1]
    (folder,) = [d for d in latent_cache_dir().iterdir() if d.is_dir()]
    assert sorted(p.name for p in folder.iterdir()) == ["index.json"] + [f"shard-0000{i}.safetensors" for i in range(3)]


def test_real_images_through_the_teacher_use_one_shard_by_default(sd_dir, image_dir):
    teacher = load_teacher(sd_dir, real_images=str(image_dir))
    (folder,) = latent_cache_dir().iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", "shard-00000.safetensors"]
    x, cond = teacher.real_data(4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 4, 8, 8) and cond["encoder_hidden_states"].shape[0] == 4


def test_bad_shard_size_is_a_config_error(sd_dir, image_dir):
    with pytest.raises(ConfigError, match="shard_size"):
        encode_image_folder(read_image_captions(image_dir), load_teacher(sd_dir).vae, 16, shard_size=0)


# ------------------------------------------------------------------------ attention


def test_attention_sdpa_keeps_diffusers_processors_and_xformers_is_refused_on_cpu(sd_dir, prompt_file, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from onestep.trainers import make_trainer

    with pytest.raises(ConfigError, match="attention must be"):
        tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file), attention="flash")
    trainer = make_trainer(tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file), batch_size=2))
    assert trainer.config.attention == "sdpa"
    for net in (trainer.teacher.backbone, trainer.fake.backbone, trainer.generator.backbone):
        procs = net.attn_processors
        assert procs and all(type(p) is AttnProcessor2_0 for p in procs.values())
    with pytest.raises(ConfigError, match=r"xformers.*(pip install xformers|CUDA).*sdpa"):
        make_trainer(tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file), attention="xformers"))


# --------------------------------------------------------------------- frozen dtype


def test_frozen_dtype_resolves_from_mixed_precision(tmp_path):
    assert resolve_frozen_dtype("auto", "no") == torch.float32
    assert resolve_frozen_dtype("auto", "bf16") == torch.bfloat16
    assert resolve_frozen_dtype("auto", "fp16") == torch.float16
    assert resolve_frozen_dtype("bf16", "no") == torch.bfloat16
    assert resolve_frozen_dtype("float32", "bf16") == torch.float32
    with pytest.raises(ConfigError, match="frozen_dtype must be"):
        tiny_config("dmd2", tmp_path, "digits", frozen_dtype="int8")


@pytest.mark.parametrize("fake_score", ["lora", "copy"])
def test_frozen_bf16_weights_train_dmd2(fake_score, sd_dir, prompt_file, image_dir, tmp_path):
    from onestep.trainers import make_trainer

    config = tiny_config(
        "dmd2", tmp_path, sd_dir, prompts=str(prompt_file), real_images=str(image_dir), batch_size=2, max_steps=2,
        fake_updates_per_generator=1, fake_score=fake_score, lora_rank=2, frozen_dtype="bf16", frozen_compute="storage", gan_weight_generator=1e-2,
    )
    trainer = make_trainer(config)
    fp32_teacher = load_teacher(sd_dir)
    triad = trainer.triad
    base = triad.teacher_parameters()
    # The frozen base is bf16 and takes half the bytes; everything trainable is float32.
    assert {p.dtype for p in base.values()} == {torch.bfloat16}
    assert storage_bytes(base.values()) * 2 == storage_bytes(fp32_teacher.backbone.parameters())
    assert {p.dtype for p in trainer.teacher_spec.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.generator.parameters()} == {torch.float32}
    # the prompt cache stores the text embeddings in the frozen dtype too; batches come back float32
    from safetensors import safe_open

    shards = list((tmp_path / "cache" / "prompts").rglob("*.safetensors"))
    assert shards
    dtypes = set()
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "BF16" in dtypes  # (the float32 teacher loaded above for comparison wrote float32 caches)
    assert trainer.conditioning.sample(2, generator=torch.Generator().manual_seed(1))["encoder_hidden_states"].dtype == torch.float32
    trainable_fake = triad.trainable_fake_parameters()
    assert trainable_fake and {p.dtype for p in trainable_fake} == {torch.float32}
    if fake_score == "lora":
        assert trainer.fake.backbone is trainer.teacher.backbone
        assert all("lora_" in n for n, p in trainer.fake.backbone.named_parameters() if p.requires_grad)
    else:
        assert {p.dtype for p in trainer.fake.parameters()} == {torch.float32}
    for opt in (trainer.opt_g, trainer.opt_f):
        assert all(p.dtype == torch.float32 for group in opt.param_groups for p in group["params"])

    # The bf16 teacher takes float32 inputs and gives float32 predictions close to the float32 teacher's.
    x = torch.randn(2, *trainer.teacher_spec.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300, 700])
    cond = trainer.conditioning.sample(2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = trainer.teacher(x, t, cond), fp32_teacher.denoiser()(x, t, cond)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
    # The VAE decodes float32 images from float32 latents.
    assert trainer.decode(x).dtype == torch.float32

    gen0, fake0 = state_of(trainer.generator.backbone), [p.detach().clone() for p in trainable_fake]
    base0 = {k: v.detach().clone() for k, v in base.items()}
    losses = {}
    for _ in range(2):
        losses.update(trainer.train_step())
    assert {"loss/dm", "loss/fake", "loss/gan_g", "loss/gan_d"} <= set(losses) and all(math.isfinite(v) for v in losses.values())
    assert changed(gen0, trainer.generator.backbone) > 0
    assert sum(not torch.equal(a, p) for a, p in zip(fake0, trainable_fake)) > 0
    assert all(torch.equal(base0[k], v) for k, v in triad.teacher_parameters().items())
    assert {p.dtype for p in trainer.generator.parameters()} == {torch.float32}


def test_a_lora_generator_keeps_its_base_in_bf16_and_exports_the_adapters_merged_in_float32(sd_dir, prompt_file, tmp_path):
    """A LoRA generator's own base is frozen weights too: stored in the frozen dtype (half the bytes, as
    diffusers' LoRA scripts keep it in weight_dtype); the export merges the float32 adapters into a
    float32 copy of that base, so the adapters' small deltas are not rounded away in bf16."""
    import copy

    from safetensors.torch import load_file

    from onestep.lora import merged_lora
    from onestep.trainers import make_trainer
    from onestep.trainers.memory import to_float32

    config = tiny_config(
        "dmd2", tmp_path, sd_dir, prompts=str(prompt_file), batch_size=1, max_steps=2, fake_updates_per_generator=1,
        fake_score="lora", lora_rank=2, generator_lora_rank=2, generator_lora_alpha=2.0, frozen_dtype="bf16", frozen_compute="storage", lr_generator=1e-2,
    )
    trainer = make_trainer(config)
    gen = trainer.generator.backbone
    assert {p.dtype for n, p in gen.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in gen.named_parameters() if "lora_" in n} == {torch.float32}
    student = trainer.train()
    exported = load_file(str(student / "unet" / "diffusion_pytorch_model.safetensors"))
    expected = merged_lora(to_float32(copy.deepcopy(gen))).state_dict()
    assert exported.keys() == expected.keys() and all(v.dtype == torch.float32 for v in exported.values())
    for k in expected:
        torch.testing.assert_close(exported[k], expected[k], rtol=0, atol=0, msg=k)
    rounded = merged_lora(copy.deepcopy(gen)).state_dict()  # merged into the bf16 base instead
    assert any(not torch.equal(rounded[k].float(), expected[k]) for k in expected)


def test_a_lora_generator_shares_the_teachers_base_and_checkpointing_recomputes_its_own_adapters(sd_dir, prompt_file, tmp_path):
    """With both LoRAs the three roles hold one base: the generator's frozen tensors are the teacher's own
    objects (no second copy), its adapters are its own. Two steps with gradient checkpointing give the
    same adapters as two steps without (the recomputation runs the adapters of the first pass), and the
    shared base is untouched by training."""
    from onestep.trainers import make_trainer

    def run(checkpointing: bool, out: str):
        config = tiny_config(
            "dmd2", tmp_path / out, sd_dir, prompts=str(prompt_file), batch_size=2, max_steps=2, fake_updates_per_generator=1,
            fake_score="lora", lora_rank=2, generator_lora_rank=2, lr_generator=1e-2, lr_fake=1e-2, export=False,
            checkpoint_every=0, preview_every=0, gradient_checkpointing=checkpointing,
        )
        return make_trainer(config)

    trainer = run(False, "plain")
    gen, teacher = trainer.generator.backbone, trainer.triad.teacher.backbone
    assert trainer.triad.shares_generator_base and gen is not teacher
    teacher_tensors = {id(t) for t in list(teacher.parameters()) + list(teacher.buffers())}
    gen_base = [p for n, p in gen.named_parameters() if "lora_" not in n]
    assert gen_base and all(id(p) in teacher_tensors for p in gen_base)
    gen_lora = [p for n, p in gen.named_parameters() if "lora_" in n]
    assert gen_lora and not any(id(p) in teacher_tensors for p in gen_lora)
    assert {n for n, p in gen.named_parameters() if p.requires_grad} == {n for n, _ in gen.named_parameters() if "lora_" in n}
    base0 = {n: p.detach().clone() for n, p in trainer.triad.teacher_parameters().items()}
    trainer.train()
    assert all(torch.equal(base0[n], p) for n, p in trainer.triad.teacher_parameters().items())
    assert any(p.abs().sum() > 0 for n, p in gen.named_parameters() if "lora_B" in n)

    checkpointed = run(True, "checkpointed")
    checkpointed.train()
    ours = {n: p for n, p in gen.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in checkpointed.generator.backbone.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys()
    for n in ours:
        torch.testing.assert_close(theirs[n], ours[n], rtol=1e-5, atol=1e-6, msg=n)


def test_a_lora_generator_refuses_an_init_that_changes_the_shared_base(sd_dir, prompt_file, tmp_path):
    """init_generator with a full save of a LoRA generator: an unchanged base loads (adapters only are
    written); a base that differs would rewrite the teacher's own weights and is refused."""
    from safetensors.torch import save_file

    from onestep.trainers import make_trainer

    def config(init=None):
        return tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file), batch_size=1, max_steps=1, export=False,
                           generator_lora_rank=2, init_generator=init, overwrite=True)

    gen = make_trainer(config()).generator.backbone
    state = {k: v.detach().clone() for k, v in gen.state_dict().items()}
    lora_b = next(k for k in state if "lora_B" in k)
    state[lora_b] += 1.0
    save_file(state, str(tmp_path / "same_base.safetensors"))
    loaded = make_trainer(config(str(tmp_path / "same_base.safetensors")))
    torch.testing.assert_close(loaded.generator.backbone.state_dict()[lora_b], state[lora_b])
    base = next(k for k in state if "lora_" not in k and state[k].is_floating_point())
    state[base] += 1.0
    save_file(state, str(tmp_path / "other_base.safetensors"))
    with pytest.raises(ConfigError, match="shares with the teacher"):
        make_trainer(config(str(tmp_path / "other_base.safetensors")))


def test_with_every_copy_frozen_the_teacher_and_its_text_encoders_load_in_the_frozen_dtype(sd_dir, prompt_file, tmp_path):
    """Both LoRAs and bf16 frozen weights: the UNet loads in bf16 (its float32 weights are never all in
    memory), the text encoders too (embeddings stay float32, close to the float32 encoders'), and the
    adapters are float32. A full-copy fake score loads float32 and trains float32 copies."""
    from onestep.teachers.text import PromptEncoder
    from onestep.trainers import make_trainer

    config = tiny_config("dmd2", tmp_path / "lora", sd_dir, prompts=str(prompt_file), batch_size=1, max_steps=1, export=False,
                         fake_score="lora", lora_rank=2, generator_lora_rank=2, frozen_dtype="bf16", frozen_compute="storage")
    trainer = make_trainer(config)
    assert {p.dtype for p in trainer.triad.teacher_parameters().values()} == {torch.bfloat16}
    assert {p.dtype for n, p in trainer.generator.backbone.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for p in trainer.triad.trainable_fake_parameters()} == {torch.float32}
    copy_run = make_trainer(tiny_config("dmd2", tmp_path / "copy", sd_dir, prompts=str(prompt_file), batch_size=1, max_steps=1,
                                        export=False, fake_score="copy", frozen_dtype="bf16"))
    assert {p.dtype for p in copy_run.generator.parameters()} == {torch.float32}
    assert {p.dtype for p in copy_run.fake.parameters()} == {torch.float32}

    prompts = ["a red cube", "two cats"]
    full = PromptEncoder(sd_dir, xl=False, size=(16, 16))
    half = PromptEncoder(sd_dir, xl=False, size=(16, 16), dtype=torch.bfloat16)
    assert {p.dtype for _, enc in half._load() for p in enc.parameters()} == {torch.bfloat16}
    a, b = full.encode(prompts)["encoder_hidden_states"], half.encode(prompts)["encoder_hidden_states"]
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)
    assert half.cache_identity()["encoder_dtype"] == "bfloat16" and "encoder_dtype" not in full.cache_identity()
    # float32 compute from bf16 storage: the Linear weights stay bf16, the embeddings are the float32
    # encoder's run on the rounded weights (closer to the float32 ones than bf16 compute), with their own cache key
    upcast = PromptEncoder(sd_dir, xl=False, size=(16, 16), dtype=torch.bfloat16, compute="float32")
    (_, enc), = upcast._load()
    assert {p.dtype for n, p in enc.named_parameters() if n.endswith("q_proj.weight")} == {torch.bfloat16}
    c = upcast.encode(prompts)["encoder_hidden_states"]
    assert (c - a).abs().max() < (b - a).abs().max()
    assert upcast.cache_identity()["encoder_compute"] == "float32" and "encoder_compute" not in half.cache_identity()


def test_float32_compute_keeps_bf16_storage_and_gives_the_rounded_weights_output_and_input_gradient(sd_dir):
    """frozen_compute float32: Linear / Conv2d weights stored in bf16, norms and the rest float32; the
    output and the gradient reaching the input are those of a float32 network holding the bf16-rounded
    weights (the custom backward keeps the stored weight, no float32 copy)."""
    import copy

    from torch import nn

    from onestep.precision import UpcastConv2d, UpcastLinear
    from onestep.trainers.memory import cast_frozen_backbone

    unet = load_teacher(sd_dir).backbone.requires_grad_(False)
    reference = copy.deepcopy(unet)
    for m in reference.modules():
        if type(m) in (nn.Linear, nn.Conv2d):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16).float()
    cast_frozen_backbone(unet, torch.bfloat16, compute="float32")
    dtypes = {type(m): {p.dtype for p in m.parameters(recurse=False)} for m in unet.modules() if list(m.parameters(recurse=False))}
    assert dtypes[UpcastLinear] == dtypes[UpcastConv2d] == {torch.bfloat16}
    assert nn.Linear not in dtypes and nn.Conv2d not in dtypes  # every one swapped
    assert dtypes[nn.GroupNorm] == {torch.float32}
    # no layer is a reference cycle: a copy (an export) is freed as soon as it is dropped, not at the next gc
    import weakref

    exported = copy.deepcopy(unet)
    ref = weakref.ref(next(m for m in exported.modules() if isinstance(m, UpcastLinear)))
    del exported
    assert ref() is None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500])
    outs = []
    for net in (unet, reference):
        xi = x.clone().requires_grad_(True)
        out = net(xi, t, encoder_hidden_states=cond).sample
        out.square().sum().backward()
        outs.append((out.detach(), xi.grad))
    assert outs[0][0].dtype == torch.float32
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)


def test_frozen_compute_auto_follows_the_cpu_and_a_run_trains_with_it(sd_dir, prompt_file, tmp_path):
    from onestep.trainers import make_trainer
    from onestep.trainers.memory import resolve_frozen_compute

    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_frozen_compute("auto", torch.bfloat16, "cpu") == ("storage" if native else "float32")
    assert resolve_frozen_compute("auto", torch.float32, "cpu") == "storage"
    assert resolve_frozen_compute("storage", torch.bfloat16, "cpu") == "storage"
    with pytest.raises(ConfigError, match="frozen_compute"):
        tiny_config("dmd2", tmp_path, sd_dir, frozen_compute="fp64")
    config = tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file), batch_size=1, max_steps=2, fake_updates_per_generator=1,
                         export=False, fake_score="lora", lora_rank=2, generator_lora_rank=2, frozen_dtype="bf16",
                         frozen_compute="float32", lr_generator=1e-2, lr_fake=1e-2)
    trainer = make_trainer(config)
    teacher = trainer.triad.teacher.backbone
    assert {p.dtype for n, p in teacher.named_parameters() if n.endswith("to_q.base_layer.weight")} == {torch.bfloat16}
    assert {p.dtype for n, p in teacher.named_parameters() if "norm" in n} == {torch.float32}
    lora = {n: p.detach().clone() for n, p in trainer.generator.backbone.named_parameters() if "lora_B" in n}
    trainer.train()
    after = dict(trainer.generator.backbone.named_parameters())
    assert any(not torch.equal(lora[n], after[n]) for n in lora)


@pytest.mark.skipif(torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has bf16 units")
def test_bf16_mixed_precision_on_a_cpu_without_bf16_units_is_warned_about(sd_dir, prompt_file, tmp_path, caplog):
    import logging

    from accelerate.state import AcceleratorState

    from onestep.trainers import make_trainer

    AcceleratorState._reset_state(True)  # accelerate keeps one mixed-precision state per process
    try:
        with caplog.at_level(logging.WARNING):
            # frozen_dtype float32: autocast alone is emulated, and that is warned about too
            make_trainer(tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file), batch_size=1, max_steps=1, export=False,
                                     mixed_precision="bf16", frozen_dtype="float32"))
    finally:
        AcceleratorState._reset_state(True)
    assert any("emulates every half-precision operation" in r.getMessage() for r in caplog.records)
