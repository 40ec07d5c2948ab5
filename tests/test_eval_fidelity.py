"""FID/KID through torch-fidelity: agreement with digits_fid, batch-size invariance, the reference
cache, Inception's weights (a fast clear error without them; local files with them), the CLI."""

import json
import time

import numpy as np
import pytest
import torch

from onestep.cli import main
from onestep.digits import digits_dataset
from onestep.errors import OnestepError
from onestep.eval import digits_fid
from onestep.eval.extractors import INCEPTION_FILE, extract_features, load_inception_state
from onestep.eval.images import load_images
from onestep.eval.metrics import compute_fid_kid
from onestep.eval.stats_cache import reference_statistics


def _write_pngs(images: torch.Tensor, folder):
    from PIL import Image

    from onestep.viz import to_uint8

    folder.mkdir(parents=True)
    for i, img in enumerate(to_uint8(images)):
        Image.fromarray(img[..., 0]).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def halves():
    x, _ = digits_dataset()  # sklearn's order cycles through the classes: split at random
    p = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[p[:300]], x[p[300:600]]


def test_torch_fidelity_path_agrees_with_digits_fid(tmp_path, halves):
    a, b = halves
    ref = _write_pngs(b, tmp_path / "ref")
    assert torch.equal(load_images(ref), ((b + 1) * 127.5).round().to(torch.uint8))  # PNGs hold the one quantisation
    r = compute_fid_kid(a, ref=str(ref), cache_dir=tmp_path / "cache")
    assert r["extractor"] == "onestep-digits" and r["num_fake"] == 300 and r["num_ref"] == 300
    assert r["fid"] == pytest.approx(digits_fid(a, b), rel=1e-5)
    assert r["kid_subset_size"] == 300 and np.isfinite(r["kid"]) and r["kid_std"] >= 0
    # A shifted set is further away on both metrics.
    r2 = compute_fid_kid(torch.roll(a, 2, dims=-1), ref=str(ref), cache_dir=tmp_path / "cache", kid=False)
    assert r2["fid"] > 5 * r["fid"]


def test_same_images_give_the_same_fid_whatever_the_batch_size(tmp_path, halves):
    a = halves[0][:100]
    r1 = compute_fid_kid(a, ref="digits", cache_dir=tmp_path, batch_size=256)
    r2 = compute_fid_kid(a, ref="digits", cache_dir=tmp_path, batch_size=7)
    assert r2["fid"] == pytest.approx(r1["fid"], rel=1e-5, abs=1e-7)
    assert r2["kid"] == pytest.approx(r1["kid"], rel=1e-4, abs=1e-6)


