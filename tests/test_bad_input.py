"""Bad input a user can give: each gives one clear line on stderr and exit code 2 from the CLI (no
traceback), and writes or changes nothing. Configs, student folders, teachers, evaluator inputs; then
property tests (hypothesis) that random documents fed to the config loader and to the ``onestep.json``
reader give the project's error or a valid result, never another exception.

Truncated safetensors and weights of the wrong shape are in tests/test_reliability.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onestep.cli import main
from onestep.errors import OnestepError

FAST_TRAIN = "method: dmd2\nteacher: digits\nmax_steps: 1\nbatch_size: 2\nlog_with: none\n"


def cli_error(capsys, *argv) -> str:
    """Run ``onestep ARGV``; it must exit 2 with one line on stderr and no traceback. Returns that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a hash of its bytes: equal snapshots, nothing written."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


# ----------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "line, message",
    [
        ("max_stepz: 3", "unknown key 'max_stepz' for DMD2Config; did you mean 'max_steps'?"),
        ("colour: blue", "unknown key 'colour' for DMD2Config"),
        ("dm_t_min: 0.1", "'dm_t_min' was replaced by 'loss_t_range'"),
        ("1: 2", "config keys are field names, not 1 (int)"),
        ("max_steps: many", "max_steps: 'many' is not a valid int"),
        ("max_steps: 1.5", "max_steps: 1.5 is not a valid int"),
        ("lr_generator: [1.0e-4]", "lr_generator: [0.0001] is not a valid float"),
        ("lr_generator: fast", "lr_generator: 'fast' is not a number"),
        ("lr_generator: .nan", "lr_generator must be a finite number (got nan)"),
        ("guidance_scale: .inf", "guidance_scale must be a finite number (got inf)"),
        ("max_steps: -5", "max_steps must be at least 1 (got -5)"),
        ("batch_size: 0", "batch_size must be at least 1 (got 0)"),
        ("lr_fake: 0", "lr_fake must be > 0 (got 0.0)"),
        ("lr_generator: -1e-4", "lr_generator must be > 0 (got -0.0001)"),
        ("ema_decay: 1", "ema_decay must lie in [0, 1) (got 1.0)"),
        ("ema_decay: -0.1", "ema_decay must lie in [0, 1) (got -0.1)"),
        ("adam_beta2: 1.5", "adam_beta2 must lie in [0, 1) (got 1.5)"),
        ("weight_decay: -0.01", "weight_decay must be >= 0 (got -0.01)"),
        ("max_grad_norm: -1", "max_grad_norm must be >= 0 (got -1.0)"),
        ("lora_alpha: 0", "lora_alpha must be > 0 when set (got 0.0)"),
        ("generator_timesteps: [999, -1]", "generator_timesteps must be a non-empty list of integers >= 0 (got [999, -1])"),
        ("generator_timesteps: [499, 999]", "generator_timesteps must be strictly decreasing"),
        ("loss_t_range: [0.9, 0.1]", "loss_t_range must be [low, high] with 0 <= low < high <= 1"),
        ("method: dmd9", "unknown method 'dmd9'; available: boot, consistency, ctm,"),
        ("fake_score: clone", "fake_score must be one of ('copy', 'lora') for dmd2 (got 'clone')"),
        ("mixed_precision: fp8", "mixed_precision must be one of ('no', 'fp16', 'bf16')"),
        ("lora_targets: {to_q: 1}", "lora_targets: {'to_q': 1} is not a valid str | list[str]"),
        ("method: fdistill\ndivergence: kl9", "divergence must be one of"),
        ("method: consistency\nfake_score: copy", "fake_score must be one of ('none',) for consistency"),
    ],
)
def test_a_bad_config_value_is_one_line_and_nothing_is_written(capsys, tmp_path, monkeypatch, line, message):
    monkeypatch.chdir(tmp_path)  # the default output_dir, runs/<name>, would land here
    cfg = tmp_path / "bad.yaml"
    base = FAST_TRAIN.replace("method: dmd2\n", "") if line.startswith("method:") else FAST_TRAIN
    cfg.write_text(base + line + "\n")
    before = snapshot(tmp_path)
    assert message in cli_error(capsys, "train", cfg)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "text, message",
    [
        ("method: dmd2\nmax_steps: [1\n", "not valid YAML"),
        ("- method\n- dmd2\n", "expected a mapping of config keys at the top level"),
        ("teacher: digits\n", "no 'method' key (one of boot, consistency, ctm,"),
        (b"\xff\xfe\x00method", "not valid YAML ('utf-8' codec can't decode byte 0xff"),
    ],
    ids=["malformed", "a-list", "no-method", "not-text"],
)
def test_a_config_file_that_is_not_a_mapping_with_a_method(capsys, tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    before = snapshot(tmp_path)
    assert message in cli_error(capsys, "train", tmp_path / "bad.yaml")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max_steps", "abc"], "max_steps: 'abc' is not a valid int"),
        (["--lr_generator", "[1e-4, 2e-4]"], "is not a valid float"),
        (["--ema_decay", "1.0"], "ema_decay must lie in [0, 1)"),
        (["--fake_score", "clone"], "fake_score must be one of"),
        (["--lr_generator"], "--lr_generator needs a value"),
        (["max_steps", "3"], "expected --key value, got 'max_steps'"),
    ],
)
def test_bad_command_line_overrides(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert message in cli_error(capsys, "train", "digits_dmd2", *args)
    assert list(tmp_path.iterdir()) == []


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-5 as a string: a float field takes it as the number it spells."""
    from onestep.trainers import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: dmd2\nlr_generator: 1e-5\nloss_t_range: [2e-2, 0.98]\n")
    config = load_config(cfg, {"lr_fake": "1e-4"})  # as --lr_fake 1e-4 arrives
    assert config.lr_generator == 1e-5 and config.lr_fake == 1e-4 and config.loss_t_range == [0.02, 0.98]


# ------------------------------------------------------------------------------------------------ students


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_teacher_dir):
    """A student of the tiny teacher, exported without training (its generator is the teacher's copy)."""
    from onestep.export import export_student
    from onestep.teachers import load_teacher

    teacher = load_teacher(tiny_teacher_dir)
    return export_student(tmp_path_factory.mktemp("bad_input") / "student", teacher.new_backbone(), teacher, "dmd2", [999])


def student_copy(student_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(student_dir, tmp_path / "student"))


def assert_sample_and_eval_refuse(capsys, student: Path, tmp_path: Path, message: str) -> None:
    """``onestep sample`` and ``onestep eval fid`` both refuse ``student`` with ``message``; nothing is written."""
    before = snapshot(tmp_path)
    line = cli_error(capsys, "sample", "--student", student, "--num-samples", 2, "--out", tmp_path / "out", "--device", "cpu")
    assert line.startswith("onestep sample: error:") and message in line
    line = cli_error(capsys, "eval", "fid", "--student", student, "--num-samples", 2, "--out", tmp_path / "eval",
                     "--device", "cpu", "--no-progress", "--cache-dir", tmp_path / "cache")
    assert line.startswith("onestep eval: error:") and message in line
    assert snapshot(tmp_path) == before


def _write_meta(**changes):
    def damage(student: Path) -> None:
        meta = json.loads((student / "onestep.json").read_text())
        for k, v in changes.items():
            meta.pop(k) if v is ... else meta.__setitem__(k, v)
        (student / "onestep.json").write_text(json.dumps(meta))

    return damage


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: (s / "onestep.json").unlink(), "is not a onestep student: onestep.json is missing"),
        (lambda s: (s / "onestep.json").write_text('{"format_version": 1,'), "onestep.json: not valid JSON"),
        (lambda s: (s / "onestep.json").write_bytes(b"\xff\xfe\x00\x81"), "onestep.json: not valid JSON"),
        (lambda s: (s / "onestep.json").write_text("[1, 2]"), "onestep.json: expected a JSON object, found a list"),
        (_write_meta(format_version=2), "unsupported format_version 2 (expected 1); it was written by a newer onestep"),
        (_write_meta(format_version="1"), "unsupported format_version '1' (expected 1)"),
        (_write_meta(format_version=...), "unsupported format_version None"),
        (_write_meta(schedule=...), "schedule must be a diffusers scheduler config (an object) (it is missing)"),
        (_write_meta(schedule={"beta_schedule": "bogus"}), "the scheduler config does not build a schedule"),
        (_write_meta(timesteps=[5000]), "timesteps [5000] must lie in [0, 999]"),
        (_write_meta(timesteps="999"), "timesteps must be a non-empty list of integers >= 0 (got '999')"),
        (_write_meta(model_class="os.system"), "model_class must be one of"),
        (_write_meta(prediction_type="x0"), "prediction_type must be one of"),
        (_write_meta(sample_shape=[1, 8]), "sample_shape [1, 8] does not fit the UNet2DModel generator"),
        (_write_meta(conditioning={"kind": "class", "colour": 1}), "unexpected keyword argument 'colour'"),
        (_write_meta(clip="yes"), "clip must be null or a positive number"),
        (_write_meta(conditioning={"kind": "none"}), "does not fit the generator (11 class embeddings: class conditioning"),
        (_write_meta(conditioning={"kind": "class", "num_classes": 10, "null_class": 11}), "does not fit the generator (11 class embeddings"),
    ],
    ids=["no-meta", "malformed-json", "not-utf8", "json-list", "newer-version", "string-version", "no-version", "no-schedule",
         "bad-schedule", "timestep-range", "timesteps-string", "model-class", "prediction-type", "sample-shape",
         "conditioning-key", "clip", "unconditional-for-a-class-network", "null-class-outside"],
)
def test_a_bad_student_folder_is_refused_by_sample_and_eval(capsys, tmp_path, student_dir, damage, message):
    student = student_copy(student_dir, tmp_path)
    damage(student)
    assert_sample_and_eval_refuse(capsys, student, tmp_path, message)


