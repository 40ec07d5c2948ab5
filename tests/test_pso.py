"""PSO (trainers/pso.py): tuning a distilled student toward target images; the style sets (onestep/styles.py)."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import changed, state_of, tiny_config

from onestep.errors import ConfigError
from onestep.export import export_student, load_student
from onestep.styles import load_image_folder, thick_digits, thicken
from onestep.teachers import load_teacher
from onestep.trainers import PSOTrainer, make_trainer
from onestep.trainers.pso import pso_loss


@pytest.fixture(scope="module")
def tiny_student(tiny_teacher_dir, tmp_path_factory):
    """A "distilled" one-step student of the tiny teacher: its own weights, slightly moved, sampled at [700]."""
    teacher = load_teacher(tiny_teacher_dir)
    net = copy.deepcopy(teacher.backbone)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return export_student(tmp_path_factory.mktemp("student") / "student", net, teacher, method="dmd2", timesteps=[700])


def pso_config(tmp_path, teacher_dir, student, **overrides):
    values = dict(student=None if student is None else str(student), max_steps=2, batch_size=4, lr_generator=1e-3, beta=500.0, offline_pairs=8)
    values.update(overrides)
    values.setdefault("generator_timesteps", [999])  # tiny_config's [800]: PSO takes the student's own
    return tiny_config("pso", tmp_path, teacher_dir, **values)


def test_the_loss_is_softplus_of_beta_times_the_margin_and_rewards_better_targets():
    err_w, err_w_ref = torch.tensor([0.30, 0.50]), torch.tensor([0.40, 0.50])
    err_l, err_l_ref = torch.tensor([0.20, 0.60]), torch.tensor([0.20, 0.50])
    loss, margin = pso_loss(err_w, err_w_ref, err_l, err_l_ref, beta=10.0)
    torch.testing.assert_close(margin, torch.tensor([-0.10, -0.10]))  # (0.3-0.4)-(0.2-0.2), (0.5-0.5)-(0.6-0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)))  # -log sigmoid(-beta * margin)
    # the tuned model denoising the targets better (relative to the reference) lowers the loss ...
    lower, _ = pso_loss(err_w - 0.05, err_w_ref, err_l, err_l_ref, beta=10.0)
    # ... and denoising its own reference images better raises it
    higher, _ = pso_loss(err_w, err_w_ref, err_l - 0.05, err_l_ref, beta=10.0)
    assert float(lower) < float(loss) < float(higher)
    # equal to the reference everywhere: log 2
    assert float(pso_loss(err_w, err_w, err_l, err_l, 3.0)[0]) == pytest.approx(math.log(2))


def test_thick_digits_are_a_plus_shaped_dilation_of_the_digits():
    from onestep.digits import digits_dataset

    x, y = digits_dataset()
    tx, ty = thick_digits()
    assert torch.equal(ty, y) and tx.shape == x.shape and bool((tx >= x).all())
    assert float((tx > 0).float().mean()) > float((x > 0).float().mean()) + 0.1  # visibly more ink
    dot = torch.full((1, 1, 5, 5), -1.0)
    dot[0, 0, 2, 2] = 1.0
    plus = thicken(dot)[0, 0]
    assert plus.gt(0).nonzero().tolist() == [[1, 2], [2, 1], [2, 2], [2, 3], [3, 2]]


def test_an_image_folder_loads_resized_with_class_subfolders(tmp_path):
    from PIL import Image

    for label in (3, 7):
        (tmp_path / str(label)).mkdir()
        Image.new("L", (32, 32), color=255 if label == 3 else 0).save(tmp_path / str(label) / "a.png")
    x, y, names = load_image_folder(tmp_path, (1, 16, 16))
    assert x.shape == (2, 1, 16, 16) and y.tolist() == [3, 7] and names == ["3/a.png", "7/a.png"]
    assert float(x[0].min()) == 1.0 and float(x[1].max()) == -1.0
    Image.new("L", (16, 16)).save(tmp_path / "loose.png")
    with pytest.raises(ConfigError, match="every image sits in a class sub-folder"):
        load_image_folder(tmp_path, (1, 16, 16))


def test_a_pso_step_trains_the_student_and_leaves_the_reference(tiny_teacher_dir, tiny_student, tmp_path):
    trainer = make_trainer(pso_config(tmp_path, tiny_teacher_dir, tiny_student))
    assert isinstance(trainer, PSOTrainer) and trainer.fake is None and set(trainer.extras) == {"reference"}
    assert trainer.config.generator_timesteps == [700]  # the student's own
    student_weights = load_student(tiny_student).generator.backbone.state_dict()
    assert all(torch.equal(v, trainer.generator.backbone.state_dict()[k]) for k, v in student_weights.items())  # starts as the student
    g0, r0, t0 = state_of(trainer.generator.backbone), state_of(trainer.extras["reference"]), state_of(trainer.teacher.backbone)
    batch = trainer.make_batch()
    loss, logs = trainer.generator_loss(batch)
    # the tuned model is still the reference: margin 0 up to float32 rounding (the two run in different batches,
    # ~1e-7 of errors near 1; beta = 500 scales that into the loss)
    assert abs(logs["pso/margin"]) < 1e-6
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=500 * 1e-6)
    logs = trainer.train_step()
    assert math.isfinite(logs["loss/pso"]) and "grad_norm/fake" not in logs
    assert changed(g0, trainer.generator.backbone) > 0
    assert changed(r0, trainer.extras["reference"]) == 0 and changed(t0, trainer.teacher.backbone) == 0
    # both images of a pair are read at the student's label with the same noise
    assert set(trainer.noise_levels(16).tolist()) == {700}


def test_online_references_come_from_the_current_student_and_offline_ones_from_the_initial_one(tiny_teacher_dir, tiny_student, tmp_path):
    online = make_trainer(pso_config(tmp_path / "on", tiny_teacher_dir, tiny_student))
    online.train_step()  # the student moves away from the reference
    state = online.rng.get_state()
    x_w, x_l, cond = online.pair_batch({})
    online.rng.set_state(state)
    x_w2, cond2, _ = online.draw_targets(4, online.rng)
    after_targets = online.rng.get_state()
    from_student = online.sample_from(online.generator, cond2, 4)
    online.rng.set_state(after_targets)
    from_reference = online.sample_from(online.reference, cond2, 4)
    assert torch.equal(x_w, x_w2) and torch.equal(x_l, from_student) and not torch.equal(x_l, from_reference)

    offline = make_trainer(pso_config(tmp_path / "off", tiny_teacher_dir, tiny_student, pairs="offline"))
    bank = [v.clone() for v in offline.offline]
    assert bank[0].shape[0] == 8 and bank[1].shape == bank[0].shape
    offline.train_step()
    offline.train_step()
    assert all(torch.equal(a, b) for a, b in zip(bank, offline.offline))  # generated once, by the initial student
    _, x_l, _ = offline.pair_batch({})
    assert all(any(torch.equal(row, b) for b in bank[1]) for row in x_l)
    # the bank's references are the initial (reference) student's samples for the bank's targets' classes
    again = make_trainer(pso_config(tmp_path / "off2", tiny_teacher_dir, tiny_student, pairs="offline", seed=0))
    torch.testing.assert_close(again.offline[1], bank[1])


def test_pairs_mode_pairs_each_thick_digit_with_its_own_thin_one(tiny_teacher_dir, tiny_student, tmp_path):
    trainer = make_trainer(pso_config(tmp_path, tiny_teacher_dir, tiny_student, pairs="pairs", losers="digits"))
    x_w, x_l, cond = trainer.pair_batch({})
    torch.testing.assert_close(x_w, thicken(x_l))
    assert math.isfinite(trainer.train_step()["loss/pso"])


def test_naive_mode_is_the_plain_denoising_loss_on_the_targets(tiny_teacher_dir, tiny_student, tmp_path):
    trainer = make_trainer(pso_config(tmp_path, tiny_teacher_dir, tiny_student, naive=True))
    assert trainer.extras == {}  # no frozen copy
    state = trainer.rng.get_state()
    loss, logs = trainer.generator_loss({})
    trainer.rng.set_state(state)
    x, cond, _ = trainer.draw_targets(4, trainer.rng)
    t = trainer.noise_levels(4)
    noise = trainer.randn(tuple(x.shape))
    x_t = trainer.schedule.add_noise(x, noise, t)
    with torch.no_grad():
        eps = trainer.generator.backbone(x_t, t, class_labels=cond).sample
    assert set(t.tolist()) == {700}
    assert float(loss.detach()) == pytest.approx(float(F.mse_loss(eps, noise)), rel=1e-5)  # eps-MSE: the teacher's own loss
    assert logs["loss/naive"] == pytest.approx(float(loss.detach()))


def test_the_tuned_student_exports_with_the_students_timesteps_and_reloads(tiny_teacher_dir, tiny_student, tmp_path):
    trainer = make_trainer(pso_config(tmp_path, tiny_teacher_dir, tiny_student, max_steps=1))
    out = trainer.train()
    tuned = load_student(out)
    assert tuned.timesteps == [700] and tuned.meta["method"] == "pso"
    assert tuned.meta["pso"]["student"] == str(tiny_student) and tuned.meta["pso"]["pairs"] == "online"
    assert all(torch.equal(v, trainer.generator.backbone.state_dict()[k]) for k, v in tuned.generator.backbone.state_dict().items())


def test_bad_configs_are_refused(tiny_teacher_dir, tiny_student, tmp_path):
    bad = [
        (dict(pairs="sometimes"), "pairs must be one of"),
        (dict(losers="digits"), "losers needs pairs 'pairs'"),
        (dict(pairs="pairs"), "needs losers"),
        (dict(naive=True, pairs="offline"), "naive fine-tuning uses no reference"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(noise_levels="all"), "noise_levels must be one of"),
        (dict(regression_warmup_steps=5), "PSO tunes a trained student"),
    ]
    with pytest.raises(ConfigError, match="student: set it"):
        pso_config(tmp_path, tiny_teacher_dir, None)
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            pso_config(tmp_path, tiny_teacher_dir, tiny_student, **overrides)
    with pytest.raises(ConfigError, match="no such student folder"):
        make_trainer(pso_config(tmp_path, tiny_teacher_dir, tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="keeps the student's own"):
        make_trainer(pso_config(tmp_path, tiny_teacher_dir, tiny_student, generator_timesteps=[500]))
    with pytest.raises(ConfigError, match="made for the digits teacher"):
        make_trainer(pso_config(tmp_path, "gmm-ring8", tiny_student))
    import json
    import shutil

    lcm = shutil.copytree(tiny_student, tmp_path / "lcm-student")
    meta = json.loads((lcm / "onestep.json").read_text())
    (lcm / "onestep.json").write_text(json.dumps({**meta, "consistency": {"parameterisation": "lcm"}}))
    with pytest.raises(ConfigError, match="consistency students are not supported"):
        make_trainer(pso_config(tmp_path, tiny_teacher_dir, lcm))
    with pytest.raises(ConfigError, match="no such folder of images"):
        make_trainer(pso_config(tmp_path, tiny_teacher_dir, tiny_student, targets=str(tmp_path / "no-images")))


def test_a_text_to_image_student_tunes_toward_captioned_images(tmp_path, monkeypatch):
    from t2i_fixtures import PROMPTS, make_tiny_sd, write_image_folder, write_prompts

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    sd, prompts = make_tiny_sd(tmp_path / "sd"), write_prompts(tmp_path / "prompts.txt", PROMPTS)
    images = write_image_folder(tmp_path / "images")
    teacher = load_teacher(sd, prompts=str(prompts), real_images=str(images))
    student = export_student(tmp_path / "student", copy.deepcopy(teacher.backbone), teacher, method="dmd2", timesteps=[999])
    common = dict(student=str(student), prompts=str(prompts), real_images=str(images), noise_levels="uniform", max_steps=1, batch_size=2)
    trainer = make_trainer(tiny_config("pso", tmp_path, sd, **{**common, "targets": "teacher", "generator_timesteps": [999]}))
    g0 = state_of(trainer.generator.backbone)
    assert math.isfinite(trainer.train_step()["loss/pso"]) and changed(g0, trainer.generator.backbone) > 0
    assert load_student(trainer.export()).meta["pso"]["targets"] == "teacher"
    with pytest.raises(ConfigError, match="set targets: teacher"):  # a built-in set does not fit a text teacher
        make_trainer(tiny_config("pso", tmp_path, sd, **{**common, "generator_timesteps": [999]}))


def test_the_digits_preset_loads():
    from onestep.trainers import load_config

    config = load_config("digits_pso")
    assert config.method == "pso" and config.targets == "thick-digits" and config.student


def test_the_benchmark_scores_style_and_sharpness():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from pso_style import score

    from onestep.digits import digits_dataset

    style, real = thick_digits()[0][:200], digits_dataset()[0][:200]
    on_style = score(style[:100], style[100:], real[100:])
    on_real = score(real[:100], style[100:], real[100:])
    assert on_style["fid_style"] < on_real["fid_style"] and on_real["fid_real"] < on_style["fid_real"]
    blurred = score(F.avg_pool2d(F.pad(real[:100], (1, 1, 1, 1), mode="replicate"), 3, 1), style[100:], real[100:])
    assert blurred["grain"] < on_real["grain"]  # grain: the high-frequency energy
