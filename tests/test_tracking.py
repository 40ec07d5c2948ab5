"""Trackers (log_with / report_to), preview grids as tracker images, both learning rates, and the
periodic evaluation (eval_every) on the tiny teachers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import state_of, tiny_config
from t2i_fixtures import latent_cache_in_tmp, make_tiny_clip, make_tiny_sd, prompt_file  # noqa: F401 (fixtures)

from onestep.cli import main
from onestep.errors import ConfigError
from onestep.trainers import DMD2Config, load_config, make_trainer, tracking


def _events(run: Path):
    """The run's TensorBoard scalars and images, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((run / "logs").rglob("events.out.tfevents.*"), key=lambda p: len(p.parts))
    acc = EventAccumulator(str(files[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


# ------------------------------------------------------------------- log_with


def test_log_with_takes_accelerates_trackers_and_names_the_missing_package(tmp_path, monkeypatch):
    base = dict(output_dir=str(tmp_path / "run"))
    assert {"tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive"} <= set(tracking.tracker_names())
    for name in ["none", "all", *tracking.tracker_names()]:
        if name in ("none", "all") or name in tracking.installed_trackers():
            assert DMD2Config(log_with=name, **base).log_with == name
        else:  # one line naming the pip install, at config time
            package = {"comet_ml": "comet-ml"}.get(name, name)
            with pytest.raises(ConfigError, match=f"log_with: {name} is not installed; pip install {package} ") as e:
                DMD2Config(log_with=name, **base)
            assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="log_with must be one of tensorboard, wandb, .*all or none .got 'tensorbord'"):
        DMD2Config(log_with="tensorbord", **base)
    monkeypatch.setattr(tracking, "installed_trackers", lambda: [])  # a machine without any tracker
    with pytest.raises(ConfigError, match="log_with: tensorboard is not installed; pip install tensorboard"):
        DMD2Config(log_with="tensorboard", **base)
    with pytest.raises(ConfigError, match="log_with: all, but no tracker is installed; pip install tensorboard"):
        DMD2Config(log_with="all", **base)
    assert DMD2Config(log_with="none", **base).log_with == "none"


@pytest.mark.skipif("wandb" in tracking.installed_trackers(), reason="wandb is installed here: its missing-package error cannot show")
def test_report_to_wandb_without_wandb_is_one_line_before_anything_is_written(tmp_path, capsys, tiny_teacher_dir):
    with pytest.raises(ConfigError, match="pip install wandb"):
        load_config("digits_dmd2", {"report_to": "wandb"})
    out = tmp_path / "run"
    code = main(["train", "digits_dmd2", "--teacher", str(tiny_teacher_dir), "--output-dir", str(out), "--report_to", "wandb"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install wandb" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.skipif("wandb" not in tracking.installed_trackers(), reason="wandb is not installed (and is not installed for tests)")
def test_wandb_offline_run_logs_preview_images(tmp_path, monkeypatch, tiny_teacher_dir):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = tiny_config("dmd2", tmp_path, tiny_teacher_dir, log_with="wandb", preview_every=2, preview_num=4, export=False)
    make_trainer(cfg).train()
    assert list(tmp_path.rglob("*.wandb"))


# ------------------------------------------- one real run through the CLI


def test_cli_run_logs_preview_images_both_lrs_and_digits_fid_to_tensorboard(tmp_path, capsys, tiny_teacher_dir):
    """`onestep train ... --report_to all` (TensorBoard is what is installed) with previews and eval_every:
    the event file holds the preview grids as images at the preview steps (the PNG's pixels), both learning
    rates at every logged step (the warm-up's values), and eval/digits_fid at the eval steps, equal to
    onestep.eval's digits-FID of the exported student at the last one (EMA weights, as the export)."""
    from onestep.eval import digits_fid
    from onestep.export import load_student
    from onestep.samplers.student import sample_student_from_seeds

    run, n = tmp_path / "run", 16
    log_with = "all" if tracking.installed_trackers() == ["tensorboard"] else "tensorboard"  # all: nothing else starts
    code = main([
        "train", "digits_dmd2", "--teacher", str(tiny_teacher_dir), "--output-dir", str(run), "--max_steps", "4",
        "--batch_size", "2", "--report_to", log_with, "--log_every", "1", "--preview_every", "2", "--preview_num", "4",
        "--eval_every", "2", "--eval_num_samples", str(n),
    ])
    assert code == 0, capsys.readouterr().err
    ev = _events(run)

    from PIL import Image

    images = ev.Images("preview")
    assert [e.step for e in images] == [2, 4]
    for e in images:
        png = np.asarray(Image.open(run / "previews" / f"step-{e.step:06d}.png").convert("RGB"))
        logged = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        assert (e.height, e.width) == png.shape[:2] and np.array_equal(logged, png)

    cfg = json.loads((run / "config.json").read_text())
    assert cfg["warmup_steps"] > 4 and cfg["fake_updates_per_generator"] == 2  # (the preset's) every value below is in warm-up
    gen_updates = {s: len([k for k in range(s) if k % 2 == 0]) for s in (1, 2, 3, 4)}  # generator updates by step s
    expected_g = {s: cfg["lr_generator"] * (gen_updates[s] + 1) / cfg["warmup_steps"] for s in gen_updates}
    expected_f = {s: cfg["lr_fake"] * (s + 1) / cfg["warmup_steps"] for s in gen_updates}  # the fake score: every step
    assert _scalars(ev, "lr/generator") == pytest.approx(expected_g, rel=1e-6)
    assert _scalars(ev, "lr/fake") == pytest.approx(expected_f, rel=1e-6)

    fid = _scalars(ev, "eval/digits_fid")
    assert sorted(fid) == [2, 4] and all(np.isfinite(v) and v > 0 for v in fid.values())
    student = load_student(run / "student")
    x, _ = sample_student_from_seeds(student.generator, student, student.timesteps, range(n), [i % 10 for i in range(n)])
    assert fid[4] == pytest.approx(digits_fid(x), rel=1e-5)
    assert student.meta["metrics"] == {"digits_fid": pytest.approx(fid[4], rel=1e-6), "step": 4, "samples": n}  # on the card too
    assert f"digits fid {student.meta['metrics']['digits_fid']:.4g} (step 4, samples {n})" in (run / "student" / "README.md").read_text()


# ------------------------------------------------------ periodic evaluation


def test_eval_and_image_logging_leave_the_training_unchanged(tmp_path, tiny_teacher_dir):
    """The same run with eval_every, previews and TensorBoard, and with none of them, ends with the same
    weights bit for bit: the evaluation draws from its own generators and restores the modes."""
    from onestep.eval import digits_fid

    common = dict(max_steps=3, ema_decay=0.5, export=False)
    plain = make_trainer(tiny_config("dmd2", tmp_path / "a", tiny_teacher_dir, **common))
    plain.train()
    watched = make_trainer(tiny_config("dmd2", tmp_path / "b", tiny_teacher_dir, log_with="tensorboard", preview_every=1, preview_num=4,
                                       eval_every=1, eval_num_samples=8, **common))
    watched.scorers = {"digits_fid": digits_fid}
    watched.train()
    assert sorted(_scalars(_events(tmp_path / "b" / "run"), "eval/digits_fid")) == [1, 2, 3]
    for net in ("generator", "fake"):
        a, b = state_of(getattr(plain, net)), state_of(getattr(watched, net))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(p, q) for p, q in zip(plain.ema.shadow_params, watched.ema.shadow_params))

    # one evaluation, by hand: the loop's random streams, the global one and the networks' modes stay as they were
    tr = make_trainer(tiny_config("dmd2", tmp_path / "c", tiny_teacher_dir, eval_every=1, eval_num_samples=4))
    tr.scorers = {"digits_fid": digits_fid}
    tr.generator.train()
    before = (torch.get_rng_state(), tr.state.rng.get_state(), tr.state.shared_rng.get_state())
    logs = tracking.RunTracking(tr).evaluate(step=0)
    assert set(logs) == {"eval/digits_fid"} and tr.generator.training and tr.generator.backbone.training
    after = (torch.get_rng_state(), tr.state.rng.get_state(), tr.state.shared_rng.get_state())
    assert all(torch.equal(p, q) for p, q in zip(before, after))


def test_eval_every_is_refused_where_nothing_can_be_scored(tmp_path, tiny_teacher_dir):
    from diffusers import UNet2DModel

    from conftest import TINY_META, TINY_SCHEDULER, TINY_UNET
    from onestep.teachers import save_unet_teacher

    with pytest.raises(ConfigError, match="eval_every: nothing to score during training for teacher gmm-ring8"):
        tiny_config("dmd2", tmp_path, "gmm-ring8", eval_every=10)
    plain = save_unet_teacher(tmp_path / "plain", UNet2DModel(**TINY_UNET), TINY_SCHEDULER, {k: v for k, v in TINY_META.items() if k != "data"})
    with pytest.raises(ConfigError, match="eval_every: nothing to score .* set eval_every: 0"):
        tiny_config("dmd2", tmp_path, plain, eval_every=10)
    with pytest.raises(ConfigError, match="eval_num_samples must be at least 2"):
        tiny_config("dmd2", tmp_path, tiny_teacher_dir, eval_every=10, eval_num_samples=1)
    assert tiny_config("dmd2", tmp_path, plain).eval_every == 0  # off: no question asked
    assert tiny_config("dmd2", tmp_path, "digits", eval_every=10).eval_every == 10
    # no scoring functions handed to a trainer built in Python: a ConfigError before the run folder is written
    tr = make_trainer(tiny_config("dmd2", tmp_path, tiny_teacher_dir, eval_every=2))
    with pytest.raises(ConfigError, match="trainer.scorers = .'digits_fid': onestep.eval.digits_fid"):
        tr.train()
    assert not (tmp_path / "run").exists()


def test_text_to_image_eval_is_the_clip_score_of_the_decoded_validation_prompts(tmp_path, prompt_file):
    from onestep.eval import clip_score

    sd = make_tiny_sd(tmp_path / "sd")
    base = dict(prompts=str(prompt_file), batch_size=1, max_steps=2, export=False, generator_timesteps=[999])
    with pytest.raises(ConfigError, match="text-to-image, scored with the CLIP score: set eval_clip_model"):
        tiny_config("dmd2", tmp_path, sd, eval_every=1, **base)
    clip_dir = make_tiny_clip(tmp_path / "clip")
    n = 5
    tr = make_trainer(tiny_config("dmd2", tmp_path, sd, eval_every=2, eval_num_samples=n, eval_clip_model=str(clip_dir),
                                  log_with="tensorboard", **base))
    tr.scorers = {"clip_score": clip_score}
    tr.train()
    logged = _scalars(_events(tmp_path / "run"), "eval/clip_score")
    assert sorted(logged) == [2]
    latents, _ = tr.preview_samples(n=n)
    with torch.no_grad():
        images = tr.decode(latents).clamp(-1, 1)
    valid = tr.conditioning.validation_prompts
    expected = clip_score(images, [valid[i % len(valid)] for i in range(n)], clip_dir)["clip_score"]
    assert logged[2] == pytest.approx(expected, rel=1e-4, abs=1e-4)