class _Unpickled:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt"])
@pytest.mark.parametrize("beside", [False, True], ids=["instead", "beside-safetensors"])
def test_pickle_weights_are_refused_and_never_unpickled(capsys, tmp_path, student_dir, suffix, beside):
    student = student_copy(student_dir, tmp_path)
    marker = tmp_path / "unpickled"
    weights = student / "generator" / "diffusion_pytorch_model.safetensors"
    if not beside:
        weights.unlink()
    (student / "generator" / f"diffusion_pytorch_model{suffix}").write_bytes(pickle.dumps(_Unpickled(marker)))
    assert_sample_and_eval_refuse(capsys, student, tmp_path, f"holds pickle files (diffusion_pytorch_model{suffix}); onestep loads safetensors only")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ teachers


def _teacher(tiny_teacher_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_teacher_dir, tmp_path / "teacher"))


def _scheduler(**changes):
    def damage(t: Path) -> None:
        f = t / "scheduler" / "scheduler_config.json"
        f.write_text(json.dumps(json.loads(f.read_text()) | changes))

    return damage


def _only_the_unet(t: Path) -> None:
    for p in t.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.copytree(t.with_name("unet_src"), t, dirs_exist_ok=True)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in t.iterdir()], "is not a diffusers pipeline folder: model_index.json is missing"),
        (_only_the_unet, "is a single diffusers model (config.json), not a pipeline folder"),
        (lambda t: (t / "model_index.json").write_text("{unet"), "model_index.json: not valid JSON"),
        (lambda t: (t / "model_index.json").write_text('["unet"]'), "model_index.json: expected a JSON object, found a list"),
        (lambda t: shutil.rmtree(t / "unet"), "the pipeline has no 'unet' component (need unet and scheduler)"),
        (lambda t: shutil.rmtree(t / "scheduler"), "the pipeline has no 'scheduler' component (need unet and scheduler)"),
        (lambda t: (t / "scheduler" / "scheduler_config.json").unlink(), "scheduler/scheduler_config.json is missing"),
        (lambda t: (t / "scheduler" / "scheduler_config.json").write_text("{"), "scheduler_config.json: not valid JSON"),
        (lambda t: [p.unlink() for p in (t / "unet").iterdir()], "cannot load the UNet"),
        (lambda t: (t / "onestep_teacher.json").write_text("{"), "onestep_teacher.json: not valid JSON"),
        (_scheduler(prediction_type="x_start"), "prediction_type 'x_start' (its scheduler config) is not supported with a DDPM-style schedule; expected one of epsilon, v_prediction, sample"),
        (_scheduler(prediction_type="flow"), "prediction_type 'flow' (its scheduler config) is not supported with a DDPM-style schedule"),
        (_scheduler(beta_schedule="bogus"), "the scheduler config does not build a schedule"),
    ],
    ids=["empty-folder", "model-not-pipeline", "malformed-index", "index-list", "no-unet", "no-scheduler", "no-scheduler-config",
         "malformed-scheduler-config", "empty-unet", "malformed-teacher-meta", "prediction-type", "flow-on-ddpm", "beta-schedule"],
)
def test_a_bad_teacher_folder_is_refused_before_the_run_starts(capsys, tmp_path, monkeypatch, tiny_teacher_dir, damage, message):
    monkeypatch.chdir(tmp_path)
    teacher = _teacher(tiny_teacher_dir, tmp_path)
    shutil.copytree(tiny_teacher_dir / "unet", tmp_path / "unet_src")
    damage(teacher)
    (tmp_path / "c.yaml").write_text(FAST_TRAIN)
    before = snapshot(tmp_path)
    line = cli_error(capsys, "train", tmp_path / "c.yaml", "--teacher", teacher, "--output-dir", tmp_path / "run")
    assert line.startswith("onestep train: error:") and message in line
    assert snapshot(tmp_path) == before  # no run folder, nothing changed


