"""Teachers given as Hugging Face Hub ids (onestep/teachers/hub.py), opt-in, on a fake local HF cache:
a tiny SD pipeline laid out as huggingface_hub lays out a download (``models--owner--name/blobs``,
``snapshots/<commit>/`` of symlinks, ``refs/main``), loaded offline; the refusals (not allowed,
offline and not cached, unreachable hub, not a pipeline, pickles only) as one-line errors. No
network: offline mode, or an endpoint on a closed local port."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from t2i_fixtures import PROMPTS, latent_cache_in_tmp, make_tiny_sd  # noqa: F401 (fixtures)

from onestep.errors import TeacherError
from onestep.teachers import load_teacher
from onestep.teachers.hub import ALLOW_PATTERNS, IGNORE_PATTERNS, is_hub_id, resolve_hub_teacher

REPO = "tiny-owner/tiny-sd"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Lay ``folder`` out in the HF cache ``cache`` as a download of ``repo_id`` at ``commit`` (the ``main``
    ref): content-addressed blobs, a snapshot folder of relative symlinks to them. Returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("hub_sd"))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty HF cache of this test's own, offline, Hub ids not allowed by the environment."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ONESTEP_ALLOW_HUB", raising=False)
    return cache


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_hub_id_shape():
    assert is_hub_id("runwayml/stable-diffusion-v1-5") and is_hub_id("stabilityai/sdxl-turbo") and is_hub_id("a.b/c_d-1.0")
    for spec in ("digits", "a/b/c", "/abs/path", "./x", "../x", "a/..", "owner/", "/name", "~/models", "a b/c"):
        assert not is_hub_id(spec), spec


def test_hub_id_loads_from_the_cache_offline(sd_dir, hub, tmp_path, monkeypatch):
    from onestep.trainers.config import DistillConfig, load_teacher_for

    snapshot = fake_hub_cache(hub, REPO, sd_dir)
    config = DistillConfig(teacher=REPO, allow_hub=True, prompts=str(tmp_path / "p.txt"), output_dir=str(tmp_path / "run"))
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    teacher = load_teacher_for(config)
    local = load_teacher(sd_dir, prompts=PROMPTS)
    assert teacher.name == REPO  # students record the id, not the cache path
    assert Path(teacher.meta["pipeline_folder"]) == snapshot.resolve()
    assert teacher.sha256 == local.sha256 and teacher.sample_shape == local.sample_shape
    assert teacher.conditioning.prompts == PROMPTS
    # ONESTEP_ALLOW_HUB=1 allows it without the config field
    monkeypatch.setenv("ONESTEP_ALLOW_HUB", "1")
    assert resolve_hub_teacher(REPO) == snapshot


def test_hub_ids_need_the_opt_in(sd_dir, hub, monkeypatch):
    import huggingface_hub

    fake_hub_cache(hub, REPO, sd_dir)  # even a cached copy is not used without the opt-in
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("reached huggingface_hub"))
    for allow in (None, False):
        with pytest.raises(TeacherError) as e:
            load_teacher(REPO, allow_hub=allow)
        msg = _one_line(e)
        assert "allow_hub: true" in msg and "ONESTEP_ALLOW_HUB=1" in msg and "hf download" in msg and "local diffusers pipeline folder" in msg
    # a relative path that does not exist reads as a Hub id: the message says both
    with pytest.raises(TeacherError, match="'models/sd15' is not an existing folder"):
        load_teacher("models/sd15")
    # not an id, not a path
    with pytest.raises(TeacherError, match="neither a built-in teacher"):
        load_teacher("a/b/c")


def test_offline_and_not_cached_is_a_one_line_error(hub):
    with pytest.raises(TeacherError) as e:
        load_teacher("someone/not-downloaded", allow_hub=True)
    msg = _one_line(e)
    assert "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg and "hf download someone/not-downloaded" in msg


def test_no_network_uses_the_cache_or_says_so(sd_dir, hub, monkeypatch):
    """Online mode with the Hub unreachable (a closed local port): the cached snapshot, else an error."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    snapshot = fake_hub_cache(hub, REPO, sd_dir)
    assert resolve_hub_teacher(REPO, allow_hub=True) == snapshot
    with pytest.raises(TeacherError) as e:
        resolve_hub_teacher("someone/not-downloaded", allow_hub=True)
    msg = _one_line(e)
    assert "cannot be reached" in msg and "hf download" in msg


def test_cached_repos_that_are_not_safe_pipelines_are_refused(sd_dir, hub, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(sd_dir, pickled)
    w = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    fake_hub_cache(hub, "someone/pickled", pickled)
    with pytest.raises(TeacherError, match="safetensors only"):
        load_teacher("someone/pickled", allow_hub=True)
    single = tmp_path / "single"
    single.mkdir()
    (single / "v1-5-pruned-emaonly.safetensors").write_bytes(b"\0" * 8)
    fake_hub_cache(hub, "someone/single-file", single)
    with pytest.raises(TeacherError) as e:
        load_teacher("someone/single-file", allow_hub=True)
    assert "no model_index.json" in _one_line(e)


def test_download_patterns_fetch_safetensors_configs_and_tokenizers_only():
    from huggingface_hub.utils import filter_repo_objects

    repo = [
        "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors", "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.json", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
        "text_encoder/model.fp16.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer_3/spiece.model", "tokenizer/rogue.pkl", "scheduler/scheduler_config.json", "safety_checker/model.safetensors",
        "safety_checker/pytorch_model.bin", "flax_model.msgpack", "pipeline.py", "unet/diffusion_pytorch_model.ckpt",
    ]
    got = set(filter_repo_objects(repo, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
    assert got == {
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model-00001-of-00002.safetensors", "vae/diffusion_pytorch_model.safetensors.index.json",
        "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer_3/spiece.model", "scheduler/scheduler_config.json",
    }