def test_reference_statistics_are_cached_and_reused(tmp_path, monkeypatch, halves):
    import onestep.eval.stats_cache as fid_mod

    calls = []
    real_extract = fid_mod.extract_features
    monkeypatch.setattr(fid_mod, "extract_features", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    _, b = halves
    ref = _write_pngs(b, tmp_path / "ref")
    first = reference_statistics(str(ref), cache_dir=tmp_path / "cache")
    assert not first["cached"] and len(calls) == 1
    files = list((tmp_path / "cache").glob("*.npz"))
    assert len(files) == 1 and "onestep-digits" in files[0].name
    second = reference_statistics(str(ref), cache_dir=tmp_path / "cache")
    assert second["cached"] and len(calls) == 1  # nothing recomputed
    np.testing.assert_array_equal(first["sigma"], second["sigma"])
    meta = second["meta"]
    assert meta["extractor"] == "onestep-digits" and "round((x+1)*127.5)" in meta["preprocessing"] and meta["num_images"] == 300
    # Other images in the folder: a new key, recomputed.
    _write_pngs(b[:10], tmp_path / "ref2")
    reference_statistics(str(tmp_path / "ref2"), cache_dir=tmp_path / "cache")
    assert len(calls) == 2 and len(list((tmp_path / "cache").glob("*.npz"))) == 2
    # An explicit --ref-stats file: written on first use, read afterwards (also without --ref).
    stats = tmp_path / "ref.npz"
    reference_statistics(str(ref), stats_path=stats)
    assert stats.is_file() and len(calls) == 3
    again = reference_statistics(None, stats_path=stats)
    assert again["cached"] and len(calls) == 3


def test_foreign_statistics_file_gives_fid_without_kid(tmp_path, halves):
    from onestep.eval import digits_features, feature_statistics

    a, b = halves
    mu, sigma = feature_statistics(digits_features(b))
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    r = compute_fid_kid(a, ref=None, ref_stats=tmp_path / "stats.npz")
    assert r["fid"] == pytest.approx(digits_fid(a, b), rel=1e-5) and r["kid"] is None
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(OnestepError, match="needs arrays 'mu' and 'sigma'"):
        compute_fid_kid(a, ref=None, ref_stats=tmp_path / "bad.npz")


def test_inception_without_weights_is_a_fast_clear_error(tmp_path, monkeypatch, capsys, halves):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    start = time.perf_counter()
    with pytest.raises(OnestepError) as err:
        compute_fid_kid(halves[0], extractor="inception")
    assert time.perf_counter() - start < 2.0
    msg = str(err.value)
    assert "--inception-weights" in msg and INCEPTION_FILE in msg and "cannot be downloaded" in msg
    assert str(tmp_path / "empty_torch_home") in msg  # says where it looked
    # The CLI: one line on stderr, exit 2, before sampling anything.
    code = main(["eval", "fid", "--images", str(tmp_path), "--extractor", "inception", "--no-progress"])
    err_out = capsys.readouterr().err.strip()
    assert code == 2 and err_out.count("\n") == 0 and "--inception-weights" in err_out


@pytest.fixture(scope="module")
def random_inception_state():
    """A state dict of torch-fidelity's Inception-v3 with random weights (the real ones are a download)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as m

    torch.manual_seed(0)
    with mock.patch.object(m, "load_state_dict_from_url", lambda *a, **k: {}), mock.patch.object(
        m.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None
    ):
        net = m.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    return {k: v.clone().contiguous() for k, v in net.state_dict().items()}


def test_inception_reads_local_weights_and_the_warm_torch_cache(tmp_path, monkeypatch, random_inception_state):
    from safetensors.torch import save_file

    import onestep.eval.extractors as fid_mod

    x, _ = digits_dataset()
    imgs = x[:3]
    path = tmp_path / "inception.safetensors"
    save_file(random_inception_state, path)
    f1 = extract_features(imgs, extractor="inception", inception_weights=path, batch_size=2)
    assert f1.shape == (3, 2048) and np.isfinite(f1).all() and f1.std() > 0
    # The same state as torch-fidelity's .pth in the torch hub cache: read with weights_only=True.
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(random_inception_state, hub / INCEPTION_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    fid_mod._EXTRACTOR_CACHE.clear()
    f2 = extract_features(imgs, extractor="inception", batch_size=3)
    np.testing.assert_allclose(f2, f1, rtol=1e-4, atol=1e-5)


class NotATensor:
    """Any class outside torch's weights-only allowlist: unpickling it could run code."""


def test_inception_weights_that_are_not_plain_tensors_are_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1), "obj": NotATensor()}, bad)
    with pytest.raises(OnestepError, match="will not unpickle"):
        load_inception_state(bad)


# ------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory, tiny_teacher_dir):
    """A student exported straight from the tiny teacher (its copy as generator, one step at t=800)."""
    import copy

    from onestep.export import export_student
    from onestep.teachers import load_teacher

    t = load_teacher(tiny_teacher_dir)
    return export_student(tmp_path_factory.mktemp("student") / "student", copy.deepcopy(t.backbone), t, "dmd2", [800])