def test_a_sample_prediction_teacher_is_supported(tmp_path, tiny_teacher_dir):
    from onestep.teachers import load_teacher

    teacher = _teacher(tiny_teacher_dir, tmp_path)
    _scheduler(prediction_type="sample")(teacher)
    assert load_teacher(teacher).prediction_type == "sample"


# ----------------------------------------------------------------------------------------------- evaluators


def _images(folder: Path, sizes: list[int]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, s in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (s, s), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def _fid_error(capsys, tmp_path: Path, *args) -> str:
    before = snapshot(tmp_path)
    line = cli_error(capsys, "eval", "fid", *args, "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--no-progress", "--device", "cpu")
    assert line.startswith("onestep eval: error:")
    assert snapshot(tmp_path) == before  # no metrics, no cached statistics
    return line


def test_eval_an_empty_image_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not an image")
    ok = _images(tmp_path / "ok", [16] * 4)
    for folder in ("empty", "notes"):
        assert "no images (.png, .jpg, .jpeg, .webp, .bmp) and no samples.npz" in _fid_error(capsys, tmp_path, "--images", tmp_path / folder)
        assert f"{folder}: no images" in _fid_error(capsys, tmp_path, "--images", ok, "--ref", tmp_path / folder)


def test_eval_mixed_image_sizes_and_unreadable_images(capsys, tmp_path):
    mixed = _images(tmp_path / "mixed", [16, 16, 20])
    assert "images of different sizes [(16, 16), (20, 20)]; resize them to one size first" in _fid_error(capsys, tmp_path, "--images", mixed)
    broken = _images(tmp_path / "broken", [16, 16])
    (broken / "002.png").write_bytes(b"not a png")
    assert "002.png: not a readable image" in _fid_error(capsys, tmp_path, "--images", broken)


def _stats_file(path: Path, dim: int, meta: dict | None) -> Path:
    arrays = dict(mu=np.zeros(dim), sigma=np.eye(dim))
    if meta is not None:
        arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    return path


def test_eval_statistics_of_another_extractor_or_preprocessing(capsys, tmp_path):
    from onestep.eval.extractors import resolve_extractor
    from onestep.eval.stats_cache import stats_key

    ok = _images(tmp_path / "ok", [16] * 4)
    key = stats_key("digits", resolve_extractor("digits"), None)  # what a digits statistics file records
    inception = _stats_file(tmp_path / "inception.npz", 2048, key | {"extractor": "inception", "layer": "2048"})
    line = _fid_error(capsys, tmp_path, "--images", ok, "--ref-stats", inception)
    assert "inception.npz was computed with extractor 'inception', not 'onestep-digits'; use another --ref-stats file or delete it" in line
    resized = _stats_file(tmp_path / "resized.npz", 64, key | {"preprocessing": "resize to 299 bicubic"})
    line = _fid_error(capsys, tmp_path, "--images", ok, "--ref", "digits", "--ref-stats", resized)
    assert "resized.npz was computed with preprocessing 'resize to 299 bicubic', not 'digits-v1:" in line
    foreign = _stats_file(tmp_path / "foreign.npz", 2048, None)  # no meta: only its width tells
    line = _fid_error(capsys, tmp_path, "--images", ok, "--ref-stats", foreign)
    assert "hold 2048 features, this extractor gives 64: they come from another extractor" in line
    odd = _stats_file(tmp_path / "odd.npz", 3, ["not", "an", "object"])
    assert "odd.npz: its 'meta' is not an object" in _fid_error(capsys, tmp_path, "--images", ok, "--ref-stats", odd)


# ---------------------------------------------------------------------------------------- property tests

SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=10)
    | st.sampled_from(["copy", "lora", "none", "no", "bf16", "attention", "all", "digits", "1e-5", "-3", "class", "text", "epsilon", "lcm"])
    | st.sampled_from([0, 1, 2, 999, -1, 0.5, 1e-4])
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


