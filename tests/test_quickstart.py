"""The main job end to end on the shipped digits teacher, cut to a few iterations."""

import json

import pytest
import torch

from onestep.digits import classify_digits, digits_dataset
from onestep.teachers import load_teacher


def test_shipped_digits_teacher_loads_strictly_and_is_class_conditional():
    t = load_teacher("digits")
    assert t.sample_shape == (1, 16, 16) and t.conditioning.num_classes == 10 and t.conditioning.null_class == 10
    assert t.schedule.config["beta_schedule"] == "squaredcos_cap_v2"
    assert sum(p.numel() for p in t.backbone.parameters()) < 3_000_000  # a few MB on disk
    assert all(not p.requires_grad for p in t.backbone.parameters())


def test_digits_classifier_reads_the_real_digits():
    x, y = digits_dataset()
    assert x.shape == (1797, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert (classify_digits(x[:300]) == y[:300]).float().mean() > 0.97


@pytest.mark.slow
def test_shipped_teacher_draws_the_asked_digits():
    from onestep.samplers.student import teacher_sample_from_seeds

    t = load_teacher("digits")
    labels = [i % 10 for i in range(50)]
    x = teacher_sample_from_seeds(t.denoiser(), t, range(50), labels, num_steps=25, guidance_scale=t.guidance_scale)
    assert (classify_digits(x) == torch.tensor(labels)).float().mean() >= 0.9


def test_quickstart_end_to_end_short(tmp_path, capsys):
    from onestep.cli import main

    out = tmp_path / "qs"
    assert main(["quickstart", "--output-dir", str(out), "--max-steps", "2", "--timing-samples", "10", "--fid-samples", "20"]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("distill_wall_seconds", "student_sec_per_image", "teacher_sec_per_image", "speedup", "student_class_accuracy"):
        assert report[key] > 0, key
    assert report["student_steps"] == 1 and report["teacher_steps"] == 50
    # Scores side by side: the 80 grid + 10 timing images a side are reused (--fid-samples 20 adds none).
    assert report["fid_samples"] == report["class_accuracy_samples"] == 90
    assert report["teacher_digits_fid"] > 0 and report["student_digits_fid"] > 0 and report["real_digits_fid_floor"] >= 0
    assert report["teacher_digits_fid"] < 0.5 * report["student_digits_fid"]  # a 2-iteration student is far from the teacher
    assert (out / "samples.png").stat().st_size > 10_000
    assert (out / "student" / "generator" / "diffusion_pytorch_model.safetensors").exists()
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "ms/image" in printed and "digits-FID (90 samples)" in printed
    # the student's card and onestep.json say what was measured of it
    meta = json.loads((out / "student" / "onestep.json").read_text())
    assert meta["metrics"]["digits_fid"] == report["student_digits_fid"] and meta["metrics"]["samples"] == 90
    card = (out / "student" / "README.md").read_text()
    assert f"digits fid {report['student_digits_fid']:.4g}" in card and "recall" in card
