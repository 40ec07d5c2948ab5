import json
import subprocess
import sys

import numpy as np
import pytest

from onestep.cli import main


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_teacher_dir):
    from conftest import tiny_dmd2_config
    from onestep.trainers import DMD2Trainer

    tmp = tmp_path_factory.mktemp("cli_student")
    return DMD2Trainer(tiny_dmd2_config(tmp, tiny_teacher_dir, max_steps=1)).train()


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "/no/such/config.yaml"], "neither a YAML file nor a preset"),
        (["train", "digits_dmd2", "--max_stepz", "3"], "did you mean 'max_steps'"),
        (["train", "digits_dmd2", "--ema_decay", "1.5"], "ema_decay must lie in [0, 1)"),
        (["train", "digits_dmd2", "--method", "dmd9"], "unknown method 'dmd9'"),
        (["train", "digits_dmd2", "--teacher", "/no/such/teacher"], "neither a built-in teacher"),
        (["train", "digits_dmd2", "--batch_size", "0"], "batch_size must be at least 1"),
        (["train", "digits_dmd2", "--max_steps"], "--max_steps needs a value"),
        (["sample", "--student", "/no/such/student", "--out", "x"], "does not exist"),
    ],
)
def test_cli_errors_exit_2_with_one_line(capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, *[a.replace("x", str(tmp_path / "x")) if a == "x" else a for a in argv])
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_sample_not_a_student_and_bad_class(capsys, tmp_path, student_dir):
    code, _, err = run_cli(capsys, "sample", "--student", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "onestep.json is missing" in err
    code, _, err = run_cli(capsys, "sample", "--student", str(student_dir), "--out", str(tmp_path / "o"), "--class", "12")
    assert code == 2 and "--class must lie in [0, 9]" in err


def test_cli_sample_writes_pngs_and_npz(capsys, tmp_path, student_dir):
    out = tmp_path / "samples"
    code, stdout, _ = run_cli(capsys, "sample", "--student", str(student_dir), "--num-samples", "5", "--out", str(out), "--class", "3", "--seed", "7")
    assert code == 0
    data = np.load(out / "samples.npz")
    assert data["samples"].shape == (5, 1, 16, 16) and data["samples"].dtype == np.float32
    assert list(data["labels"]) == [3] * 5 and list(data["seeds"]) == [7, 8, 9, 10, 11]
    assert len(list(out.glob("sample_*.png"))) == 5 and (out / "grid.png").exists()
    # Sample 8 alone equals sample 8 of the batch (noise per seed).
    out2 = tmp_path / "one"
    run_cli(capsys, "sample", "--student", str(student_dir), "--num-samples", "1", "--out", str(out2), "--class", "3", "--seed", "8")
    np.testing.assert_allclose(np.load(out2 / "samples.npz")["samples"][0], data["samples"][1], atol=1e-5)


def test_cli_train_writes_student_and_resolved_config(capsys, tmp_path, tiny_teacher_dir):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        capsys, "train", "digits_dmd2", "--output-dir", str(out), "--teacher", str(tiny_teacher_dir),
        "--max_steps", "2", "--batch_size", "2", "--log_with", "none", "--preview_every", "1", "--preview_num", "4",
    )
    assert code == 0 and "student written to" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_steps"] == 2 and cfg["teacher"] == str(tiny_teacher_dir) and cfg["generator_timesteps"] == [600]
    assert (out / "student" / "onestep.json").exists() and (out / "checkpoint-2").is_dir()
    assert (out / "previews" / "step-000002.png").exists()


def test_console_script_has_help_and_no_traceback():
    r = subprocess.run([sys.executable, "-m", "onestep.cli", "train", "--list-presets"], capture_output=True, text=True)
    assert r.returncode == 0 and "digits_dmd2" in r.stdout and "gmm_dmd2" in r.stdout
    r = subprocess.run([sys.executable, "-m", "onestep.cli", "sample", "--student", "/nope", "--out", "/tmp/x"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr


def test_yaml_no_stays_a_word_for_string_fields(tmp_path, tiny_teacher_dir):
    from onestep.config import parse_overrides
    from onestep.trainers import load_config

    cfg = load_config("digits_dmd2", parse_overrides(["--mixed_precision", "no", "--teacher", str(tiny_teacher_dir)]))
    assert cfg.mixed_precision == "no"


def test_diffusers_and_trl_flag_names_bare_flags_and_both_spellings(tmp_path, capsys):
    from onestep.config import parse_overrides
    from onestep.errors import ConfigError
    from onestep.trainers import load_config

    argv = ["--checkpointing_steps", "50", "--checkpoints_total_limit", "3", "--resume_from_checkpoint", "latest",
            "--report_to", "none", "--validation_steps", "25", "--max_train_steps", "7", "--gradient_checkpointing",
            "--gradient_accumulation_steps", "2", "--train_batch_size", "4"]
    cfg = load_config("digits_dmd2", parse_overrides(argv))
    assert (cfg.checkpoint_every, cfg.checkpoint_total_limit, cfg.resume, cfg.log_with) == (50, 3, "latest", "none")
    assert (cfg.preview_every, cfg.max_steps, cfg.gradient_checkpointing) == (25, 7, True)  # a bare flag is true
    assert (cfg.gradient_accumulation_steps, cfg.batch_size) == (2, 4)
    with pytest.raises(ConfigError, match="command line: both .checkpointing_steps. and .checkpoint_every."):
        load_config("digits_dmd2", parse_overrides(["--checkpointing_steps", "5", "--checkpoint_every", "6"]))
    # --output-dir and --output_dir are one flag, for train, sample and quickstart alike; sample takes --device
    from onestep.cli import _parser

    p = _parser()
    assert p.parse_args(["train", "digits_dmd2", "--output_dir", "a"]).output_dir == "a"
    assert p.parse_args(["quickstart", "--max_steps", "3", "--output_dir", "b"]).max_steps == 3
    sample = p.parse_args(["sample", "--student", "s", "--output-dir", "c", "--device", "cpu"])
    assert (sample.out, sample.device) == ("c", "cpu")
    assert p.parse_args(["eval", "fid", "--output_dir", "d"]).out == "d"


def test_train_help_with_a_config_lists_its_fields(capsys):
    code, out, _ = run_cli(capsys, "train", "digits_vsd", "--help")
    assert code == 0 and "usage: onestep train" in out
    assert "guidance_range = [1.0, 3.0]" in out and "SNOOPI PG-SB" in out  # the preset's value and the field's help
    assert "lora_targets = 'all'" in out
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0 and "usage: onestep train" in out and "guidance_range" not in out