@st.composite
def _config_docs(draw):
    """A config document: mostly a known method with some of its fields (plausible or random values), now
    and then no method, a random one, an alias, a renamed field or a key that is no field at all."""
    from onestep.trainers import METHODS
    from onestep.trainers.config import ALIASES, RENAMED_FIELDS

    doc = {}
    if draw(st.integers(0, 9)):
        doc["method"] = draw(st.sampled_from(sorted(METHODS))) if draw(st.integers(0, 9)) else draw(VALUES)
    cls = METHODS[doc["method"]][0] if isinstance(doc.get("method"), str) and doc["method"] in METHODS else METHODS["dmd2"][0]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 9)):
            key = draw(st.sampled_from(sorted(fields)))
        else:
            key = draw(st.sampled_from(sorted(set(ALIASES) | set(RENAMED_FIELDS))) | st.text(max_size=10) | st.integers())
        f = fields.get(key)
        default = f.default if f is not None and f.default is not dataclasses.MISSING else None
        doc[key] = draw(st.just(default) | VALUES | st.integers(-3, 1000) | st.floats(-1.0, 2.0))
    return doc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hypothesis")


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_config_docs())
def test_random_config_documents_give_a_config_or_a_config_error(workdir, doc):
    from onestep.config import build_config, config_to_dict
    from onestep.trainers import DistillConfig, load_config, method_classes

    path = workdir / "random.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        config = load_config(path, output_dir=str(workdir / "run"))
    except OnestepError:
        return
    assert isinstance(config, DistillConfig)
    cls = method_classes(config.method)[0]
    assert build_config(cls, config_to_dict(config)) == config  # what was accepted reads back the same


