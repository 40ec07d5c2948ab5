import json

import pytest
import torch
from diffusers import UNet2DModel

from conftest import tiny_dmd2_config
from onestep.errors import StudentFormatError
from onestep.export import export_student, load_student
from onestep.samplers.student import sample_student_from_seeds
from onestep.teachers import load_teacher
from onestep.teachers.gmm import MLPDenoiser
from onestep.trainers import DMD2Trainer


@pytest.fixture(scope="module")
def trained_student(tmp_path_factory, tiny_teacher_dir):
    tmp = tmp_path_factory.mktemp("student_run")
    cfg = tiny_dmd2_config(tmp, tiny_teacher_dir, max_steps=2)
    tr = DMD2Trainer(cfg)
    path = tr.train()
    return path, tr


def test_export_reload_identical_outputs(trained_student):
    path, tr = trained_student
    student = load_student(path)
    x, t, y = torch.randn(3, 1, 16, 16), torch.full((3,), 800), torch.tensor([0, 4, 9])
    with torch.no_grad():
        torch.testing.assert_close(student.generator(x, t, y), tr.generator.eval()(x, t, y), rtol=0, atol=0)
    meta = json.loads((path / "onestep.json").read_text())
    assert meta["method"] == "dmd2" and meta["timesteps"] == [800]
    assert meta["prediction_type"] == "epsilon" and meta["conditioning"]["null_class"] == 10
    assert meta["teacher"]["sha256"] == tr.teacher_spec.sha256 and len(meta["teacher"]["sha256"]) == 64
    assert [p.name for p in (path / "generator").iterdir() if p.suffix in (".bin", ".pt", ".ckpt")] == []


def test_plain_diffusers_loads_and_samples_student_without_onestep(trained_student):
    """onestep.json says enough to sample with diffusers alone; the result equals onestep's sampler."""
    path, _ = trained_student
    meta = json.loads((path / "onestep.json").read_text())
    unet = UNet2DModel.from_pretrained(path / "generator")
    from diffusers import DDPMScheduler

    abar = DDPMScheduler.from_config(meta["schedule"]).alphas_cumprod
    z = torch.stack([torch.randn(meta["sample_shape"], generator=torch.Generator().manual_seed(s)) for s in range(4)])
    y = torch.tensor([3, 3, 7, 7])
    t = meta["timesteps"][0]
    with torch.no_grad():
        eps = unet(z, t, class_labels=y).sample
    x0 = ((z - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-meta["clip"], meta["clip"])
    student = load_student(path)
    ours, _ = sample_student_from_seeds(student.generator, student, student.timesteps, range(4), [3, 3, 7, 7])
    torch.testing.assert_close(ours, x0.float(), atol=1e-5, rtol=1e-5)


def test_mlp_student_roundtrip(tmp_path):
    teacher = load_teacher("gmm-ring8")
    net = MLPDenoiser()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_student(tmp_path / "s", net, teacher, method="dmd2", timesteps=[999])
    student = load_student(tmp_path / "s")
    x, t = torch.randn(5, 2), torch.full((5,), 999)
    # Fresh MLP students of analytic teachers predict v (see Teacher.student_prediction_type).
    assert student.meta["prediction_type"] == teacher.trainable_prediction_type == "v_prediction"
    ref = teacher.schedule.to_x0(net(x, t).sample, x, t, "v_prediction")
    torch.testing.assert_close(student.generator(x, t), ref, rtol=0, atol=0)
    assert student.sample_shape == (2,) and student.clip is None


def test_load_student_errors(tmp_path, trained_student):
    with pytest.raises(StudentFormatError, match="does not exist"):
        load_student(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudentFormatError, match="onestep.json is missing"):
        load_student(tmp_path / "empty")
    # A pickle next to the weights is refused, not loaded.
    import shutil

    path, _ = trained_student
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "generator" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(StudentFormatError, match="pickle"):
        load_student(bad)
    meta = json.loads((path / "onestep.json").read_text())
    meta["model_class"] = "os.system"
    bad2 = tmp_path / "bad2"
    shutil.copytree(path, bad2)
    (bad2 / "onestep.json").write_text(json.dumps(meta))
    with pytest.raises(StudentFormatError, match="model_class"):
        load_student(bad2)


def test_teacher_folder_with_only_pickles_is_refused(tmp_path, tiny_teacher_dir):
    import shutil

    from onestep.errors import TeacherError

    bad = tmp_path / "t"
    shutil.copytree(tiny_teacher_dir, bad)
    for f in (bad / "unet").glob("*.safetensors"):
        f.unlink()
    (bad / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(TeacherError, match="safetensors only"):
        load_teacher(bad)


def test_every_student_folder_has_a_model_card_whose_snippet_loads_it(tmp_path, tiny_teacher_dir):
    import re

    from onestep.trainers import DMD2Trainer

    student = DMD2Trainer(tiny_dmd2_config(tmp_path, tiny_teacher_dir, max_steps=1, generator_timesteps=[800, 400])).train()
    card = (student / "README.md").read_text()
    assert card.startswith("# 2-step student: dmd2 distillation of") and "timesteps [800, 400]" in card
    assert "teacher guidance during training: 2.0" in card and "trained for 1 iterations" in card
    # the card's Python snippet, run as written (with the folder's path), loads the student's network
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("path/to/this/folder", str(student))
    scope: dict = {}
    exec(code, scope)
    ours = load_student(student).generator.backbone.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in scope["net"].state_dict().items())


def test_write_safetensors_is_read_back_exactly_by_safetensors(tmp_path):
    """The streaming writer (one tensor at a time, no bytes copy of the whole state) writes files the
    safetensors reader validates and returns bit for bit: every stored dtype, 0-d, empty and
    non-contiguous tensors, metadata, and a cast as written."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from onestep.weights import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 5, generator=g), "b16": torch.randn(7, generator=g).bfloat16(), "h": torch.randn(4, generator=g).half(),
        "step": torch.tensor(3), "empty": torch.zeros(0, 4), "mask": torch.tensor([True, False]), "t": torch.randn(4, 6, generator=g).t(),
        "i8": torch.arange(5, dtype=torch.int8),
    }
    write_safetensors(tensors, tmp_path / "a.safetensors", {"format": "pt", "step": 3})
    back = load_file(str(tmp_path / "a.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "3"}
    write_safetensors(tensors, tmp_path / "h.safetensors", dtype=torch.float16)
    half = load_file(str(tmp_path / "h.safetensors"))
    assert half["w"].dtype == torch.float16 and torch.equal(half["w"], tensors["w"].half())
    assert half["step"].dtype == torch.int64 and half["mask"].dtype == torch.bool


def test_weights_file_finds_the_generator_of_any_student_folder(tmp_path):
    from onestep.errors import ConfigError
    from onestep.weights import weights_file

    for sub in ("generator", "unet", "transformer"):
        f = tmp_path / sub / sub / "diffusion_pytorch_model.safetensors"
        f.parent.mkdir(parents=True)
        f.write_bytes(b"")
        assert weights_file(tmp_path / sub) == f
    with pytest.raises(ConfigError, match="no such weights file"):
        weights_file(tmp_path / "generator" / "generator" / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no such weights file"):
        weights_file(tmp_path / "empty")
    with pytest.raises(ConfigError, match="never from pickles"):
        weights_file(tmp_path / "model.bin")