def test_eval_fid_cli_writes_metrics_and_report(tmp_path, capsys, tiny_student):
    out = tmp_path / "ev"
    argv = ["eval", "fid", "--student", str(tiny_student), "--num-samples", "40", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert main(argv + ["--report"]) == 0
    printed = capsys.readouterr().out
    assert "fid" in printed and "student (1 step)" in printed
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["num_samples"] == 40 and rec["seeds"] == [0, 39] and rec["extractor"] == "onestep-digits"
    assert rec["student"]["method"] == "dmd2" and rec["student"]["teacher"]["name"] == str(rec["student"]["teacher"]["name"])
    assert rec["metrics"]["fid"] > 0 and rec["metrics"]["kid"] is not None and 0 <= rec["metrics"]["class_accuracy"] <= 1
    assert (out / "report.md").read_text().count("samples.png") >= 1 and (out / "samples.png").stat().st_size > 1000
    # Fixed seeds: the same student gives the same FID at another batch size.
    assert main(argv[:-1] + ["--batch-size", "7", "--no-kid", "--no-progress"]) == 0
    rec2 = json.loads((out / "metrics.json").read_text())
    assert rec2["metrics"]["fid"] == pytest.approx(rec["metrics"]["fid"], rel=1e-5)
    assert rec2["reference"]["cached"]


def test_eval_fid_cli_on_an_image_folder(tmp_path, capsys, halves):
    folder = _write_pngs(halves[0], tmp_path / "imgs")
    assert main(["eval", "fid", "--images", str(folder), "--no-kid", "--no-progress", "--cache-dir", str(tmp_path / "c")]) == 0
    rec = json.loads((tmp_path / "eval-imgs" / "metrics.json").read_text())
    assert rec["metrics"]["fid"] == pytest.approx(digits_fid(halves[0]), rel=1e-5) and rec["seeds"] is None


def test_eval_run_cli_scores_every_checkpoint(tmp_path, capsys, tiny_teacher_dir):
    from conftest import tiny_dmd2_config

    from onestep.trainers import DMD2Trainer

    cfg = tiny_dmd2_config(
        tmp_path, tiny_teacher_dir, max_steps=2, checkpoint_every=1, checkpoint_total_limit=0, fake_updates_per_generator=1, lr_generator=1e-2
    )
    DMD2Trainer(cfg).train()
    run = tmp_path / "run"
    assert main(["eval", "run", "--run", str(run), "--num-samples", "30", "--report", "--no-progress", "--cache-dir", str(tmp_path / "c")]) == 0
    rec = json.loads((run / "eval" / "metrics.json").read_text())
    pts = {p["what"]: p for p in rec["points"]}
    assert set(pts) == {"checkpoint-1", "checkpoint-2", "student (export)"}
    assert [p["step"] for p in rec["points"]] == [1, 2, 2]
    # No EMA here: the last checkpoint's raw weights are the exported ones; the first differ.
    assert pts["checkpoint-2"]["fid"] == pytest.approx(pts["student (export)"]["fid"], rel=1e-6)
    assert pts["checkpoint-1"]["fid"] != pytest.approx(pts["checkpoint-2"]["fid"], rel=1e-6)
    assert (run / "eval" / "curve.png").stat().st_size > 1000 and "curve.png" in (run / "eval" / "report.md").read_text()


def test_checkpoints_with_ema_are_scored_with_the_ema_weights(tmp_path, tiny_teacher_dir):
    from conftest import tiny_dmd2_config

    from onestep.eval.generate import load_generator_from_checkpoint
    from onestep.export import load_student
    from onestep.trainers import DMD2Trainer
    from onestep.weights import EXPORT_WEIGHTS

    cfg = tiny_dmd2_config(tmp_path, tiny_teacher_dir, max_steps=2, checkpoint_every=1, ema_decay=0.5, lr_generator=1e-2)
    DMD2Trainer(cfg).train()
    run = tmp_path / "run"
    assert (run / "checkpoint-2" / EXPORT_WEIGHTS).is_file()
    student = load_student(run / "student")
    gen = load_generator_from_checkpoint(student, run / "checkpoint-2")
    exported = student.generator.backbone.state_dict()
    for k, v in gen.backbone.state_dict().items():
        assert torch.equal(v, exported[k]), k  # the last checkpoint's EMA weights are the export's