@settings(max_examples=100, deadline=None, database=None)
@given(text=st.binary(max_size=40) | st.text(max_size=40))
def test_random_config_bytes_give_a_config_or_a_config_error(workdir, text):
    from onestep.trainers import METHODS, load_config
    from onestep.trainers.config import DistillConfig

    path = workdir / "random-bytes.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    try:
        config = load_config(path, output_dir=str(workdir / "run"))
    except OnestepError as e:  # the clear error: one message, never another exception type
        assert str(e).strip()
    else:  # an accepted file is a whole config of a known method
        assert isinstance(config, DistillConfig) and config.method in METHODS


def _valid_meta(student_dir: Path) -> dict:
    return json.loads((student_dir / "onestep.json").read_text())


META_KEYS = ["format_version", "method", "model_class", "teacher", "prediction_type", "schedule", "timesteps", "conditioning",
             "sample_shape", "clip", "guidance", "generator_subfolder", "consistency", "config", "pipeline_sigmas"]


@st.composite
def _meta_docs(draw, base: dict):
    """A random JSON document, or the valid metadata with a few fields removed, replaced or nested ones changed."""
    if draw(st.integers(0, 4)) == 0:
        return draw(VALUES)
    meta = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(META_KEYS) | st.text(max_size=8))
        action = draw(st.sampled_from(["drop", "replace", "nested"]))
        if action == "drop":
            meta.pop(key, None)
        elif action == "nested" and isinstance(meta.get(key), dict) and meta[key]:
            meta[key][draw(st.sampled_from(sorted(meta[key])) | st.text(max_size=8))] = draw(VALUES)
        else:
            meta[key] = draw(VALUES)
    return meta


