"""The export of a LoRA or EMA generator is written a tensor at a time, never built whole
(trainers/checkpoint.py ``export_state``, onestep/lora.py ``merged_lora_state``, onestep/weights.py
``Deferred``): the files hold exactly what the whole merged copy held, and the trained weights are
untouched afterwards."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from t2i_fixtures import latent_cache_in_tmp, make_tiny_sd, prompt_file  # noqa: F401 (fixtures)

from onestep.errors import ConfigError
from onestep.weights import EXPORT_WEIGHTS, Deferred, averaged_state, write_safetensors


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def _randomise_adapters(net: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def test_merged_lora_state_is_the_merged_copy_byte_for_byte(sd_dir, tmp_path):
    """On a UNet whose base is stored in bf16 (as a frozen LoRA base is), every Linear and Conv2d adapted."""
    from diffusers import UNet2DConditionModel

    from onestep.lora import add_lora, merged_lora, merged_lora_state
    from onestep.trainers.memory import float32_copy

    net = UNet2DConditionModel.from_pretrained(sd_dir / "unet")
    add_lora(net, 4, 8.0, "generator", "all")
    for name, p in net.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    _randomise_adapters(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    state = merged_lora_state(net)
    assert any(isinstance(v, Deferred) for v in state.values())
    write_safetensors(state, tmp_path / "streamed.safetensors")
    write_safetensors(merged_lora(float32_copy(net)).state_dict(), tmp_path / "whole.safetensors")

    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    merged = load_file(tmp_path / "streamed.safetensors")
    assert all(v.dtype == torch.float32 for v in merged.values()) and not any("lora_" in k for k in merged)
    # the adapters did change the weights, and the network itself is as it was
    plain = {k.replace(".base_layer.", "."): v for k, v in before.items() if "lora_" not in k}
    assert set(plain) == set(merged)
    assert sum(not torch.equal(plain[k].float(), merged[k]) for k in merged) > 10
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_a_deferred_tensor_that_is_not_what_it_announced_is_refused(tmp_path):
    bad = Deferred((2, 3), torch.float32, lambda: torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="announced"):
        write_safetensors({"w": bad}, tmp_path / "w.safetensors")


def test_averaged_state_is_the_lerp_and_refuses_another_network(tmp_path):
    a = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor([3])}
    write_safetensors({"w": torch.ones(2, 3), "n": torch.tensor([3])}, tmp_path / "other.safetensors")
    write_safetensors(averaged_state(a, tmp_path / "other.safetensors", 0.25), tmp_path / "avg.safetensors")
    out = load_file(tmp_path / "avg.safetensors")
    assert torch.allclose(out["w"], 0.75 * a["w"] + 0.25) and torch.equal(out["n"], a["n"])
    write_safetensors({"w": torch.ones(3, 2), "n": torch.tensor([3])}, tmp_path / "wrong.safetensors")
    with pytest.raises(ConfigError, match="shape"):
        averaged_state(a, tmp_path / "wrong.safetensors", 0.5)
    write_safetensors({"w": torch.ones(2, 3), "n": torch.tensor([4])}, tmp_path / "buffer.safetensors")
    with pytest.raises(ConfigError, match="differs"):
        averaged_state(a, tmp_path / "buffer.safetensors", 0.5)


@pytest.mark.parametrize("lora", [True, False], ids=["lora-ema-averaged", "full-ema"])
def test_export_and_checkpoint_hold_what_the_whole_export_copy_holds(sd_dir, prompt_file, tmp_path, lora):
    """A LoRA generator with EMA, averaged with another student (the teacher's UNet file), frozen base in
    bf16; and a full generator with EMA. The student and the checkpoint's export weights equal the whole
    copy :meth:`generator_for_export` builds, and the trained weights are the trained ones afterwards."""
    from onestep.trainers import make_trainer

    extra = dict(generator_lora_rank=4, generator_lora_alpha=8.0, frozen_dtype="bf16",
                 export_average_with=str(sd_dir / "unet" / "diffusion_pytorch_model.safetensors"), export_average_weight=0.3)
    config = tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file), generator_timesteps=[999], batch_size=2, max_steps=2,
                         fake_updates_per_generator=1, ema_decay=0.5, checkpoint_every=2, **(extra if lora else {}))
    trainer = make_trainer(config)
    _randomise_adapters(trainer.generator.backbone)
    trainer.train()  # two steps, its checkpoint-2 and the student
    net = trainer.generator.backbone
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    whole = trainer.generator_for_export().state_dict()
    assert any(not torch.equal(v.float(), whole[k.replace(".base_layer.", ".")].float())
               for k, v in trained.items() if "lora_" not in k)  # EMA / the adapters / the average do show

    student = load_file(trainer.output_dir / "student" / "unet" / "diffusion_pytorch_model.safetensors")
    checkpoint = load_file(trainer.output_dir / "checkpoint-2" / EXPORT_WEIGHTS)
    for written in (student, checkpoint):
        assert set(written) == set(whole)
        assert all(torch.equal(written[k], whole[k]) for k in whole)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in trained.items())
    if lora:
        assert any("lora_B" in k for k in trained) and student["conv_in.weight"].dtype == torch.float32


@pytest.mark.parametrize("lora", [True, False], ids=["lora-ema", "full-ema"])
def test_previews_and_evaluation_sample_the_export_without_copying_the_generator(sd_dir, prompt_file, tmp_path, monkeypatch, lora):
    """``export_view``: the EMA weights stand in the trained network while it samples (restored after), and
    no copy of the generator is made. A full generator's samples are the whole export copy's bit for bit;
    a LoRA one samples unmerged, equal to the merged copy within float rounding."""
    import onestep.trainers.exporting as exporting
    from onestep.trainers import make_trainer

    config = tiny_config("dmd2", tmp_path, sd_dir, prompts=str(prompt_file), generator_timesteps=[999], batch_size=2, max_steps=2,
                         fake_updates_per_generator=1, ema_decay=0.5, export=False, preview_num=2,
                         **(dict(generator_lora_rank=4, generator_lora_alpha=8.0) if lora else {}))
    trainer = make_trainer(config)
    _randomise_adapters(trainer.generator.backbone)
    trainer.train()
    trained = {k: v.clone() for k, v in trainer.generator.backbone.state_dict().items()}
    reference, _ = trainer.preview_samples(net=trainer.generator_for_export())

    def no_copy(*args, **kwargs):
        raise AssertionError("the generator was copied")

    monkeypatch.setattr(exporting, "float32_copy", no_copy)
    monkeypatch.setattr(exporting.copy, "deepcopy", no_copy)
    x, _ = trainer.preview_samples()
    assert trainer.save_preview(2).is_file()
    with trainer.export_view() as net:
        assert net is trainer.generator.backbone
        assert any(not torch.equal(p, trained[k]) for k, p in net.state_dict().items())  # the EMA weights, not the trained ones
    assert all(torch.equal(v, trainer.generator.backbone.state_dict()[k]) for k, v in trained.items())
    if lora:
        assert torch.allclose(x, reference, atol=1e-4)
    else:
        assert torch.equal(x, reference)