@pytest.fixture(scope="module")
def fuzz_student(student_dir, workdir):
    return Path(shutil.copytree(student_dir, workdir / "student"))


@pytest.fixture
def one_thread():
    """One torch thread for the tiny forward passes: on a busy machine, threads waiting for each other
    make a 10 ms forward take a second."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_onestep_json_gives_a_student_or_a_student_error(fuzz_student, student_dir, one_thread, data):
    from onestep.export import Student, load_student
    from onestep.samplers.student import sample_student_from_seeds

    doc = data.draw(_meta_docs(_valid_meta(student_dir)))
    (fuzz_student / "onestep.json").write_text(json.dumps(doc))  # JSON as Python writes it: NaN and Infinity included
    try:
        student = load_student(fuzz_student)
    except OnestepError:
        return
    assert isinstance(student, Student)
    x, _ = sample_student_from_seeds(student.generator, student, student.timesteps, [0])  # a student that loads samples
    assert tuple(x.shape) == (1, *student.sample_shape)


def test_digits_fid_of_a_sounds_student_is_refused_before_sampling(tmp_path, capsys):
    """The default reference is the real digits: a student of spectrograms gets a pointer to its own scores."""
    from onestep.export import export_student
    from onestep.teachers import load_teacher

    teacher = load_teacher("sounds")
    student = export_student(tmp_path / "sounds_student", teacher.new_backbone(), teacher, "consistency", [999])
    before = snapshot(tmp_path)
    line = cli_error(capsys, "eval", "fid", "--student", student, "--num-samples", 2, "--out", tmp_path / "eval", "--device", "cpu",
                     "--no-progress", "--cache-dir", tmp_path / "cache")
    assert line.startswith("onestep eval: error:") and "mel spectrograms" in line and "benchmarks/audio.py" in line
    assert snapshot(tmp_path) == before
    run = tmp_path / "run"
    shutil.copytree(student, run / "student")  # a finished run of it: `onestep eval run` refuses it the same way
    before = snapshot(tmp_path)
    line = cli_error(capsys, "eval", "run", "--run", run, "--num-samples", 2, "--device", "cpu", "--no-progress", "--cache-dir", tmp_path / "cache")
    assert "mel spectrograms" in line
    assert snapshot(tmp_path) == before
